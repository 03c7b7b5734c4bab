"""The ``ngbench`` command.

    ngbench train [HYDRA OVERRIDES ...]     one run, or a sweep with -m
    ngbench report RUNS_DIR [--out DIR]     tables and plots from run folders
    ngbench bench [--model ...]             optimizer step-overhead benchmark
    ngbench data DATASET [--root DIR]       check or prepare a data set
    ngbench list {tasks,optimizers}         what is registered
    ngbench leaderboard [PHASE ...]         the fair comparison (tune, calibrate, rerun, ...)
    ngbench scaling --workload W [PHASE]    the batch-size scaling study
    ngbench --version

Each subcommand has its own ``--help``; ``ngbench train --help`` lists every config group
and its choices.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

USAGE = __doc__ or ""


def cmd_train(argv: list[str]) -> int:
    """Hand over to Hydra (``--help`` prints configs/train.yaml's ``hydra.help`` template: the
    keys and every config group with its choices)."""
    from . import train
    from .config_check import ConfigError, check_override_keys

    try:
        check_override_keys(argv)
    except ConfigError as exc:
        print(f"ngbench: error: {exc}", file=sys.stderr)
        return 2
    sys.argv = ["ngbench train", *argv]
    train.main()
    return 0


def _list_optimizers(names_only: bool, verbose: bool = False) -> None:
    # the registry imports torch (the optimizers are torch.optim.Optimizer classes)
    from ngbench.optimizers import OPTIMIZERS

    names = sorted(OPTIMIZERS)
    if names_only:
        print("\n".join(names))
        return
    w = max(map(len, names))
    for n in names:
        s = OPTIMIZERS[n]
        on = (("curvature", s.curvature), ("hooks", s.needs_model), ("mc-fisher", s.sampled_fisher))
        flags = ",".join(f for f, yes in on if yes) or "first-order"
        print(f"{n:<{w}}  {flags:<26} {s.description}" + (f"  [{s.paper}]" if s.paper else ""))
        if verbose:
            defaults = s.config().to_dict()
            for key, doc in s.config.docs().items():
                print(f"{'':<{w}}    {key} = {defaults[key]!r}  # {doc}")


def _list_tasks(names_only: bool) -> None:
    # tasks.config needs neither torch nor Hydra: the defaults of each task config class
    from ngbench.tasks.config import TASK_CONFIGS

    if names_only:
        print("\n".join(sorted(TASK_CONFIGS)))
        return
    for n in sorted(TASK_CONFIGS):
        cfg = TASK_CONFIGS[n]()
        tgt = cfg.resolved_target
        target = f"{tgt.metric} {'<=' if tgt.mode == 'min' else '>='} {tgt.value}" if tgt else "-"
        print(
            f"{n:<12} {cfg.describe()}\n{'':<12} flavor={cfg.flavor} data={cfg.data_name} "
            f"datasets={','.join(cfg.DATASETS)} target: {target}"
        )


def cmd_list(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(
        prog="ngbench list",
        description="List registered tasks (with their default flavor, the data it really "
        "uses, the accepted task.dataset values and the target) or optimizers.",
    )
    ap.add_argument("what", choices=["tasks", "optimizers"])
    ap.add_argument("--names", action="store_true", help="names only, one per line")
    ap.add_argument("--search-space", action="store_true",
                    help="optimizers: the declared search space of each (the fair comparison)")
    ap.add_argument(
        "-v", "--verbose", action="store_true",
        help="optimizers: every hyperparameter with its default and doc",
    )
    args = ap.parse_args(argv)
    if args.search_space and args.what == "optimizers":
        from .search_space import format_spaces

        print(format_spaces())
        return 0
    if args.what == "optimizers":
        _list_optimizers(args.names, args.verbose)
    else:
        _list_tasks(args.names)
    return 0


def cmd_data(argv: list[str]) -> int:
    from ngbench.tasks.config import TASK_CONFIGS

    known: dict[str, str] = {}  # data set -> the first task that accepts it
    for name in sorted(TASK_CONFIGS):
        for d in TASK_CONFIGS[name].DATASETS:
            known.setdefault(d, name)
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

    from ngbench.tasks import TASKS, DataNotFoundError, list_tasks

    list_tasks()  # loads the task modules
    root = args.root or Path(os.environ.get("NGBENCH_DATA", "data"))
    try:
        print(TASKS[known[args.dataset]].prepare_data(args.dataset, root))
    except DataNotFoundError as exc:
        print(f"ngbench data: {exc}", file=sys.stderr)
        return 1
    return 0


def cmd_report(argv: list[str]) -> int:
    from . import report

    return report.main(argv)


def cmd_bench(argv: list[str]) -> int:
    if "-h" in argv or "--help" in argv:  # the command line alone: no torch import
        from .bench_args import parser

        parser().parse_args(argv)
    try:
        from . import bench
    except ImportError as exc:
        print(f"ngbench bench: not available ({exc})", file=sys.stderr)
        return 2
    return int(bench.main(argv) or 0)


def cmd_leaderboard(argv: list[str]) -> int:
    from . import leaderboard

    return leaderboard.main(argv)


def cmd_scaling(argv: list[str]) -> int:
    from . import scaling

    return int(scaling.main(argv) or 0)


COMMANDS = {
    "train": cmd_train,
    "report": cmd_report,
    "bench": cmd_bench,
    "data": cmd_data,
    "list": cmd_list,
    "leaderboard": cmd_leaderboard,
    "scaling": cmd_scaling,
}


def version() -> str:
    from importlib import metadata

    try:
        return metadata.version("ngbench")
    except metadata.PackageNotFoundError:  # a source checkout that is not installed
        import re

        text = (Path(__file__).resolve().parent.parent / "pyproject.toml").read_text()
        m = re.search(r'^version = "([^"]+)"', text, re.M)
        return m.group(1) if m else "unknown"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE.strip())
        return 0
    if argv[0] in ("-V", "--version"):
        print(f"ngbench {version()}")
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
