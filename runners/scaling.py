"""Where second order pays off: a batch-size scaling study (issue 17).

    python -m runners.scaling --workload autoencoder        # everything (= make scaling)
    python -m runners.scaling plan --workload resnet        # runs left, expected wall time
    python -m runners.scaling report --workload autoencoder # tables/figure from finished runs
    python -m runners.scaling --smoke --runs-root /tmp/sc --out /tmp/sc/out   # CI size

The leaderboard's tuning driver (:mod:`runners.leaderboard`) with the batch size as the outer
loop. For every batch size B of ``configs/scaling/workloads.yaml`` and every optimizer:

1. ``tune``: the leaderboard's ``--trials`` (8) scrambled-Sobol points of the optimizer's
   declared search space, the step-length knobs shifted by the declared scaling rule
   (``configs/scaling/lr_scaling.yaml``: value × (B / ref_batch) ** exponent), one run each at
   seed 0 with ``train.batch_size=B`` and the step budget ``steps(B) = clamp(ceil(examples /
   B), min_steps, max_steps)``; every run stops at the target (``train.stop_at_target``).
2. ``rerun``: the best trial at that B (leaderboard ranking: time to target, then final metric)
   rerun with ``--seeds`` (3) seeds; its seed 0 is the trial itself.
3. ``report``: :mod:`runners.scaling_report` (steps and time to target vs B, perfect scaling,
   critical batch size, best batch size, the headline ratio) under ``results/scaling/<workload>``.

The target is the leaderboard's calibrated one (``configs/leaderboard/targets.yaml``: what tuned
SGD/AdamW reach at the reference batch size and budget), so "reached" means the same here as on
the leaderboard; ``--target VALUE`` (or ``task``: the task's own) replaces it. It is written to
``<out>/target.yaml`` and passed to every run, so it must be known before ``tune``.
Resumable: run folders are found by their overrides (the leaderboard's run cache).
"""

from __future__ import annotations

import argparse
import math
import signal
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from . import leaderboard as lb
from . import records, search_space

REPO = records.REPO_ROOT
SC_CONFIGS = REPO / "configs" / "scaling"
WORKLOADS_FILE = SC_CONFIGS / "workloads.yaml"
RULES_FILE = SC_CONFIGS / "lr_scaling.yaml"
DEFAULT_OPTIMIZERS = ("sgd", "adamw", "kfac", "shampoo")
SEED_METHODS = ("tekfac", "mbf", "ngplus", "sngd")  # the four seed papers (DESIGN.md)
FALLBACK_SEED_METHOD = "tekfac"
PHASES = ("tune", "rerun", "report")


@dataclass(frozen=True)
class ScalingWorkload:
    name: str
    leaderboard: str
    batch_sizes: tuple[int, ...]
    ref_batch: int
    ref_steps: int
    examples: int
    min_steps: int
    max_steps: int
    evals: int
    eval_s: float
    step_ms: dict[str, Any]

    def steps(self, batch: int) -> int:
        """The step budget at batch size ``batch`` (see configs/scaling/workloads.yaml)."""
        return min(self.max_steps, max(self.min_steps, math.ceil(self.examples / batch)))

    def eval_every(self, batch: int) -> int:
        return max(1, math.ceil(self.steps(batch) / self.evals))

    def step_s(self, optimizer: str, batch: int) -> float:
        """Prior of one step's wall time (s) for ``plan``."""
        over = self.step_ms["overhead"]
        ms = over.get(optimizer, over["default"]) + self.step_ms["per_example"] * batch
        return float(ms) / 1e3


KEYS = ("leaderboard", "batch_sizes", "ref_batch", "ref_steps", "examples", "min_steps",
        "max_steps", "evals", "eval_s", "step_ms")


def load_workloads(path: Path = WORKLOADS_FILE) -> dict[str, ScalingWorkload]:
    raw = yaml.safe_load(Path(path).read_text()) or {}
    out = {}
    for name, w in raw.items():
        missing = [k for k in KEYS if k not in w]
        if missing:
            raise ValueError(f"{path}: workload {name!r} lacks {missing}")
        bs = [int(b) for b in w["batch_sizes"]]
        if bs != sorted(set(bs)) or len(bs) < 2:
            raise ValueError(f"{path}: {name}.batch_sizes must be >= 2 increasing sizes, got {bs}")
        out[name] = ScalingWorkload(
            name, str(w["leaderboard"]), tuple(bs), int(w["ref_batch"]), int(w["ref_steps"]),
            int(w["examples"]), int(w["min_steps"]), int(w["max_steps"]), int(w["evals"]),
            float(w["eval_s"]), dict(w["step_ms"]),
        )
    return out


def load_rules(path: Path = RULES_FILE) -> dict[str, dict[str, float]]:
    raw = yaml.safe_load(Path(path).read_text()) or {}
    if "default" not in raw:
        raise ValueError(f"{path}: add a `default:` entry (e.g. {{lr: 0.5}})")
    return {k: {kk: float(vv) for kk, vv in (v or {}).items()} for k, v in raw.items()}


def rule_for(rules: dict[str, dict[str, float]], optimizer: str) -> dict[str, float]:
    """The knobs of ``optimizer``'s declared space that follow the batch size, with exponents
    (a rule's knob that the optimizer does not search is dropped)."""
    keys = {d.key for d in search_space.load(optimizer).dims}
    return {k: e for k, e in rules.get(optimizer, rules["default"]).items() if k in keys}


def knob_scale(rules: dict[str, dict[str, float]], optimizers: list[str], batch: int,
               ref_batch: int) -> dict[str, dict[str, float]]:
    return {o: {k: (batch / ref_batch) ** e for k, e in rule_for(rules, o).items()}
            for o in optimizers}


@dataclass
class Study:
    """One workload's study: ``base`` holds what every batch size shares (runs root, jobs,
    trials, seeds, target file, leaderboard workload); :meth:`settings` one batch size's."""

    base: lb.Settings
    sw: ScalingWorkload
    rules: dict[str, dict[str, float]]
    target: lb.Target
    smoke_steps: int | None = None

    def steps(self, batch: int) -> int:
        return self.smoke_steps or self.sw.steps(batch)

    def eval_every(self, batch: int) -> int:
        return max(1, math.ceil(self.steps(batch) / self.sw.evals))

    def settings(self, batch: int) -> lb.Settings:
        t = self.target
        # the dearest optimizers first: their processes start first, so the two job slots
        # finish together (longest-first scheduling of the leaderboard's process pool)
        opts = sorted(self.base.optimizers, key=lambda o: -self.sw.step_s(o, batch))
        return replace(
            self.base,
            optimizers=opts,
            batch_size=batch,
            steps=self.steps(batch),
            eval_every=self.eval_every(batch),
            knob_scale=knob_scale(self.rules, self.base.optimizers, batch, self.sw.ref_batch),
            # `True`, as Hydra's multirun writes it into overrides.yaml (the run cache's key)
            extra=(*self.base.extra, "train.stop_at_target=True",
                   f"task.target={{metric:{t.metric},value:{t.value!r},mode:{t.mode}}}"),
        )

    def drivers(self, slots: threading.Semaphore | None = None) -> list[tuple[int, lb.Driver]]:
        """One leaderboard driver per batch size, ranking trials against the study's target
        (``<out>/target.yaml`` records it; the ranking does not read it back); ``slots``: the
        job slots they share when they run side by side."""
        out = []
        for b in self.sw.batch_sizes:
            d = lb.Driver(self.settings(b), log=_prefixed(f"[B={b}] "), slots=slots)
            # one fixed target for every workload (a per-instance override of the method)
            d.target = lambda workload: self.target  # type: ignore[method-assign]
            out.append((b, d))
        return out


def _prefixed(prefix: str) -> Any:
    return lambda msg: print("\n".join(prefix + line for line in str(msg).splitlines()),
                             flush=True)


# -- the phases ------------------------------------------------------------------------
def run_phases(st: Study, phases: list[str]) -> None:
    """``tune`` then ``rerun`` (those of ``phases``) at every batch size, the batch sizes side
    by side: one thread per batch size, all sharing ``--jobs`` process slots. A batch size's
    rerun starts as soon as its own tuning ends, and a slot a batch size leaves idle (its last,
    longest process still running) goes to another batch size's runs: with stop-at-target the
    run times are too uneven to order the processes well in advance."""
    slots = threading.BoundedSemaphore(st.base.jobs)

    def one(b: int, d: lb.Driver) -> None:
        if "tune" in phases:
            d.log(f"tune: {st.steps(b)} steps")
            d.tune()
        if "rerun" in phases and not lb.STOPPING:
            d.rerun()

    drivers = st.drivers(slots)
    pool = ThreadPoolExecutor(max_workers=len(drivers))
    try:
        for f in [pool.submit(one, b, d) for b, d in drivers]:
            f.result()
    except KeyboardInterrupt:
        lb.stop_children()  # before waiting: the threads wait on their processes
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown()



def trial_rows(st: Study) -> list[dict[str, Any]]:
    """Every finished tune and rerun run, scored against the study's target."""
    index = lb.finished_runs(st.base)
    rows = []
    for b, d in st.drivers():
        d.index = index
        cells = [*d.all_tune_cells(), *d.best_trials()]
        for r in lb._rows(cells, index, lambda _w, _f: st.target):
            r.update({"batch_size": b, "budget_steps": st.steps(b), "metric": st.target.metric,
                      "target": st.target.value, "mode": st.target.mode,
                      "jobs": st.base.jobs})
            rows.append(r)
    return rows


def report(st: Study) -> dict[str, Any]:
    from . import scaling_report

    return scaling_report.write(trial_rows(st), st.base.out, manifest=manifest(st))


def plan(st: Study) -> dict[str, float]:
    """Runs still to do and the expected wall time: per pending run its step budget × its step
    time (the median measured ``mean_step_s`` of finished runs of that optimizer at that batch
    size, else the prior of workloads.yaml) + its evaluations, × ``fill`` (the fraction of the
    budget a run uses: 1 for a trial that misses the target, less for one that stops at it;
    0.75 assumed) + a process start-up each; ÷ jobs. Reruns whose best trial is not known yet
    are counted as every optimizer's (seeds - 1) new seeds."""
    index = lb.finished_runs(st.base)
    fill = 0.75
    measured: dict[tuple[str, int], list[float]] = {}
    for row in trial_rows(st):
        if row.get("mean_step_s"):
            measured.setdefault((row["optimizer"], row["batch_size"]), []).append(
                float(row["mean_step_s"]))
    total_s = 0.0
    n_runs = n_procs = 0
    for b, d in st.drivers():
        d.index = index
        tune_cells = d.all_tune_cells()
        t_groups = lb.pending_groups(tune_cells, index)
        tuned = not t_groups
        r_cells = d.best_trials() if tuned else []
        r_groups = lb.pending_groups(r_cells, index) if tuned else {}
        per_opt: dict[str, int] = {}
        for groups in (t_groups, r_groups):
            for (_p, _w, opt, _rest, seeds), g in groups.items():
                per_opt[opt] = per_opt.get(opt, 0) + len(seeds) * len(g)
        procs = len(t_groups) + len(r_groups)
        if not tuned:
            for opt in st.base.optimizers:
                per_opt[opt] = per_opt.get(opt, 0) + st.base.seeds - 1
            procs += len(st.base.optimizers)
        runs_b = sum(per_opt.values())
        secs = 0.0
        for opt, n in per_opt.items():
            m = sorted(measured.get((opt, b), []))
            step_s = m[len(m) // 2] if m else st.sw.step_s(opt, b)
            secs += n * fill * (st.steps(b) * step_s + st.sw.evals * st.sw.eval_s)
        secs += procs * lb.STARTUP_S
        print(f"batch {b:>5}: {st.steps(b):>5} steps, {runs_b:>4} runs to do in {procs:>3} "
              f"processes, {secs / 3600:.2f} job-hours")
        total_s += secs
        n_runs += runs_b
        n_procs += procs
    hours = total_s / st.base.jobs / 3600
    print(f"total: {n_runs} runs in {n_procs} processes; expected wall time with "
          f"{st.base.jobs} jobs: {hours:.2f} h")
    return {"runs": n_runs, "processes": n_procs, "hours": hours}


def manifest(st: Study) -> dict[str, Any]:
    lb_man = lb.Driver(st.settings(st.sw.ref_batch)).manifest()
    lb_man.pop("batch_size", None)
    return {
        **lb_man,
        "study": "batch-size scaling (issue 17)",
        "workload": st.sw.name,
        "batch_sizes": list(st.sw.batch_sizes),
        "steps_per_batch_size": {b: st.steps(b) for b in st.sw.batch_sizes},
        "eval_every_per_batch_size": {b: st.eval_every(b) for b in st.sw.batch_sizes},
        "budget_rule": {k: getattr(st.sw, k) for k in
                        ("ref_batch", "ref_steps", "examples", "min_steps", "max_steps", "evals")},
        "scaling_rules": {o: rule_for(st.rules, o) for o in st.base.optimizers},
        "target": {"metric": st.target.metric, "value": st.target.value,
                   "mode": st.target.mode},
    }


# -- target and optimizers -------------------------------------------------------------------
def resolve_target(arg: str | None, lb_name: str, targets_file: Path,
                   workload: lb.Workload, *, required: bool = True) -> tuple[lb.Target, str]:
    """The study's target: ``arg`` (a number, or ``task``), else the leaderboard's calibrated
    one; without either, the task's own when not ``required`` (``plan``), else an error."""
    if arg is None:
        t = lb.read_targets(targets_file).get(lb_name)
        if not t and not required:
            print(f"note: no calibrated target for {lb_name!r} yet; planning with the task's "
                  "own (the run count and budgets do not depend on it)")
            return task_target(workload), "the task's own target (plan only)"
        if not t:
            raise SystemExit(
                f"scaling: error: no calibrated target for {lb_name!r} in {targets_file}; run "
                f"`python -m ngbench.runners.leaderboard tune calibrate --workloads {lb_name} "
                f"--optimizers sgd,adamw` first, or pass --target VALUE (or --target task)")
        return lb.Target(t["metric"], float(t["value"]), t["mode"]), f"{targets_file}"
    if arg == "task":
        return task_target(workload), "the task's own target"
    try:
        value = float(arg)
    except ValueError:
        raise SystemExit(
            f"scaling: error: --target must be a number or 'task', got {arg!r}") from None
    tt = task_target(workload)
    return lb.Target(tt.metric, value, tt.mode), "--target"


def task_target(workload: lb.Workload) -> lb.Target:
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from . import train  # noqa: F401  (registers the schemas and resolvers)

    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base=None):
        cfg = compose("train", overrides=[*workload.overrides, "optimizer=adamw"])
    from ngbench.tasks.config import task_config

    node = OmegaConf.to_container(cfg.task, resolve=True)
    assert isinstance(node, dict)
    t = task_config({str(k): v for k, v in node.items()}).resolved_target
    if t is None:
        raise ValueError(f"task {cfg.task.name!r} declares no target; pass --target VALUE")
    return lb.Target(str(t.metric), float(t.value), str(t.mode))


def seed_method(workload: str, board: Path) -> str:
    """The fastest seed-paper method of the tuned leaderboard on ``workload`` (``board``:
    results/leaderboard/tables/tuned_leaderboard.csv), else ``FALLBACK_SEED_METHOD``."""
    if board.exists():
        import pandas as pd

        tab = pd.read_csv(board)
        tab = tab[(tab["workload"] == workload) & tab["optimizer"].isin(SEED_METHODS)]
        if not tab.empty:
            r = pd.to_numeric(tab["time_vs_adamw"], errors="coerce").fillna(math.inf)
            return str(tab.loc[r.idxmin(), "optimizer"])
    return FALLBACK_SEED_METHOD


# -- command line -----------------------------------------------------------------------
SMOKE: dict[str, Any] = {"optimizers": "adamw,kfac", "trials": 2, "seeds": 2, "steps": 12,
                         "batch_sizes": (50, 100),
                         # reached within 12 steps by most trials (the task's 100 is not)
                         "target": {"autoencoder": "300"}}


def parse(argv: list[str] | None = None) -> tuple[list[str], Study]:
    ap = argparse.ArgumentParser(
        prog="ngbench scaling",
        description="Batch-size scaling study: at every batch size, tune every optimizer with "
        "the leaderboard's search space (step-length knobs shifted by a declared scaling rule) "
        "and trial budget, rerun the best trial over seeds, and report steps/time to target vs "
        "batch size, critical and best batch sizes. Resumable.")
    ap.add_argument("phases", nargs="*", metavar="PHASE",
                    help=f"phases, in this order: {', '.join(PHASES)} (default: all); `plan` "
                    "counts the runs left and the expected wall time")
    ap.add_argument("--workload", default="autoencoder",
                    help="a workload of configs/scaling/workloads.yaml")
    ap.add_argument("--optimizers",
                    help=f"comma list (default: {','.join(DEFAULT_OPTIMIZERS)} + --seed-method)")
    ap.add_argument("--seed-method", default="auto",
                    help="the seed-paper method added to the defaults (auto: the fastest of "
                    f"{', '.join(SEED_METHODS)} on the tuned leaderboard, else "
                    f"{FALLBACK_SEED_METHOD})")
    ap.add_argument("--batch-sizes", help="comma list replacing the workload's")
    ap.add_argument("--trials", type=int, default=8, help="trials per optimizer per batch size")
    ap.add_argument("--seeds", type=int, default=3, help="seeds of the reruns")
    ap.add_argument("--jobs", type=int, default=2, help="parallel runs (one thread each)")
    ap.add_argument("--qmc-seed", type=int, default=0)
    ap.add_argument("--target", help="target value (default: the leaderboard's calibrated one; "
                    "`task`: the task's own target)")
    ap.add_argument("--steps", type=int, help="override every batch size's step budget (smoke)")
    ap.add_argument("--runs-root", type=Path, help="default: runs/scaling/<workload>")
    ap.add_argument("--out", type=Path, help="default: results/scaling/<workload>")
    ap.add_argument("--smoke", action="store_true",
                    help="CI size: adamw+kfac, 2 trials, 2 seeds, 12 steps, batch 50 and 100, "
                    "a loose target (autoencoder: 300; else the task's)")
    a = ap.parse_args(argv)
    bad = [p for p in a.phases if p not in (*PHASES, "all", "plan")]
    if bad:
        ap.error(f"unknown phase(s) {bad}; valid choices: {', '.join(PHASES)}, plan, all")
    sws = load_workloads()
    if a.workload not in sws:
        ap.error(f"unknown workload {a.workload!r}; valid choices: {', '.join(sws)} "
                 f"({WORKLOADS_FILE.relative_to(REPO)})")
    sw = sws[a.workload]
    lbw = lb.load_workloads()
    if sw.leaderboard not in lbw:
        ap.error(f"{WORKLOADS_FILE}: {a.workload}.leaderboard={sw.leaderboard!r} is not in "
                 f"{lb.WORKLOADS_FILE}")
    sm = SMOKE if a.smoke else {}
    from ngbench.optimizers import list_optimizers

    board = REPO / "results" / "leaderboard" / "tables" / "tuned_leaderboard.csv"
    if a.optimizers or sm:
        opts = (a.optimizers or sm["optimizers"]).split(",")
    else:
        extra = seed_method(sw.leaderboard, board) if a.seed_method == "auto" else a.seed_method
        opts = [*DEFAULT_OPTIMIZERS, *([extra] if extra not in DEFAULT_OPTIMIZERS else [])]
    bad = [o for o in opts if o not in list_optimizers()]
    if bad:
        ap.error(f"unknown optimizer(s) {bad}; valid choices: {', '.join(list_optimizers())}")
    if a.batch_sizes or sm:
        bs = [int(x) for x in a.batch_sizes.split(",")] if a.batch_sizes else sm["batch_sizes"]
        sw = replace(sw, batch_sizes=tuple(sorted(set(bs))))
    runs_root = (a.runs_root or REPO / "runs" / "scaling" / a.workload).resolve()
    out = (a.out or REPO / "results" / "scaling" / a.workload).resolve()
    smoke_target = sm["target"].get(a.workload, "task") if sm else None
    everything = not a.phases or "all" in a.phases
    phases = list(PHASES) if everything else [p for p in (*PHASES, "plan") if p in a.phases]
    target, source = resolve_target(a.target or smoke_target, sw.leaderboard,
                                    lb.TARGETS_FILE, lbw[sw.leaderboard],
                                    required=phases != ["plan"])
    target_file = out / "target.yaml"
    old = lb.read_targets(target_file).get(sw.leaderboard)
    if old and float(old["value"]) != target.value and phases != ["plan"]:
        print(f"note: the target changed from {old['value']} ({old.get('from')}) to "
              f"{target.value:.6g} ({source}): runs made for the old target are not reused")
    base = lb.Settings(
        workloads={sw.leaderboard: lbw[sw.leaderboard]},
        optimizers=opts,
        trials=sm["trials"] if sm and a.trials == 8 else a.trials,
        seeds=sm["seeds"] if sm and a.seeds == 3 else a.seeds,
        jobs=a.jobs,
        qmc_seed=a.qmc_seed,
        runs_root=runs_root,
        out=out,
        targets_file=target_file,
        command="python -m ngbench.runners.scaling " + " ".join(argv if argv is not None
                                                        else sys.argv[1:]),
    )
    if phases != ["plan"]:
        lb.write_targets(target_file, {sw.leaderboard: {
            "metric": target.metric, "value": target.value, "mode": target.mode,
            "from": source}}, base.command)
    st = Study(base, sw, load_rules(), target, smoke_steps=a.steps or sm.get("steps"))
    return phases, st


def main(argv: list[str] | None = None) -> int:
    phases, st = parse(argv)
    try:
        for o in st.base.optimizers:
            rule_for(st.rules, o)
    except search_space.SearchSpaceError as exc:
        print(f"scaling: error: {exc}", file=sys.stderr)
        return 2

    def stop(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, stop)
    steps = {"report": report, "plan": plan}
    try:
        runs = [p for p in phases if p in ("tune", "rerun")]
        if runs:
            print(f"== {' + '.join(runs)}", flush=True)
            run_phases(st, runs)
        for phase in phases:
            if phase in steps:
                print(f"== {phase}", flush=True)
                steps[phase](st)
    except KeyboardInterrupt:
        lb.stop_children()
        print("scaling: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
