"""The batch-size scaling study: perfect scaling and the critical batch size against
hand-computed curves, the budget rule, the lr-range shift, the headline, and (slow) the smoke
version end to end: tune -> rerun -> report, then a resume that runs nothing."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
from ngbench.runners import leaderboard as lb
from ngbench.runners import scaling as sc
from ngbench.runners import scaling_report as sr
from ngbench.runners import search_space

REPO = Path(__file__).resolve().parent.parent
INF = math.inf


def test_perfect_scaling_is_the_fewest_examples_over_batch_sizes():
    # examples B*S: 32*1000=32000, 64*520=33280, 128*300=38400, 256*250=64000
    assert sr.perfect_scaling([32, 64, 128, 256], [1000, 520, 300, 250]) == 32000
    # a batch size that misses the target does not count; none reached -> inf
    assert sr.perfect_scaling([32, 64], [INF, 400]) == 64 * 400
    assert sr.perfect_scaling([32, 64], [INF, INF]) == INF


def test_critical_batch_is_where_examples_exceed_twice_the_minimum():
    # E_min = 32000, limit 64000: 64 (33280), 128 (38400), 256 (51200) are inside,
    # 512 * 200 = 102400 is beyond -> critical 256
    bs, st = [32, 64, 128, 256, 512], [1000, 520, 300, 200, 200]
    crit, interp = sr.critical_batch(bs, st)
    assert crit == 256
    # log(B*S/limit) at 256: log(0.8); at 512: log(1.6); crossing at fraction
    # -log 0.8 / (log 1.6 - log 0.8) = 0.3219 of the way from log 256 to log 512
    assert interp == pytest.approx(256 * 2 ** (math.log(1.25) / math.log(2)), rel=1e-9)
    assert interp == pytest.approx(320.0, rel=1e-9)
    # a margin of 3 keeps 512 (102400 <= 96000? no) -> still 256; margin 4 keeps all
    assert sr.critical_batch(bs, st, margin=3.0)[0] == 256
    assert sr.critical_batch(bs, st, margin=4.0) == (512, 512)


def test_critical_batch_perfect_scaling_throughout_and_edge_cases():
    # exactly perfect scaling: every batch size inside the margin -> the largest
    assert sr.critical_batch([10, 20, 40], [400, 200, 100]) == (40, 40)
    # a batch size that misses the target ends the walk (it needs more than the budget)
    assert sr.critical_batch([10, 20, 40, 80], [400, 200, INF, 100]) == (20, 20)
    # the smallest batch sizes missing: the walk starts at the first that reaches
    assert sr.critical_batch([10, 20, 40, 80], [INF, 200, 100, 110])[0] == 40  # 8800 > 8000
    # nothing reached
    crit, interp = sr.critical_batch([10, 20], [INF, INF])
    assert math.isnan(crit) and math.isnan(interp)
    # unsorted input is sorted first
    assert sr.critical_batch([40, 10, 20], [100, 400, 200]) == (40, 40)


def test_step_budget_rule_and_eval_period():
    w = sc.load_workloads()["autoencoder"]
    assert w.steps(250) == max(w.min_steps, math.ceil(w.examples / 250))
    assert w.steps(w.batch_sizes[0]) == min(w.max_steps, math.ceil(w.examples / w.batch_sizes[0]))
    assert w.steps(10**6) == w.min_steps
    assert w.steps(1) == w.max_steps
    assert all(w.eval_every(b) * w.evals >= w.steps(b) for b in w.batch_sizes)
    # the leaderboard workload it names exists (overrides and calibrated target come from it)
    for sw in sc.load_workloads().values():
        assert sw.leaderboard in lb.load_workloads()
        assert sw.batch_sizes[-1] / sw.batch_sizes[0] >= 32  # a real range of batch sizes


def _study(tmp_path, optimizers=("sgd", "adamw", "kfac", "shampoo")):
    sw = sc.load_workloads()["autoencoder"]
    base = lb.Settings(workloads={"autoencoder": lb.load_workloads()["autoencoder"]},
                       optimizers=list(optimizers), trials=4, runs_root=tmp_path)
    return sc.Study(base, sw, sc.load_rules(), lb.Target("full_train_loss", 70.0, "min"))


def test_search_range_follows_the_declared_scaling_rule(tmp_path):
    st = _study(tmp_path)
    ref, big = st.sw.ref_batch, st.sw.ref_batch * 4
    w = st.base.workloads["autoencoder"]

    def knobs(batch, opt):
        return [c.knobs for c in lb.tune_cells(st.settings(batch), w, opt)]

    for opt, lr_factor in (("sgd", 4.0), ("adamw", 2.0), ("kfac", 2.0), ("shampoo", 2.0)):
        at_ref, at_big = knobs(ref, opt), knobs(big, opt)
        for a, b in zip(at_ref, at_big, strict=True):
            assert b["lr"] == pytest.approx(a["lr"] * lr_factor, rel=0.01), opt
            for k in set(a) - {"lr", "kl_clip"}:
                assert a[k] == b[k], (opt, k)  # knobs without a rule keep their range
    for a, b in zip(knobs(ref, "kfac"), knobs(big, "kfac"), strict=True):
        assert b["kl_clip"] == pytest.approx(a["kl_clip"] * 4.0, rel=0.01)  # ~ lr^2 ~ B
    cells = lb.tune_cells(st.settings(big), w, "adamw")
    assert all(f"train.batch_size={big}" in c.overrides and
               f"train.steps={st.sw.steps(big)}" in c.overrides and
               "train.stop_at_target=True" in c.overrides for c in cells)
    # different batch sizes never share a run folder key
    keys_ref = {c.key(0) for c in lb.tune_cells(st.settings(ref), w, "adamw")}
    assert not keys_ref & {c.key(0) for c in cells}


def test_every_registered_optimizer_has_a_rule_on_searched_knobs():
    from ngbench.optimizers import list_optimizers

    rules = sc.load_rules()
    for o in list_optimizers():
        r = sc.rule_for(rules, o)
        assert "lr" in r, o
        # every searched step length follows B: a KL clip too (NG+, MBF, SNGD search it since
        # session 5; a rule listing only the K-FAC family left theirs fixed)
        searched = {d.key for d in search_space.load(o).dims}
        assert ("kl_clip" in r) == ("kl_clip" in searched), o


def test_summary_and_headline_against_adamw_at_its_own_best_batch():
    rows = []
    # adamw: best at 256 (time 1.0); kfac: best at 1024 (time 0.5); sgd never at 1024
    spec = {"adamw": {64: (400, 2.0), 256: (110, 1.0), 1024: (60, 1.6)},
            "kfac": {64: (100, 3.0), 256: (26, 1.2), 1024: (8, 0.5)},
            "sgd": {64: (500, 2.5), 256: (200, 1.9), 1024: (INF, INF)}}
    for opt, per in spec.items():
        for b, (steps, t) in per.items():
            for seed, jitter in enumerate((0.95, 1.0, 1.05)):
                rows.append({"phase": "rerun", "optimizer": opt, "batch_size": b, "seed": seed,
                             "trial": "t0", "steps_to_target": steps if steps < INF else None,
                             "time_to_target_s": t * jitter if t < INF else None,
                             "mean_step_s": 0.01, "budget_steps": 1000, "hp.lr": 0.1})
    rer = pd.DataFrame(rows)
    tab = sr.by_batch(rer)
    summ = sr.summary(tab, rer).set_index("optimizer")
    assert summ.loc["adamw", "best_batch"] == 256 and summ.loc["kfac", "best_batch"] == 1024
    assert summ.loc["kfac", "time_vs_adamw_best"] == pytest.approx(0.5)
    assert summ.loc["kfac", "p_vs_adamw_best"] < 0.01
    # kfac: E_min = 64*100 = 6400, 256*26 = 6656 and 1024*8 = 8192 <= 12800 -> critical 1024
    assert summ.loc["kfac", "critical_batch"] == 1024
    # adamw: E_min = 64*400 = 25600, 256*110 = 28160 <= 51200 < 1024*60 = 61440 -> 256
    assert summ.loc["adamw", "critical_batch"] == 256
    # sgd misses at 1024: the walk ends at 256
    assert summ.loc["sgd", "critical_batch"] == 256
    head = sr.headline(summ.reset_index()).iloc[0]
    assert head["best method"] == "kfac" and head["ratio"] == pytest.approx(0.5)
    assert head["its best batch"] == 1024 and head["adamw best batch"] == 256
    assert head["meets_goal"]


@pytest.mark.slow
def test_smoke_scaling_end_to_end_and_resume(tmp_path):
    runs, out = tmp_path / "runs", tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "ngbench.runners.scaling", "--smoke", "--runs-root", str(runs),
           "--out", str(out)]
    first = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stdout + first.stderr
    trials = pd.read_csv(out / "trials.csv")
    counts = trials.groupby(["phase", "optimizer", "batch_size"]).size().to_dict()
    assert counts == {(ph, o, b): n for ph, n in (("tune", 2), ("rerun", 2))
                      for o in ("adamw", "kfac") for b in (50, 100)}
    assert set(trials["target"]) == {300.0} and set(trials["threads"]) == {1}
    # a rerun's seed 0 is its trial
    rer0 = trials[(trials["phase"] == "rerun") & (trials["seed"] == 0)]
    assert set(rer0["path"]) <= set(trials.loc[trials["phase"] == "tune", "path"])
    by = pd.read_csv(out / "tables" / "by_batch.csv")
    assert set(zip(by["optimizer"], by["batch_size"], strict=True)) == {
        (o, b) for o in ("adamw", "kfac") for b in (50, 100)}
    summ = pd.read_csv(out / "tables" / "summary.csv")
    assert set(summ["optimizer"]) == {"adamw", "kfac"}
    assert (out / "tables" / "headline.csv").exists()
    assert (out / "figures" / "scaling.png").exists()
    man = json.loads((out / "manifest.json").read_text())
    assert man["batch_sizes"] == [50, 100] and man["scaling_rules"]["kfac"]["kl_clip"] == 1.0
    assert man["target"]["value"] == 300.0 and man["git"]["commit"]
    # resume: nothing runs again; plan says nothing is left
    again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    assert again.stdout.count(": 0 runs to do in 0 processes") == 4, again.stdout
    plan = subprocess.run([*cmd, "plan"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert "total: 0 runs in 0 processes" in plan.stdout, plan.stdout + plan.stderr


def test_batch_sizes_run_side_by_side_within_the_job_slots(tmp_path, monkeypatch):
    """The batch sizes' drivers share ``--jobs`` process slots: never more than 2 processes,
    and a slot left free by one batch size serves another. The B=50 K-FAC process (B=50 is
    listed first) holds its slot until a B=100 process has finished: one batch size after the
    other, that never happens and it times out."""
    _, st = sc.parse(["--smoke", "--runs-root", str(tmp_path / "runs"),
                      "--out", str(tmp_path / "out")])
    assert list(st.sw.batch_sizes) == [50, 100] and st.base.jobs == 2
    real, lock = subprocess.Popen, threading.Lock()
    live: list[str] = []
    peak, waited_out = [0], []
    b100_done = threading.Event()

    class Fake:  # an `ngbench train -m` process that makes no run
        returncode = 0

        def __init__(self, cmd, **kw):
            self.b = next(a for a in cmd if a.startswith("train.batch_size="))[17:]
            self.kfac = "optimizer=kfac" in cmd
            with lock:
                live.append(self.b)
                peak[0] = max(peak[0], len(live))

        def wait(self, timeout=None):
            if self.b == "50" and self.kfac:
                waited_out.append(not b100_done.wait(timeout=20))
            else:
                time.sleep(0.05)
            with lock:
                live.remove(self.b)
            if self.b == "100":
                b100_done.set()
            return 0

    def popen(cmd, *a, **kw):
        return Fake(cmd) if "ngbench.runners.cli" in cmd else real(cmd, *a, **kw)

    monkeypatch.setattr(lb.subprocess, "Popen", popen)
    sc.run_phases(st, ["tune"])
    assert waited_out == [False]  # released by a B=100 process, not by the timeout
    assert peak[0] == 2


def test_target_comes_from_the_leaderboard_or_the_command_line(tmp_path):
    w = lb.load_workloads()["autoencoder"]
    missing = tmp_path / "targets.yaml"
    with pytest.raises(SystemExit, match=r"no calibrated target for 'autoencoder'.*--target"):
        sc.resolve_target(None, "autoencoder", missing, w)
    t, src = sc.resolve_target(None, "autoencoder", missing, w, required=False)  # plan only
    assert (t.metric, t.mode) == ("full_train_loss", "min") and "plan only" in src
    lb.write_targets(missing, {"autoencoder": {"metric": "full_train_loss", "value": 61.5,
                                               "mode": "min"}}, "test")
    assert sc.resolve_target(None, "autoencoder", missing, w)[0].value == 61.5
    assert sc.resolve_target("70", "autoencoder", missing, w)[0].value == 70.0
    with pytest.raises(SystemExit, match="--target must be a number or 'task'"):
        sc.resolve_target("low", "autoencoder", missing, w)
