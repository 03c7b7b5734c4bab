"""The fair comparison (issue 16): declared search spaces, equal budgets, calibrated targets.

    python -m runners.leaderboard                      # everything (= make leaderboard)
    python -m runners.leaderboard tune --workloads autoencoder --optimizers kfac,adamw
    python -m runners.leaderboard report               # tables/figures from finished runs
    python -m runners.leaderboard plan                 # runs left, expected wall time
    python -m runners.leaderboard --smoke --runs-root /tmp/lb --out /tmp/lb/out   # CI size

Phases (each resumes: a run folder whose record is finished is never run again):

1. ``tune``: for every workload × optimizer, ``--trials`` points (8) drawn from the optimizer's
   declared space (:mod:`runners.search_space`, scrambled Sobol, ``--qmc-seed``), each one real
   run at seed 0 with the workload's step budget. The trials of one optimizer on one workload
   are one ``ngbench train -m ... lb_trial=<t0>,<t1>,...`` sweep over generated config files
   (a Hydra sweep is a cartesian product; a trial moves several knobs together).
2. ``calibrate``: per workload, the first-order baseline trial (sgd, adamw) with the best target
   metric within the budget is rerun with ``--seeds`` seeds; the target is the median over the
   seeds of their best metric (AlgoPerf's rule). Written to ``configs/leaderboard/targets.yaml``
   (``--targets-file``; ``<out>/targets.yaml`` under ``--smoke``) with the command that
   produced it.
3. ``rerun``: trials are ranked by training-clock time to that target (a trial that never
   reaches it ranks behind every one that does, by its final metric); the best trial of every
   optimizer is rerun with ``--seeds`` seeds (its seed 0 is the trial itself).
4. ``defaults``: the no-tuning track, every optimizer at its defaults, ``--seeds`` seeds.
5. ``report``: tables and figures (:mod:`runners.leaderboard_report`).

Time and steps to target are read from each run's ``metrics.jsonl`` against the calibrated
target, so a trial never depends on the target it is later scored against. ``--jobs``
``ngbench train -m`` processes run at a time (Hydra's basic launcher inside each), every run
with ``train.threads=1``. Knobs outside a declared space are at the preset's default on every
workload (``configs/tuned/`` files are undone). Every finished run's small files (record,
metrics, config, overrides) are copied to ``<out>/runs/`` so the tables can be rebuilt from a
fresh clone (``report --runs-root results/leaderboard/runs``). SIGTERM or Ctrl-C stops the
running sweeps; the same command resumes.
"""

from __future__ import annotations

import argparse
import enum
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from . import records, search_space

REPO = records.REPO_ROOT
LB_CONFIGS = REPO / "configs" / "leaderboard"
WORKLOADS_FILE = LB_CONFIGS / "workloads.yaml"
TARGETS_FILE = LB_CONFIGS / "targets.yaml"
BASELINES = ("sgd", "adamw")
REFERENCE = "adamw"
DONE = ("completed", "diverged")
# overrides of every leaderboard run that do not change its result (not part of a cell's key)
NEUTRAL_PREFIXES = ("train.threads=", "train.progress=", "runs_root=", "train.eval_every=")
PHASES = ("tune", "calibrate", "rerun", "defaults", "report")
STARTUP_S = 5.0  # seconds one `ngbench train -m` process takes to start (2-core machine)


@dataclass(frozen=True)
class Workload:
    name: str
    overrides: tuple[str, ...]
    steps: int
    eval_every: int
    batch_sizes: tuple[int, ...]
    est_run_s: float | None = None  # prior estimate of one run's wall time (plan)


def load_workloads(path: Path = WORKLOADS_FILE) -> dict[str, Workload]:
    raw = yaml.safe_load(Path(path).read_text())
    out = {}
    for name, w in raw.items():
        missing = {"overrides", "steps", "eval_every", "batch_sizes"} - set(w)
        if missing:
            raise ValueError(f"{path}: workload {name!r} lacks {sorted(missing)}")
        out[name] = Workload(
            name, tuple(w["overrides"]), int(w["steps"]), int(w["eval_every"]),
            tuple(int(b) for b in w["batch_sizes"]), w.get("est_run_s"),
        )
    return out


def fmt_value(v: Any) -> str:
    """A value as a Hydra override writes it (floats in their short 3-significant form)."""
    if isinstance(v, bool):
        return str(v).lower()
    if v is None:
        return "null"
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


@dataclass(frozen=True)
class Cell:
    """Runs that differ only in their seed: one ``ngbench train -m ... seed=a,b`` process."""

    phase: str
    workload: str
    optimizer: str
    trial: str  # "t3" (tune trial 3), "default" (no-tuning track)
    overrides: tuple[str, ...]  # result-changing overrides, without the seed
    seeds: tuple[int, ...]
    knobs: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def key(self, seed: int) -> frozenset[str]:
        return frozenset((*self.overrides, f"seed={seed}"))

    @property
    def trial_config(self) -> str | None:
        """Name of the generated trial config this cell selects (None: defaults)."""
        pre = f"{TRIAL_GROUP}="
        return next((o[len(pre):] for o in self.overrides if o.startswith(pre)), None)


@dataclass
class Settings:
    workloads: dict[str, Workload]
    optimizers: list[str]
    trials: int = 8
    seeds: int = 3
    jobs: int = 2
    qmc_seed: int = 0
    search_batch_size: bool = False
    batch_size: int | None = None  # fixes train.batch_size in every run (a batch-size study)
    # per optimizer, a factor on sampled knob values (a batch-size study shifts the lr range)
    knob_scale: dict[str, dict[str, float]] = field(default_factory=dict)
    steps: int | None = None  # overrides every workload's budget (smoke)
    eval_every: int | None = None
    extra: tuple[str, ...] = ()  # extra overrides of every run (smoke: a small batch)
    runs_root: Path = REPO / "runs" / "leaderboard"
    out: Path = REPO / "results" / "leaderboard"
    targets_file: Path = TARGETS_FILE
    command: str = ""
    git_commit: bool = False


# -- cells ------------------------------------------------------------------------
def untuned_overrides(w: Workload, optimizer: str, searched: Iterable[str]) -> list[str]:
    """Overrides that undo ``configs/tuned/<task>_<optimizer>.yaml`` (applied whenever that pair
    meets, and not removable with ``tuned=null``): every optimizer key it sets goes back to the
    preset's value, so a knob outside the declared space is at its default on every workload."""
    task = next((o.split("=", 1)[1] for o in w.overrides if o.startswith("task=")), None)
    tuned = REPO / "configs" / "tuned" / f"{task}_{optimizer}.yaml"
    if task is None or not tuned.exists():
        return []
    preset = preset_values(optimizer)
    keys = (yaml.safe_load(tuned.read_text()) or {}).get("optimizer", {}) or {}
    return [f"optimizer.{k}={fmt_value(preset.get(k))}" for k in keys if k not in set(searched)]


def preset_values(preset: str) -> dict[str, Any]:
    """Every hyperparameter of ``configs/optimizer/<preset>.yaml`` as composed: the optimizer's
    config dataclass defaults with the preset's differences on top."""
    from ngbench.optimizers import make_config

    raw = yaml.safe_load((REPO / "configs" / "optimizer" / f"{preset}.yaml").read_text())
    raw.pop("defaults", None)  # Hydra's defaults list (the schema): not a hyperparameter
    return {k: (str(v) if isinstance(v, enum.Enum) else v)
            for k, v in make_config(raw).to_dict().items()}


def base_overrides(
    s: Settings, w: Workload, optimizer: str, searched: Iterable[str] = ()
) -> list[str]:
    """Overrides of every run of ``optimizer`` on ``w`` except the searched knobs ``searched``:
    the workload, the step budget, the pinned numerics, and the optimizer's defaults."""
    ss = search_space.load(optimizer)
    steps = s.steps or w.steps
    return [
        *w.overrides,
        f"optimizer={optimizer}",
        f"train.steps={steps}",
        *([f"train.batch_size={s.batch_size}"] if s.batch_size is not None else []),
        *s.extra,
        *(f"optimizer.{k}={fmt_value(v)}" for k, v in ss.fixed.items()),
        *untuned_overrides(w, optimizer, [*searched, *ss.fixed]),
    ]


def trial_points(s: Settings, w: Workload, optimizer: str) -> list[dict[str, Any]]:
    """The ``s.trials`` quasi-random points of ``optimizer`` on ``w`` (same points on every
    workload unless the batch size is searched: then it is one more Sobol dimension)."""
    ss = search_space.load(optimizer)
    if s.search_batch_size:
        dim = search_space.Dim("batch_size", "choice", w.batch_sizes)
        ss = search_space.SearchSpace(ss.optimizer, (*ss.dims, dim), ss.fixed, ss.path)
    points = ss.sample(s.trials, seed=s.qmc_seed)
    scale = s.knob_scale.get(optimizer, {})
    return [{k: float(f"{v * scale[k]:.3g}") if k in scale else v for k, v in p.items()}
            for p in points]


LIVE: set[subprocess.Popen] = set()  # running `ngbench train` processes (stopped on SIGTERM)
STOPPING: list[bool] = []  # non-empty once interrupted: no new process starts
_ARCHIVE = threading.Lock()  # drivers may run side by side (the scaling study's batch sizes)


def stop_children(grace_s: float = 15.0) -> None:
    """SIGINT to every running ``ngbench train -m`` (its current run checkpoints and records
    `interrupted`), then SIGKILL after ``grace_s`` (a sweep goes on to its next run after a
    SIGINT; a killed run resumes from its last checkpoint). The next invocation resumes all."""
    STOPPING.append(True)
    for proc in list(LIVE):
        proc.send_signal(signal.SIGINT)
    deadline = time.monotonic() + grace_s
    for proc in list(LIVE):
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


TRIAL_GROUP = "lb_trial"  # generated config group: one file per trial, see write_trial_configs


def trial_name(optimizer: str, i: int, knobs: dict[str, Any]) -> str:
    """``<optimizer>_t<i>_<hash of the values>``: the folder component of a trial's runs; the
    hash makes a changed search space give new folders, never a clash with old runs."""
    blob = json.dumps(knobs, sort_keys=True, default=str).encode()
    return f"{optimizer}_t{i}_{hashlib.sha1(blob).hexdigest()[:6]}"


def trial_config_text(knobs: dict[str, Any]) -> str:
    opt = {k: v for k, v in knobs.items() if k != "batch_size"}
    body: dict[str, Any] = {"optimizer": opt}
    if "batch_size" in knobs:
        body["train"] = {"batch_size": knobs["batch_size"]}
    return "# @package _global_\n" + yaml.safe_dump(body, sort_keys=False)


def write_trial_configs(s: Settings, cells: Iterable[Cell]) -> Path:
    """One ``<runs_root>/_trial_configs/lb_trial/<trial>.yaml`` per trial (on Hydra's search
    path), so that the trials of one optimizer run as one ``-m lb_trial=a,b,...`` sweep: Hydra
    sweeps are cartesian products, and a trial changes several knobs together."""
    root = s.runs_root / "_trial_configs"
    for c in cells:
        name = c.trial_config
        if name:
            path = root / TRIAL_GROUP / f"{name}.yaml"
            text = trial_config_text(c.knobs)
            if not path.exists() or path.read_text() != text:
                records.atomic_write_text(path, text)
    return root


def knob_overrides(knobs: dict[str, Any]) -> list[str]:
    return [
        f"train.batch_size={v}" if k == "batch_size" else f"optimizer.{k}={fmt_value(v)}"
        for k, v in knobs.items()
    ]


def tune_cells(s: Settings, w: Workload, optimizer: str) -> list[Cell]:
    """The tuning trials of one optimizer on one workload (seed 0). A batch-size study sets
    ``s.batch_size`` (and ``s.steps``) per outer iteration and reuses every phase as it is."""
    points = trial_points(s, w, optimizer)
    base = base_overrides(s, w, optimizer, points[0])
    return [
        Cell("tune", w.name, optimizer, f"t{i}",
             (*base, f"{TRIAL_GROUP}={trial_name(optimizer, i, k)}"), (0,), k)
        for i, k in enumerate(points)
    ]


def default_cell(s: Settings, w: Workload, optimizer: str) -> Cell:
    base = base_overrides(s, w, optimizer)
    return Cell("defaults", w.name, optimizer, "default", tuple(base), tuple(range(s.seeds)))


# -- the run cache ----------------------------------------------------------------------
def _cell_key(overrides: Iterable[str]) -> frozenset[str]:
    return frozenset(o for o in overrides if not o.startswith(NEUTRAL_PREFIXES))


def index_runs(runs_root: Path) -> dict[frozenset[str], Path]:
    """Finished run folders under ``runs_root`` by their result-changing overrides (read from
    Hydra's ``.hydra/overrides.yaml``), so the driver never depends on how folders are named."""
    out: dict[frozenset[str], Path] = {}
    if not Path(runs_root).exists():
        return out
    for rec_path in Path(runs_root).rglob(records.RECORD):
        folder = rec_path.parent
        ov = folder / ".hydra" / "overrides.yaml"
        if not ov.exists():
            ov = folder / "overrides.yaml"  # the copy under results/leaderboard/runs
        if not ov.exists():
            continue
        try:
            status = records.read_json(rec_path).get("status")
        except (OSError, ValueError):
            continue
        if status in DONE:
            out[_cell_key(yaml.safe_load(ov.read_text()) or [])] = folder
    return out


def finished_runs(
    s: Settings, live: dict[frozenset[str], Path] | None = None
) -> dict[frozenset[str], Path]:
    """Every finished run of ``s``: the archived copies committed under ``<out>/runs`` (so a
    fresh clone resumes from the committed records instead of running them again), overlaid by
    the live folders under ``s.runs_root`` (``live``: that index, already scanned)."""
    return {**index_runs(s.out / "runs"), **(index_runs(s.runs_root) if live is None else live)}


def pending_groups(
    cells: list[Cell], index: dict[frozenset[str], Path]
) -> dict[tuple[Any, ...], list[Cell]]:
    """The unfinished runs of ``cells``, one group per ``ngbench train -m`` process: cells
    that differ only in their trial and miss the same seeds."""
    groups: dict[tuple[Any, ...], list[Cell]] = {}
    for c in cells:
        seeds = tuple(sd for sd in c.seeds if c.key(sd) not in index)
        if seeds:
            rest = tuple(o for o in c.overrides if not o.startswith(f"{TRIAL_GROUP}="))
            groups.setdefault((c.phase, c.workload, c.optimizer, rest, seeds), []).append(c)
    return groups


def run_cells(s: Settings, cells: list[Cell], *, log: Any = print,
              slots: threading.Semaphore | None = None) -> dict[frozenset[str], Path]:
    """Run the seeds of ``cells`` that have no finished folder yet and return the index of
    finished runs afterwards. Cells that differ only in their trial share one ``ngbench train
    -m`` process (one start-up for all the trials of an optimizer); ``s.jobs`` processes run at
    a time, each with one torch thread. ``slots``: a semaphore shared by several ``run_cells``
    running side by side (threads), so that together they start at most its count of
    processes."""
    index = finished_runs(s)
    groups = pending_groups(cells, index)
    n_runs = sum(len(k[-1]) * len(v) for k, v in groups.items())
    log(f"[{cells[0].phase if cells else '-'}] {len(cells)} cells: {n_runs} runs to do in "
        f"{len(groups)} processes ({s.jobs} jobs)")
    trial_root = write_trial_configs(s, cells)
    logs = s.runs_root / "_logs"
    logs.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "NGBENCH_JOBS": str(s.jobs), "WANDB_MODE": os.environ.get("WANDB_MODE", "offline")}

    def launch(item: tuple[tuple[Any, ...], list[Cell]]) -> tuple[str, int, float]:
        (phase, workload, optimizer, rest, seeds), group = item
        trials = [c.trial_config for c in group if c.trial_config]
        cmd = [
            sys.executable, "-m", "ngbench.runners.cli", "train", "-m", *rest,
            *([f"{TRIAL_GROUP}={','.join(trials)}"] if trials else []),
            f"seed={','.join(map(str, seeds))}",
            f"train.eval_every={s.eval_every or s.workloads[workload].eval_every}",
            "train.threads=1", "train.progress=false", f"runs_root={s.runs_root}",
            f"hydra.searchpath=[file://{trial_root}]",
            "hydra/job_logging=none", "hydra/hydra_logging=none",
        ]
        tag = hashlib.sha1(" ".join(cmd).encode()).hexdigest()[:10]
        with slots or nullcontext():
            t0 = time.perf_counter()
            if STOPPING:
                return "(not started: stopping)", -1, 0.0
            with open(logs / f"{phase}_{workload}_{optimizer}_{tag}.log", "w") as f:
                f.write(" ".join(cmd) + "\n")
                f.flush()
                proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f,
                                        stderr=subprocess.STDOUT)
                LIVE.add(proc)
                proc.wait()
                LIVE.discard(proc)
        what = f"{workload}/{optimizer}: {len(group)} x {len(seeds)} runs"
        return what, proc.returncode, time.perf_counter() - t0

    pool = ThreadPoolExecutor(max_workers=s.jobs)
    try:
        for what, rc, dt in pool.map(launch, groups.items()):
            log(f"  {what} rc={rc} {dt:.1f}s")
            archive(s, index_runs(s.runs_root), commit=False)  # as they finish, not per phase
    except KeyboardInterrupt:
        stop_children()
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown()
    live = index_runs(s.runs_root)  # one scan serves the archive and the returned index
    archive(s, live)
    return finished_runs(s, live)


def archive(s: Settings, index: dict[frozenset[str], Path], *, commit: bool = True) -> None:
    """Copy every finished run's small files (record, metrics, config, overrides) under
    ``<out>/runs/`` (the raw records committed with the results); with ``--git-commit`` and
    ``commit``, commit them."""
    dest_root = s.out / "runs"
    root = Path(s.runs_root)
    if dest_root.resolve() == root.resolve():
        return
    with _ARCHIVE:
        _copy_records(index, root, dest_root)
    if s.git_commit and commit:
        subprocess.run(["git", "add", str(s.out)], cwd=REPO, check=False)
        subprocess.run(
            ["git", "commit", "-q", "-m", f"leaderboard: raw run records ({len(index)} runs)",
             "--", str(s.out)], cwd=REPO, check=False,
        )


def _copy_records(index: dict[frozenset[str], Path], root: Path, dest_root: Path) -> None:
    for folder in index.values():
        try:
            rel = folder.relative_to(root)
        except ValueError:
            continue
        dest = dest_root / rel
        if (dest / records.RECORD).exists():
            continue
        dest.mkdir(parents=True, exist_ok=True)
        for name in (records.METRICS, records.CONFIG):
            if (folder / name).exists():
                shutil.copy2(folder / name, dest / name)
        ov = folder / ".hydra" / "overrides.yaml"
        if ov.exists():
            shutil.copy2(ov, dest / "overrides.yaml")
        shutil.copy2(folder / records.RECORD, dest / records.RECORD)  # last: marks it complete


# -- scoring one run against a target ------------------------------------------------
@dataclass(frozen=True)
class Target:
    metric: str
    value: float
    mode: str  # min | max


def task_target(folder: Path) -> Target:
    t = records.read_json(folder / records.RECORD)["target"]
    return Target(t["metric"], float(t["value"]), t["mode"])


def score_run(folder: Path, target: Target) -> dict[str, Any]:
    """Steps and training-clock time at the first evaluation that reaches ``target`` (None if
    never), the final and best metric, the mean step time and the status of one run."""
    rec = records.read_json(folder / records.RECORD)
    rows = records.read_metrics(folder / records.METRICS)
    better = (lambda a, b: a <= b) if target.mode == "min" else (lambda a, b: a >= b)
    raw = [(r["step"], r.get("train_time_s"), r.get(target.metric)) for r in rows]
    vals: list[tuple[int, float | None, float]] = [
        (st, t, float(v)) for st, t, v in raw if v is not None and v == v
    ]
    hit = next(((st, t) for st, t, v in vals if better(v, target.value)), (None, None))
    metric_values = [v for *_, v in vals]
    best: float | None = None
    if metric_values:
        best = min(metric_values) if target.mode == "min" else max(metric_values)
    final = vals[-1][2] if vals and rec["status"] == "completed" else None
    return {
        "status": rec["status"],
        "steps_to_target": hit[0],
        "time_to_target_s": hit[1],
        "final": final,
        "best": best,
        "mean_step_s": rec.get("mean_step_s"),
        "train_time_s": rec.get("train_time_s"),
        "threads": (rec.get("hardware") or {}).get("torch_threads"),
        "commit": (rec.get("git") or {}).get("commit"),
        "path": str(folder),
    }


def rank_key(row: dict[str, Any], mode: str) -> tuple[int, float]:
    """Sort key of a trial: reached first (by time), then the rest by final metric."""
    if row["time_to_target_s"] is not None:
        return (0, float(row["time_to_target_s"]))
    f = row["final"]
    if f is None:  # diverged or failed: behind every run that finished
        return (2, 0.0)
    return (1, float(f) if mode == "min" else -float(f))


def best_metric_key(row: dict[str, Any], mode: str) -> float:
    b = row["best"]
    if b is None or row["status"] != "completed":
        return float("inf")
    return float(b) if mode == "min" else -float(b)


# -- targets --------------------------------------------------------------------------
def read_targets(path: Path) -> dict[str, dict[str, Any]]:
    if not Path(path).exists():
        return {}
    return (yaml.safe_load(Path(path).read_text()) or {}).get("targets", {}) or {}


def write_targets(path: Path, targets: dict[str, dict[str, Any]], command: str) -> None:
    head = (
        "# Calibrated targets of the fair comparison (written by runners/leaderboard.py\n"
        "# `calibrate`): per workload, the median over seeds of the best target metric that the\n"
        "# best tuned first-order baseline (sgd, adamw; best trial by metric) reaches within the\n"
        "# step budget (AlgoPerf's target-setting rule). Read by the leaderboard tables.\n"
    )
    body = {"command": command, "commit": records.git_commit().get("commit"), "targets": targets}
    records.atomic_write_text(Path(path), head + yaml.safe_dump(body, sort_keys=False))


def _rows(cells: list[Cell], index: dict[frozenset[str], Path], target_of: Any) -> list[dict]:
    out = []
    for c in cells:
        for sd in c.seeds:
            folder = index.get(c.key(sd))
            if folder is None:
                continue
            row = {"phase": c.phase, "workload": c.workload, "optimizer": c.optimizer,
                   "trial": c.trial, "seed": sd, **{f"hp.{k}": v for k, v in c.knobs.items()}}
            row.update(score_run(folder, target_of(c.workload, folder)))
            out.append(row)
    return out


# -- the phases ------------------------------------------------------------------------
class Driver:
    def __init__(self, s: Settings, log: Any = print,
                 slots: threading.Semaphore | None = None):
        self.s, self.log = s, log
        self.slots = slots  # shared with drivers running beside this one (run_cells)
        self.index: dict[frozenset[str], Path] = {}

    def _run(self, cells: list[Cell]) -> dict[frozenset[str], Path]:
        return run_cells(self.s, cells, log=self.log, slots=self.slots)

    def all_tune_cells(self) -> list[Cell]:
        return [c for w in self.s.workloads.values() for o in self.s.optimizers
                for c in tune_cells(self.s, w, o)]

    def tune(self) -> None:
        self.index = self._run(self.all_tune_cells())

    def _tune_rows(self, workload: str, optimizers: Iterable[str], target: Target | None):
        w = self.s.workloads[workload]
        cells = [c for o in optimizers for c in tune_cells(self.s, w, o)]
        return _rows(cells, self.index, lambda _w, f: target or task_target(f))

    def calibration_cells(self) -> dict[str, Cell]:
        """Per workload, the best baseline trial by target metric, with every seed."""
        out = {}
        for wname in self.s.workloads:
            base = [o for o in BASELINES if o in self.s.optimizers]
            rows = self._tune_rows(wname, base, None)
            if not rows:
                continue
            mode = task_target(Path(rows[0]["path"])).mode
            best = min(rows, key=lambda r: best_metric_key(r, mode))
            cell = next(c for c in tune_cells(self.s, self.s.workloads[wname], best["optimizer"])
                        if c.trial == best["trial"])
            out[wname] = Cell("calibrate", wname, cell.optimizer, cell.trial, cell.overrides,
                              tuple(range(self.s.seeds)), cell.knobs)
        return out

    def calibrate(self) -> dict[str, dict[str, Any]]:
        self.index = finished_runs(self.s)
        cells = self.calibration_cells()
        self.index = self._run(list(cells.values()))
        import statistics

        targets = read_targets(self.s.targets_file)
        for wname, c in cells.items():
            folders = [self.index[c.key(sd)] for sd in c.seeds if c.key(sd) in self.index]
            if not folders:
                continue
            tt = task_target(folders[0])
            bests = [score_run(f, tt)["best"] for f in folders]
            bests = [b for b in bests if b is not None]
            if not bests:
                continue
            targets[wname] = {
                "metric": tt.metric,
                # exact: a rounded median could miss its own seed (2 of 3 must reach it)
                "value": float(statistics.median(bests)),
                "mode": tt.mode,
                "from": f"{c.optimizer} {c.trial} "
                + " ".join(knob_overrides(c.knobs)),
                "seeds": len(bests),
                "best_per_seed": [float(b) for b in bests],
                "steps": self.s.steps or self.s.workloads[wname].steps,
                "task_default": tt.value,
            }
        write_targets(self.s.targets_file, targets, self.s.command)
        self.log(f"targets -> {self.s.targets_file}")
        return targets

    def target(self, workload: str) -> Target | None:
        t = read_targets(self.s.targets_file).get(workload)
        return Target(t["metric"], float(t["value"]), t["mode"]) if t else None

    def best_trials(self) -> list[Cell]:
        """Per workload and optimizer, its best trial against the calibrated target."""
        out = []
        for wname, w in self.s.workloads.items():
            tgt = self.target(wname)
            if tgt is None:
                self.log(f"  {wname}: no calibrated target yet (run calibrate); skipped")
                continue
            for o in self.s.optimizers:
                rows = self._tune_rows(wname, [o], tgt)
                if not rows:
                    continue
                best = min(rows, key=lambda r: rank_key(r, tgt.mode))
                cell = next(c for c in tune_cells(self.s, w, o) if c.trial == best["trial"])
                out.append(Cell("rerun", wname, o, cell.trial, cell.overrides,
                                tuple(range(self.s.seeds)), cell.knobs))
        return out

    def rerun(self) -> None:
        self.index = finished_runs(self.s)
        self.index = self._run(self.best_trials())

    def defaults_cells(self) -> list[Cell]:
        return [default_cell(self.s, w, o) for w in self.s.workloads.values()
                for o in self.s.optimizers]

    def defaults(self) -> None:
        self.index = self._run(self.defaults_cells())

    def trial_table(self) -> list[dict[str, Any]]:
        """Every run of the comparison, scored against its workload's calibrated target (the
        task's own target where none is calibrated yet)."""
        self.index = finished_runs(self.s)
        cells = [*self.all_tune_cells(), *self.calibration_cells().values(),
                 *self.best_trials(), *self.defaults_cells()]

        def target_of(wname: str, folder: Path) -> Target:
            return self.target(wname) or task_target(folder)

        rows = _rows(cells, self.index, target_of)
        for r in rows:
            t = target_of(r["workload"], Path(r["path"]))
            r.update({"metric": t.metric, "target": t.value, "mode": t.mode,
                      "calibrated": self.target(r["workload"]) is not None,
                      "jobs": self.s.jobs})
        return rows

    def report(self) -> dict[str, Any]:
        from . import leaderboard_report

        rows = self.trial_table()
        return leaderboard_report.write(rows, self.s.out, manifest=self.manifest(), log=self.log)

    def plan(self) -> dict[str, tuple[int, int]]:
        """Runs and processes still to do per phase, and the expected wall time: the mean wall
        time of the finished runs of each workload (record ``started``..``finished``) times
        its pending runs, plus a process start-up each, divided by the jobs. Phases after an
        unfinished one are counted at their most (every seed of every cell new but seed 0)."""
        self.index = finished_runs(self.s)
        s, n_w, n_o = self.s, len(self.s.workloads), len(self.s.optimizers)
        walls: dict[str, list[float]] = {}
        for key, folder in self.index.items():
            wall = _wall_s(folder)
            for wl, wk in s.workloads.items():
                if wall is not None and set(wk.overrides) <= key:
                    walls.setdefault(wl, []).append(wall)

        def pending(cells: list[Cell]) -> tuple[int, int, dict[str, int]]:
            per: dict[str, int] = {}
            groups = pending_groups(cells, self.index)
            for (_, workload, *_rest, seeds), group in groups.items():
                per[workload] = per.get(workload, 0) + len(seeds) * len(group)
            return sum(per.values()), len(groups), per

        out: dict[str, tuple[int, int]] = {}
        per_w: dict[str, int] = {}
        tune = pending(self.all_tune_cells())
        cal = pending(list(self.calibration_cells().values())) if tune[0] == 0 else (
            n_w * (s.seeds - 1), n_w, {w: s.seeds - 1 for w in s.workloads})
        calibrated = all(self.target(w) for w in s.workloads)
        rer = pending(self.best_trials()) if calibrated and cal[0] == 0 else (
            n_w * n_o * (s.seeds - 1), n_w * n_o, {w: n_o * (s.seeds - 1) for w in s.workloads})
        dflt = pending(self.defaults_cells())
        total_s = 0.0
        for name, (runs, procs, per) in zip(("tune", "calibrate", "rerun", "defaults"),
                                            (tune, cal, rer, dflt), strict=True):
            out[name] = (runs, procs)
            for w, n in per.items():
                per_w[w] = per_w.get(w, 0) + n
            total_s += procs * STARTUP_S
            self.log(f"{name:<9} {runs:>5} runs to do in {procs:>4} processes")
        unknown: list[str] = []
        prior: list[str] = []
        for w, n in per_w.items():
            if walls.get(w):
                total_s += n * sum(walls[w]) / len(walls[w])
            elif n and (est := s.workloads[w].est_run_s):
                total_s += n * float(est)
                prior.append(w)
            elif n:
                unknown.append(w)
        self.log(f"expected wall time with {s.jobs} jobs: {total_s / s.jobs / 3600:.2f} h"
                 + (f" (est_run_s of workloads.yaml for {prior}: no finished run yet)"
                    if prior else "")
                 + (f" + the runs of {unknown} (no estimate)" if unknown else ""))
        return out

    def manifest(self) -> dict[str, Any]:
        return {
            "command": self.s.command,
            "git": records.git_commit(),
            "packages": {**records.package_versions(), **_more_versions()},
            "jobs": self.s.jobs,
            "torch_threads_per_job": 1,
            "trials_per_optimizer": self.s.trials,
            "seeds": self.s.seeds,
            "sampler": f"scipy.stats.qmc.Sobol(scramble=True, rng={self.s.qmc_seed})",
            "search_batch_size": self.s.search_batch_size,
            "batch_size": self.s.batch_size,
            "workloads": {
                k: {"overrides": list(w.overrides), "steps": self.s.steps or w.steps,
                    "eval_every": self.s.eval_every or w.eval_every,
                    "batch_sizes": list(w.batch_sizes), "extra": list(self.s.extra)}
                for k, w in self.s.workloads.items()
            },
            "targets": read_targets(self.s.targets_file),
            "search_spaces": {o: search_space.load(o).as_dict() for o in self.s.optimizers},
        }


def _wall_s(folder: Path) -> float | None:
    from datetime import datetime

    try:
        rec = records.read_json(folder / records.RECORD)
        a, b = datetime.fromisoformat(rec["started"]), datetime.fromisoformat(rec["finished"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return (b - a).total_seconds()


def _more_versions() -> dict[str, str | None]:
    from importlib import metadata

    out: dict[str, str | None] = {}
    for name in ("scipy", "pandas", "schnetpack", "sacrebleu", "sentencepiece"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


# -- command line -----------------------------------------------------------------------
SMOKE: dict[str, Any] = {
    "workloads": ["autoencoder"], "optimizers": ["adamw", "kfac"], "trials": 2, "seeds": 3,
    "steps": 12, "eval_every": 4, "extra": ("train.batch_size=100",),
}


def parse(argv: list[str] | None = None) -> tuple[list[str], Settings]:
    ap = argparse.ArgumentParser(
        prog="ngbench leaderboard",
        description="The fair comparison: tune every optimizer with the same number of "
        "quasi-random trials from its declared search space, calibrate targets on the tuned "
        "first-order baselines, rerun the best trials over seeds, score the no-tuning track, "
        "and write the leaderboard. Resumable: finished runs are never run again.",
    )
    ap.add_argument("phases", nargs="*", metavar="PHASE",
                    help=f"phases to run, in this order: {', '.join(PHASES)} (default: all); "
                    "`plan` counts the runs left and the expected wall time")
    ap.add_argument("--workloads", help="comma list (default: every one in workloads.yaml)")
    ap.add_argument("--optimizers", help="comma list (default: every registered optimizer)")
    ap.add_argument("--trials", type=int, default=8, help="trials per optimizer per workload")
    ap.add_argument("--seeds", type=int, default=3,
                    help="seeds of calibration and reruns (odd: the target is the median of the "
                    "baseline's seeds, so with an even count its median seed misses it)")
    ap.add_argument("--jobs", type=int, default=2, help="parallel runs (one thread each)")
    ap.add_argument("--qmc-seed", type=int, default=0, help="seed of the scrambled Sobol points")
    ap.add_argument("--search-batch-size", action="store_true",
                    help="add the workload's batch-size choice list to every search space")
    ap.add_argument("--steps", type=int, help="override every workload's step budget")
    ap.add_argument("--runs-root", type=Path, default=REPO / "runs" / "leaderboard")
    ap.add_argument("--out", type=Path, default=REPO / "results" / "leaderboard")
    ap.add_argument("--targets-file", type=Path, default=None,
                    help=f"calibrated targets (default: {TARGETS_FILE.relative_to(REPO)}; "
                    "--smoke: <out>/targets.yaml)")
    ap.add_argument("--git-commit", action="store_true",
                    help="git-commit <out> (raw run records, tables) after every phase")
    ap.add_argument("--smoke", action="store_true",
                    help="CI size: autoencoder, adamw+kfac, 2 trials, 3 seeds, 12 steps")
    a = ap.parse_args(argv)
    bad = [p for p in a.phases if p not in (*PHASES, "all", "plan")]
    if bad:
        ap.error(f"unknown phase(s) {bad}; valid choices: {', '.join(PHASES)}, all")
    workloads = load_workloads()
    sm = SMOKE if a.smoke else {}
    names = a.workloads.split(",") if a.workloads else sm.get("workloads", list(workloads))
    bad = [n for n in names if n not in workloads]
    if bad:
        ap.error(f"unknown workload(s) {bad}; valid choices: {', '.join(workloads)}")
    from ngbench.optimizers import list_optimizers

    opts = a.optimizers.split(",") if a.optimizers else sm.get("optimizers", list_optimizers())
    bad = [o for o in opts if o not in list_optimizers()]
    if bad:
        ap.error(f"unknown optimizer(s) {bad}; valid choices: {', '.join(list_optimizers())}")
    s = Settings(
        workloads={n: workloads[n] for n in names},
        optimizers=opts,
        trials=sm.get("trials", a.trials) if a.smoke and a.trials == 8 else a.trials,
        seeds=sm.get("seeds", a.seeds) if a.smoke and a.seeds == 3 else a.seeds,
        jobs=a.jobs,
        qmc_seed=a.qmc_seed,
        search_batch_size=a.search_batch_size,
        steps=a.steps or sm.get("steps"),
        eval_every=sm.get("eval_every"),
        extra=tuple(sm.get("extra", ())),
        runs_root=a.runs_root.resolve(),
        out=a.out.resolve(),
        targets_file=(a.targets_file or (a.out / "targets.yaml" if a.smoke else TARGETS_FILE)),
        command="python -m ngbench.runners.leaderboard " + " ".join(argv if argv is not None
                                                            else sys.argv[1:]),
        git_commit=a.git_commit,
    )
    everything = not a.phases or "all" in a.phases
    phases = list(PHASES) if everything else [p for p in (*PHASES, "plan") if p in a.phases]
    return phases, s


def main(argv: list[str] | None = None) -> int:
    phases, s = parse(argv)
    try:
        for o in s.optimizers:
            search_space.load(o)
    except search_space.SearchSpaceError as exc:
        print(f"leaderboard: error: {exc}", file=sys.stderr)
        return 2
    d = Driver(s)

    def stop(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, stop)
    try:
        for phase in phases:
            print(f"== {phase}", flush=True)
            getattr(d, phase)()
            if s.git_commit and phase == "calibrate":
                subprocess.run(["git", "commit", "-q", "-m", "leaderboard: calibrated targets",
                                "--", str(s.targets_file)], cwd=REPO, check=False)
    except KeyboardInterrupt:
        stop_children()
        print("leaderboard: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
