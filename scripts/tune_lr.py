"""Fair learning-rate tuning: the same grid for every optimizer, best value written back.

For each optimizer, runs ``ngbench train -m sweep=lr_grid`` (train.lr_mult in {1/4, 1/2, 1, 2,
4} around its current tuned learning rate) on the given task and seeds, picks the multiplier
with the best mean objective (the task's target metric at the end of training, a diverged run
counting as worst), and — with ``--write`` — stores the resulting learning rate in
``configs/tuned/<task>_<optimizer>.yaml`` together with the grid it came from.

    python scripts/tune_lr.py --task autoencoder --optimizers sgd,adamw,kfac --write
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from ngbench.runners import records  # noqa: E402


def current_lr(task: str, opt: str) -> float:
    import ngbench.runners.train  # noqa: F401  (resolvers)
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=[f"task={task}", f"optimizer={opt}"])
    return float(cfg.optimizer.lr)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", default="autoencoder")
    ap.add_argument("--optimizers", required=True, help="comma-separated registry names")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--runs-root", default="runs/tune")
    ap.add_argument("--write", action="store_true", help="write configs/tuned/<task>_<opt>.yaml")
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides (e.g. train.steps=800)")
    args = ap.parse_args(argv)

    results: dict[str, dict[float, list[float]]] = {}
    for opt in args.optimizers.split(","):
        base_lr = current_lr(args.task, opt)
        root = f"{args.runs_root}/{args.task}_{opt}_lr{base_lr:g}"  # one folder per grid centre
        cmd = [
            sys.executable,
            "-m",
            "ngbench.runners.cli",
            "train",
            "-m",
            "sweep=lr_grid",
            f"task={args.task}",
            f"optimizer={opt}",
            f"seed={args.seeds}",
            f"runs_root={root}",
            "train.progress=false",
            "hydra/job_logging=none",
            "hydra/hydra_logging=none",
            *args.overrides,
        ]
        print(f"[tune] {opt}: grid around lr={base_lr:g}", flush=True)
        subprocess.run(cmd, cwd=REPO, check=True)
        grid: dict[float, list[float]] = defaultdict(list)
        mode = "min"
        for folder in records.find_run_folders(REPO / root):
            run = records.load_run(folder)
            if run is None or run["record"]["optimizer"] != opt:
                continue
            rec = run["record"]
            if rec["task"] != args.task:
                continue
            mode = rec["target"]["mode"]
            worst = math.inf if mode == "min" else -math.inf
            value = None
            if rec["status"] == "completed":
                value = rec["final_metrics"].get(rec["target"]["metric"])
            mult = float(rec.get("lr_mult", 1.0))
            grid[mult].append(worst if value is None or not math.isfinite(value) else float(value))
        means = {m: sum(v) / len(v) for m, v in grid.items()}
        best = (min if mode == "min" else max)(means, key=means.__getitem__)
        # a tie (e.g. a KL clip that fixes the step length whatever the lr) keeps the centre
        top = means[best]
        ties = [m for m, v in means.items() if v == top or abs(v - top) <= 1e-3 * abs(top)]
        best = min(ties, key=lambda m: abs(math.log(m)))
        results[opt] = grid
        lr = base_lr * best
        table = ", ".join(f"x{m:g}: {means[m]:.4g}" for m in sorted(means))
        print(f"[tune] {opt}: best lr_mult {best:g} -> lr {lr:.4g}   ({table})", flush=True)
        if best in (min(means), max(means)):
            print(f"[tune] {opt}: best at the edge of the grid; consider another round")
        if args.write:
            path = REPO / "configs" / "tuned" / f"{args.task}_{opt}.yaml"
            keep, notes = {}, []
            if path.exists():
                text = path.read_text()
                keep = (yaml.safe_load(text) or {}).get("optimizer", {})
                # earlier provenance (e.g. how a damping was chosen) stays; old lr lines go
                notes = [
                    line for line in text.splitlines()
                    if line.startswith("#") and "@package" not in line
                    and not line.startswith(("# Tuned by:", "# grid of lr_mult"))
                ]
            keep["lr"] = float(f"{lr:.4g}")
            header = (
                "# @package _global_\n"
                f"# Tuned by: python scripts/tune_lr.py --task {args.task} --optimizers {opt} "
                f"--seeds {args.seeds} {' '.join(args.overrides)} --write\n"
                f"# grid of lr_mult around lr={base_lr:g}, mean final target metric: {table}\n"
            )
            header += "".join(line + "\n" for line in notes)
            path.write_text(header + yaml.safe_dump({"optimizer": keep}, sort_keys=False))
            print(f"[tune] wrote {path.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
