"""The ``ngbench`` command.

    ngbench train [HYDRA OVERRIDES ...]     one run, or a sweep with -m
    ngbench report RUNS_DIR [--out DIR]     tables and plots from run folders
    ngbench bench [--model ...]             optimizer step-overhead benchmark
    ngbench data DATASET [--root DIR]       check or prepare a data set
    ngbench list {tasks,optimizers}         what is registered

Each subcommand has its own ``--help``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

USAGE = __doc__ or ""


def cmd_train(argv: list[str]) -> int:
    if argv[:1] in (["-h"], ["--help"]) and len(argv) == 1:
        print(
            "usage: ngbench train [-m] [KEY=VALUE ...] [hydra flags]\n\n"
            "Train one run (or a sweep with -m) from the Hydra config configs/train.yaml.\n"
            "Groups: task=<name> optimizer=<name> logger=none|wandb debug=smoke "
            "hydra/launcher=slurm experiment=<name>\n"
            "Keys: seed, task.flavor (tiny|full), task.data_root, train.steps, "
            "train.batch_size,\n      train.eval_every, train.checkpoint_every, optimizer.lr, "
            "runs_root ...\n"
            "Examples:\n"
            "  ngbench train task=autoencoder optimizer=kfac\n"
            "  ngbench train -m optimizer=sgd,adamw,kfac seed=0,1,2\n"
            "  ngbench train --cfg job optimizer=kfac     # print the composed config\n"
            "  ngbench train --hydra-help                 # Hydra's own flags\n"
            "Run folders: runs/<task>_<dataset>_<flavor>/<optimizer>/<overrides>/seed<N>/"
        )
        return 0
    from . import train

    sys.argv = ["ngbench train", *argv]
    train.main()
    return 0


def cmd_list(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(
        prog="ngbench list", description="List registered tasks or optimizers."
    )
    ap.add_argument("what", choices=["tasks", "optimizers"])
    ap.add_argument("--names", action="store_true", help="names only, one per line")
    ap.add_argument(
        "-v", "--verbose", action="store_true",
        help="optimizers: every hyperparameter with its default and doc",
    )
    args = ap.parse_args(argv)
    if args.names:
        if args.what == "optimizers":
            from optimizers import list_optimizers as names_of
        else:
            from tasks import list_tasks as names_of
        print("\n".join(names_of()))
        return 0
    if args.what == "optimizers":
        from optimizers import OPTIMIZERS

        w = max(map(len, OPTIMIZERS))
        for n in sorted(OPTIMIZERS):
            s = OPTIMIZERS[n]
            flags = (
                ",".join(
                    f
                    for f, on in (
                        ("curvature", s.curvature),
                        ("hooks", s.needs_model),
                        ("mc-fisher", s.sampled_fisher),
                    )
                    if on
                )
                or "first-order"
            )
            print(f"{n:<{w}}  {flags:<26} {s.description}" + (f"  [{s.paper}]" if s.paper else ""))
            if args.verbose:
                defaults = s.config().to_dict()
                for key, doc in s.config.docs().items():
                    print(f"{'':<{w}}    {key} = {defaults[key]!r}  # {doc}")
        return 0
    from hydra import compose, initialize_config_dir

    from tasks import TASKS, build_task, list_tasks

    from .train import CONFIG_DIR

    names = list_tasks()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        for n in names:
            try:
                cfg = compose("train", overrides=[f"task={n}"])
                t = build_task(cfg.task)
                tgt = t.target
                sign = "<=" if tgt.mode == "min" else ">="
                print(
                    f"{n:<12} {t.describe()}\n{'':<12} flavor={t.flavor} datasets="
                    f"{','.join(TASKS[n].datasets)} target: {tgt.metric} {sign} {tgt.value}"
                )
            except Exception as exc:  # a broken task config should not hide the others
                print(f"{n:<12} (config error: {exc})")
    return 0


def cmd_data(argv: list[str]) -> int:
    from tasks import TASKS, DataNotFoundError, list_tasks

    known = {d: TASKS[t] for t in list_tasks() for d in TASKS[t].datasets}
    ap = argparse.ArgumentParser(
        prog="ngbench data",
        description="Check a data set under a root folder, or prepare what can be prepared "
        "offline. Known data sets: " + ", ".join(sorted(known)),
    )
    ap.add_argument("dataset", help="data set name (see above)")
    ap.add_argument(
        "--root", type=Path, default=None, help="data root (default: $NGBENCH_DATA or ./data)"
    )
    args = ap.parse_args(argv)
    if args.dataset not in known:
        print(
            f"ngbench data: error: unknown data set {args.dataset!r}; valid choices: "
            + ", ".join(sorted(known)),
            file=sys.stderr,
        )
        return 2
    import os

    root = args.root or Path(os.environ.get("NGBENCH_DATA", "data"))
    try:
        print(known[args.dataset].prepare_data(args.dataset, root))
    except DataNotFoundError as exc:
        print(f"ngbench data: {exc}", file=sys.stderr)
        return 1
    return 0


def cmd_report(argv: list[str]) -> int:
    from . import report

    return report.main(argv)


def cmd_bench(argv: list[str]) -> int:
    try:
        from . import bench
    except ImportError as exc:
        print(f"ngbench bench: not available ({exc})", file=sys.stderr)
        return 2
    return int(bench.main(argv) or 0)


COMMANDS = {
    "train": cmd_train,
    "report": cmd_report,
    "bench": cmd_bench,
    "data": cmd_data,
    "list": cmd_list,
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE.strip())
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        print(
            f"ngbench: error: unknown command {cmd!r}; valid choices: {', '.join(COMMANDS)}",
            file=sys.stderr,
        )
        return 2
    return COMMANDS[cmd](rest)


if __name__ == "__main__":
    sys.exit(main())
