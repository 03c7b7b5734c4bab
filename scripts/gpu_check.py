"""Driver of scripts/gpu_check.sh: everything worth knowing the first time a GPU is at hand,
in one process and under a time budget, written to ``<out>/gpu_check.json`` (after every
section, so a kill leaves what was done) and ``<out>/gpu_check.md`` (a short table).

Sections, in order of value:

1. ``smoke`` — every registered optimizer (plus ``kfac:approx=reduce``) x every task's tiny
   flavor (its real model, loss and first batch, runners/bench.py ``task_workload``) on the
   device, under bf16 autocast, every schedule at 1 so statistics, refresh and preconditioning
   all run: ok / non-finite / the error; then one ``task.evaluate`` per task on the device.
2. ``ratios`` — ``ngbench bench`` on the small CNN and on ResNet-50 (synthetic 3x224x224,
   batch 128) for sgd, adamw, kfac, kfac:approx=reduce, ekfac, shampoo, ngplus, mbf: step
   ratio vs SGD, the cost model's floor, state memory.
3. ``loop`` — one real ``ngbench train ... debug=smoke train.device=<device>`` per task with
   kfac (the training loop, checkpointing and evaluation on the device; float32).

``--dry-run`` runs all of it on the CPU with tiny sizes (batch 8, 1-2 steps, a CIFAR ResNet-20
at 32x32 in place of ResNet-50, whose 4608-wide eigendecompositions take minutes on a CPU).

    scripts/gpu_check.sh                 # on a GPU machine: < 8 minutes
    scripts/gpu_check.sh --dry-run --out /tmp/gpu_check
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from ngbench.optimizers import build_optimizer, get_spec, list_optimizers  # noqa: E402
from ngbench.runners import bench, bench_args  # noqa: E402

TASKS = ["autoencoder", "resnet", "transformer", "schnet", "recommender",
         "recommender:model=dlrm"]
RATIO_OPTIMIZERS = ["sgd", "adamw", "kfac", "kfac:approx=reduce", "ekfac", "shampoo", "ngplus",
                    "mbf"]
#: schedule options set to 1 in the smoke runs, so that every phase runs in a few steps
EVERY_STEP = ("stat_every", "inv_every", "precondition_frequency", "scale_every")


class Budget:
    def __init__(self, seconds: float) -> None:
        self.t0 = time.monotonic()
        self.seconds = seconds

    def left(self) -> float:
        return self.seconds - (time.monotonic() - self.t0)

    def elapsed(self) -> float:
        return time.monotonic() - self.t0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _error(exc: BaseException) -> str:
    return f"error: {type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:300]}"


def smoke_task(task: str, names: list[str], device: torch.device, autocast: str | None,
               steps: int, batch: int | None, budget: Budget) -> tuple[list[dict], dict]:
    """One task: every optimizer for ``steps`` steps, then one evaluation on the device."""
    rows: list[dict] = []
    try:
        work = bench.task_workload(task, batch, 0, device)
    except Exception as exc:
        return [{"task": task, "optimizer": n, "status": _error(exc)} for n in names], {
            "task": task, "status": _error(exc)}
    last_model = None
    for label in names:
        row: dict[str, Any] = {"task": task, "optimizer": label}
        rows.append(row)
        if budget.left() < 0:
            row["status"] = "skipped (time budget)"
            continue
        name, hp = bench.parse_variant(label)
        accepted = get_spec(name).hparams
        hp = {**{k: 1 for k in EVERY_STEP if k in accepted}, **hp}
        losses: list[float] = []
        t0 = time.perf_counter()
        try:
            torch.manual_seed(0)
            model = work.build()
            opt = build_optimizer(name, model, lr=bench.LR.get(name, bench.DEFAULT_LR), **hp)
            for _ in range(steps):
                opt.zero_grad(set_to_none=True)
                with bench._autocast(device, autocast):
                    loss = work.loss(model, work.batch)
                loss.backward()
                opt.step()
                losses.append(float(loss.detach()))
            _sync(device)
            finite = all(math.isfinite(v) for v in losses) and all(
                bool(torch.isfinite(p).all()) for p in model.parameters())
            row["status"] = "ok" if finite else "non-finite"
            if label == "sgd":
                last_model = model
        except Exception as exc:  # record and go on: one table of everything
            row["status"] = _error(exc)
        row["loss"] = losses[-1] if losses else None
        row["s_per_step"] = (time.perf_counter() - t0) / max(1, steps)
    ev: dict[str, Any] = {"task": task}
    if last_model is None or work.task is None:
        ev["status"] = "skipped (no sgd model)"
    elif budget.left() < 0:
        ev["status"] = "skipped (time budget)"
    else:
        t0 = time.perf_counter()
        try:
            last_model.eval()
            metrics = work.task.evaluate(last_model, device)
            ev.update(status="ok", metrics={k: float(v) for k, v in metrics.items()})
        except Exception as exc:
            ev["status"] = _error(exc)
        ev["seconds"] = time.perf_counter() - t0
    return rows, ev


def _dry_resnet() -> torch.nn.Module:
    from ngbench.tasks.resnet import build_resnet

    return build_resnet("resnet20", num_classes=10)


def ratios(model: str, *, device: torch.device, autocast: str | None, dry: bool,
           budget: Budget, optimizers: list[str]) -> dict[str, Any]:
    if budget.left() < 0:
        return {"status": "skipped (time budget)"}
    if dry:
        steps, warmup, batch = 2, 1, 4
        if model == "resnet50":  # same code path, CPU-sized network
            bench.MODELS["resnet50"] = bench.BenchModel(
                _dry_resnet, 4, bench._cnn_data, torch.nn.functional.cross_entropy,
                "cross_entropy")
    else:  # both cover one refresh period of 100 inside the timed window
        steps, warmup, batch = (200 if model == "small_cnn" else 100), 10, 128
    errors: dict[str, str] = {}
    t0 = time.perf_counter()
    try:
        res = bench.run_bench(model=model, optimizers=optimizers, steps=steps, warmup=warmup,
                              chunk=min(10, steps), batch_size=batch, device=str(device),
                              autocast=autocast, progress=False, errors=errors)
    except Exception as exc:
        return {"status": _error(exc), "errors": errors}
    return {"status": "ok", "results": res, "errors": errors, "table": bench.format_table(res),
            "seconds": time.perf_counter() - t0, "dry_run_model": "resnet20" if dry else None}


def loop_run(task: str, device: str, runs: Path, budget: Budget, timeout: float) -> dict:
    row: dict[str, Any] = {"task": task, "optimizer": "kfac"}
    if budget.left() < 0:
        row["status"] = "skipped (time budget)"
        return row
    name, over = bench.parse_variant(task)
    cmd = [sys.executable, "-m", "ngbench.runners.cli", "train", f"task={name}", "optimizer=kfac",
           "debug=smoke", f"train.device={device}", f"runs_root={runs}",
           *(f"task.{k}={v}" for k, v in over.items())]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=max(10.0, min(timeout, budget.left())))
        tail = (proc.stderr.strip().splitlines() or [""])[-1][:300]
        row.update(status="ok" if proc.returncode == 0 else f"rc {proc.returncode}: {tail}")
    except subprocess.TimeoutExpired:
        row["status"] = "timeout"
    row["seconds"] = time.perf_counter() - t0
    row["command"] = " ".join(cmd[1:])
    return row


def environment(device: torch.device) -> dict[str, Any]:
    env: dict[str, Any] = {"torch": torch.__version__, "python": platform.python_version(),
                           "host": platform.node(), "device": str(device),
                           "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if device.type == "cuda":
        env.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda,
                   capability=".".join(map(str, torch.cuda.get_device_capability(device))),
                   gpu_memory_gb=torch.cuda.get_device_properties(device).total_memory / 2**30)
    else:
        env["cpu_threads"] = torch.get_num_threads()
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                             capture_output=True, text=True, timeout=10)
        env["commit"] = rev.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        env["commit"] = None
    return env


def markdown(report: dict[str, Any]) -> str:
    env = report["environment"]
    lines = [f"# gpu_check {'(dry run, CPU) ' if report['dry_run'] else ''}"
             f"{env.get('gpu', env['device'])}, torch {env['torch']}, commit {env.get('commit')}",
             "", f"elapsed {report.get('elapsed_s', 0):.0f} s; autocast {report['autocast']}", ""]
    smoke = report.get("smoke", [])
    if smoke:
        tasks = list(dict.fromkeys(r["task"] for r in smoke))
        opts = list(dict.fromkeys(r["optimizer"] for r in smoke))
        cell = {(r["task"], r["optimizer"]): r["status"] for r in smoke}
        lines += ["## smoke (status per optimizer x task)", "",
                  "| optimizer | " + " | ".join(tasks) + " |",
                  "|---" * (len(tasks) + 1) + "|"]
        for o in opts:
            lines.append(f"| {o} | " + " | ".join(
                "ok" if cell.get((t, o)) == "ok" else str(cell.get((t, o), "-"))[:40]
                for t in tasks) + " |")
        evals = report.get("eval", [])
        if evals:
            lines += ["", "evaluate: " + ", ".join(f"{e['task']} {e['status'][:40]}"
                                                   for e in evals)]
    rat = report.get("ratios", {})
    if rat:
        models = [m for m in rat if rat[m].get("status") == "ok"]
        lines += ["", "## step ratio vs SGD (floor = cost model), state memory vs SGD", "",
                  "| optimizer | " + " | ".join(f"{m} x sgd | {m} floor | {m} mem x sgd"
                                                for m in models) + " |",
                  "|---" * (3 * len(models) + 1) + "|"]
        names = list(dict.fromkeys(n for m in models for n in rat[m]["results"]))
        for n in names:
            cells = []
            for m in models:
                r = rat[m]["results"].get(n)
                if r is None:
                    cells += [rat[m]["errors"].get(n, "-")[:40], "-", "-"]
                    continue
                fl = r.get("floor_ratio")
                cells += [f"{r['ratio_vs_sgd']:.2f}", f"{fl:.2f}" if fl else "-",
                          f"{r['mem_vs_sgd']:.1f}"]
            lines.append(f"| {n} | " + " | ".join(cells) + " |")
        for m in rat:
            if rat[m].get("status") != "ok":
                lines.append(f"\n{m}: {rat[m].get('status')}")
    loop = report.get("loop", [])
    if loop:
        lines += ["", "## ngbench train debug=smoke (kfac)", ""]
        lines += [f"- {r['task']}: {r['status']}" for r in loop]
    return "\n".join(lines) + "\n"


def write(report: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name, text in (("gpu_check.json", json.dumps(report, indent=2, default=str)),
                       ("gpu_check.md", markdown(report))):
        tmp = out / (name + ".tmp")
        tmp.write_text(text)
        tmp.replace(out / name)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="scripts/gpu_check.sh", description=__doc__.split("\n")[0])
    p.add_argument("--dry-run", action="store_true",
                   help="run everything on the CPU with tiny sizes (checks the script)")
    p.add_argument("--out", type=Path, default=None,
                   help="output folder (default results/gpu_check; dry run: /tmp/gpu_check_dry)")
    p.add_argument("--budget-s", type=float, default=450.0,
                   help="stop starting new work after this many seconds (default 450)")
    p.add_argument("--tasks", default=",".join(TASKS), help="comma-separated task workloads")
    p.add_argument("--optimizers", default=None,
                   help="smoke optimizers (default: every registered one + kfac:approx=reduce)")
    p.add_argument("--ratio-optimizers", default=",".join(RATIO_OPTIMIZERS),
                   help="optimizers of the step-ratio section")
    p.add_argument("--sections", default="smoke,ratios,loop")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    a = p.parse_args(argv)

    if a.threads:
        torch.set_num_threads(a.threads)
    if not a.dry_run and not torch.cuda.is_available():
        print("gpu_check: error: no CUDA device; use --dry-run to check the script on a CPU",
              file=sys.stderr)
        return 2
    device = torch.device("cpu" if a.dry_run else "cuda")
    autocast = "bf16"
    out = a.out or (Path("/tmp/gpu_check_dry") if a.dry_run else ROOT / "results" / "gpu_check")
    tasks = bench_args.csv_list(a.tasks)
    names = bench_args.csv_list(a.optimizers) if a.optimizers else [*list_optimizers(),
                                                            "kfac:approx=reduce"]
    sections = set(bench_args.csv_list(a.sections))
    budget = Budget(a.budget_s)
    report: dict[str, Any] = {"dry_run": a.dry_run, "autocast": autocast,
                              "environment": environment(device)}
    if "smoke" in sections:
        report["smoke"], report["eval"] = [], []
        for t in tasks:
            rows, ev = smoke_task(t, names, device, autocast, 1 if a.dry_run else 3,
                                  8 if a.dry_run else None, budget)
            report["smoke"] += rows
            report["eval"].append(ev)
            report["elapsed_s"] = budget.elapsed()
            write(report, out)
            print(f"gpu_check: smoke {t}: " + ", ".join(
                f"{r['optimizer']} {r['status'][:60]}" for r in rows if r["status"] != "ok")
                + f" ({sum(r['status'] == 'ok' for r in rows)}/{len(rows)} ok)",
                file=sys.stderr)
    if "ratios" in sections:
        report["ratios"] = {}
        for model in ("small_cnn", "resnet50"):
            report["ratios"][model] = ratios(model, device=device, autocast=autocast,
                                             dry=a.dry_run, budget=budget,
                                             optimizers=bench_args.csv_list(a.ratio_optimizers))
            report["elapsed_s"] = budget.elapsed()
            write(report, out)
            print(f"gpu_check: ratios {model}: {report['ratios'][model]['status']}",
                  file=sys.stderr)
    if "loop" in sections:
        report["loop"] = []
        runs = Path(tempfile.mkdtemp(prefix="gpu_check_runs_"))  # run folders, checkpoints
        try:
            for t in tasks:
                report["loop"].append(loop_run(t, device.type, runs, budget, 120.0))
                report["elapsed_s"] = budget.elapsed()
                write(report, out)
        finally:
            shutil.rmtree(runs, ignore_errors=True)
    report["elapsed_s"] = budget.elapsed()
    write(report, out)
    print(markdown(report))
    print(f"gpu_check: wrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'}",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
