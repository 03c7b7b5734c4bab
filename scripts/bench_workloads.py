"""Every registered optimizer on every workload: one ``ngbench bench`` process per workload
(``--repeat`` medians, phases, state memory, the cost model's floor), JSON under
``results/bench/workloads/<workload>.json`` and one markdown table ``results/bench/workloads.md``
(measured ratio vs SGD, floor ratio, the phase carrying the excess, memory vs SGD and its
floor) for the README.

    scripts/bench_workloads.py                       # all workloads (see --help for the time)
    scripts/bench_workloads.py --workloads small_cnn,task:transformer --repeat 3
    scripts/bench_workloads.py --table-only          # rebuild the table from the JSON files

Run it on a quiet machine: the step times are wall-clock means.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: ``model:<name>`` for bench's --model entries, ``task:<name>[:k=v]`` for a task's tiny flavor
WORKLOADS = ["model:small_cnn", "task:autoencoder", "task:resnet", "task:transformer",
             "task:schnet", "task:recommender", "task:recommender:model=dlrm"]
#: variants run beside the registered optimizers
VARIANTS = ["kfac:approx=reduce"]


def _slug(workload: str) -> str:
    return workload.split(":", 1)[1].replace(":", "_").replace("=", "-")


def run_one(workload: str, optimizers: str, args: argparse.Namespace, out: Path) -> float:
    """Bench one workload; while a row ends with non-finite parameters (the bench repeats one
    fixed batch, so a large step can diverge and the time would be NaN arithmetic), run the
    whole workload again, in one process as before, at a tenth of the lr scale."""
    kind, _, name = workload.partition(":")
    flag = "--model" if kind == "model" else "--task"
    path = out / f"{_slug(workload)}.json"
    t0 = time.perf_counter()
    scale = args.lr_scale
    for attempt in range(args.retries + 1):
        cmd = [sys.executable, "-m", "ngbench.runners.cli", "bench", flag, name,
               "--optimizers", optimizers, "--lr-scale", f"{scale:g}",
               "--repeat", str(args.repeat), "--threads", str(args.threads),
               "--json", str(path), "--quiet"]
        if args.steps:
            cmd += ["--steps", str(args.steps)]
        print("+ ngbench " + " ".join(cmd[3:]), file=sys.stderr, flush=True)
        subprocess.run(cmd, cwd=ROOT, check=True)
        bad = [n for n, r in json.loads(path.read_text()).items() if not r.get("finite", True)]
        if not bad:
            break
        print(f"bench_workloads: {workload}: non-finite at lr scale {scale:g}: "
              f"{', '.join(bad)}" + ("; again at a tenth" if attempt < args.retries else ""),
              file=sys.stderr, flush=True)
        scale /= 10
    return time.perf_counter() - t0


def table(out: Path) -> str:
    lines = ["| workload | lr scale | optimizer | step ms | x SGD | floor x SGD | ÷ floor | "
             "excess in | state MB | x SGD mem | floor MB |", "|---" * 11 + "|"]
    for path in sorted(out.glob("*.json")):
        res = json.loads(path.read_text())
        for name, r in res.items():
            fl = r.get("floor_ratio")
            mf = r.get("mem_floor_mb")
            rng = r.get("ratio_vs_sgd_runs")
            ratio = f"{r['ratio_vs_sgd']:.2f}"
            if rng and len(rng) > 1:
                ratio += f" ({min(rng):.2f}-{max(rng):.2f})"
            if not r.get("finite", True):
                ratio += " (NaN!)"
            over = f"{r['ratio_vs_sgd'] / fl:.2f}" if fl else "-"  # measured ÷ floor
            lines.append(
                f"| {r['model']} | {r.get('lr_scale', 1.0):g} | {name} | "
                f"{1e3 * r['mean_step_s']:.1f} | {ratio} | "
                f"{f'{fl:.2f}' if fl else '-'} | {over} | {r.get('excess_phase') or '-'} | "
                f"{r['peak_mem_mb']:.2f} | {r.get('mem_vs_sgd', 0):.1f} | "
                f"{f'{mf:.2f}' if mf is not None else '-'} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="scripts/bench_workloads.py", description=__doc__)
    p.add_argument("--workloads", default=",".join(WORKLOADS))
    p.add_argument("--optimizers", default=None,
                   help="default: every registered optimizer plus " + ", ".join(VARIANTS))
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--steps", type=int, default=None,
                   help="timed steps (default bench's: 2 x the longest refresh period, >= 200)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--lr-scale", type=float, default=1.0, help="first lr scale of every workload")
    p.add_argument("--retries", type=int, default=2,
                   help="reruns of a workload at a tenth of the lr scale while a row is non-finite")
    p.add_argument("--out", type=Path, default=ROOT / "results" / "bench" / "workloads")
    p.add_argument("--table-only", action="store_true")
    a = p.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    if not a.table_only:
        if a.optimizers is None:
            sys.path.insert(0, str(ROOT))
            from ngbench.optimizers import list_optimizers

            a.optimizers = ",".join([*list_optimizers(), *VARIANTS])
        for w in a.workloads.split(","):
            secs = run_one(w.strip(), a.optimizers, a, a.out)
            print(f"bench_workloads: {w} took {secs:.0f} s", file=sys.stderr)
    md = a.out.parent / "workloads.md"
    md.write_text(table(a.out))
    print(md.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
