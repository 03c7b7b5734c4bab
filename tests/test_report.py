"""``ngbench report`` on run folders with known numbers, and the W&B mirror read back."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from runners import records, report
from runners.wandb_reader import find_run_file, read_history


def _fake_run(
    root: Path,
    opt: str,
    seed: int,
    *,
    final: float,
    ttt: float | None,
    status: str = "completed",
    step_s: float = 0.01,
    variant: str = "default",
) -> Path:
    run = root / "autoencoder_mnist_tiny" / opt / variant / f"seed{seed}"
    run.mkdir(parents=True)
    rows = [
        {
            "step": s,
            "epoch": s / 10,
            "train_time_s": s * step_s,
            "train_loss": final + 100 / s,
            "full_train_loss": final + 50 / s,
        }
        for s in (10, 20, 30)
    ]
    records.write_metrics(run / "metrics.jsonl", rows)
    (run / "config.yaml").write_text("seed: 0\n")
    records.write_json(
        run / "record.json",
        {
            "task": "autoencoder",
            "dataset": "mnist",
            "flavor": "tiny",
            "optimizer": opt,
            "seed": seed,
            "status": status,
            "target": {"metric": "full_train_loss", "value": 80.0, "mode": "min"},
            "steps_to_target": None if ttt is None else int(ttt / step_s),
            "time_to_target_s": ttt,
            "final_metrics": {"full_train_loss": final},
            "best_metrics": {"full_train_loss": final},
            "mean_step_s": step_s,
        },
    )
    return run


def test_report_table_numbers_and_skips(tmp_path):
    runs = tmp_path / "runs"
    for s, (f, t) in enumerate([(70.0, 1.0), (72.0, 2.0), (74.0, 3.0)]):
        _fake_run(runs, "kfac", s, final=f, ttt=t, step_s=0.02)
    for s, f in enumerate([90.0, 91.0, 92.0]):
        _fake_run(runs, "sgd", s, final=f, ttt=None)
    _fake_run(runs, "adamw", 0, final=85.0, ttt=4.0)
    _fake_run(runs, "adamw", 1, final=86.0, ttt=None, status="failed")
    _fake_run(runs, "adamw", 2, final=math.nan, ttt=None, status="diverged")
    (runs / "orphan" / "seed0").mkdir(parents=True)
    (runs / "orphan" / "seed0" / "config.yaml").write_text("seed: 0\n")

    out = report.report(runs, tmp_path / "out", quiet=True)
    t = out["table"].set_index("optimizer")
    assert t.loc["kfac", "final"] == "72 ± 2 (3)"
    assert t.loc["kfac", "reached"] == "3/3" and t.loc["sgd", "reached"] == "0/3"
    assert t.loc["kfac", "time_to_target_s"] == "2 ± 1 (3)"
    assert t.loc["kfac", "step_vs_sgd"] == 2.0
    assert t.loc["adamw", "diverged"] == 1 and t.loc["adamw", "seeds"] == 2
    assert list(out["table"]["optimizer"]) == ["kfac", "adamw", "sgd"]  # best final first
    # Welch t-test against the best baseline (adamw has 1 finite value -> NaN; vs sgd real)

    assert math.isnan(t.loc["kfac", "p_vs_best_baseline"])
    skipped = {str(p.relative_to(runs)): why for p, why in out["skipped"]}
    assert "status failed" in skipped["autoencoder_mnist_tiny/adamw/default/seed1"]
    assert "no record.json" in skipped["orphan/seed0"]
    for ext in ("md", "csv", "tex"):
        assert (tmp_path / "out" / "tables" / f"summary.{ext}").stat().st_size > 100
    assert pd.read_csv(tmp_path / "out" / "tables" / "summary.csv").shape[0] == 3
    figs = {p.name for p in out["figures"]}
    assert figs == {"curves_autoencoder_mnist_tiny.png", "performance_profile.png"}
    # profile: kfac median 2.0 s is fastest; adamw median over (4.0, inf) = inf; sgd never
    assert out["scores"]["kfac"] == pytest.approx(1.0)
    assert out["scores"]["sgd"] == 0.0


def test_time_to_target_ratio_and_test_against_the_fastest_baseline(tmp_path):
    from scipy import stats

    runs = tmp_path / "runs"
    for s, t in enumerate([1.0, 2.0, 3.0]):
        _fake_run(runs, "kfac", s, final=70.0 + s, ttt=t)
    for s, t in enumerate([4.0, 5.0, 6.0]):
        _fake_run(runs, "adamw", s, final=75.0 + s, ttt=t)
    for s, t in enumerate([7.0, 8.0, 9.0]):
        _fake_run(runs, "sgd", s, final=76.0 + s, ttt=t)
    _fake_run(runs, "mbf", 0, final=71.0, ttt=0.5)
    _fake_run(runs, "mbf", 1, final=99.0, ttt=None)  # a seed that missed: no ratio
    t = report.report(runs, tmp_path / "out", quiet=True)["table"].set_index("optimizer")
    assert t.loc["kfac", "time_vs_fastest_baseline"] == pytest.approx(2.0 / 5.0, abs=1e-3)
    assert t.loc["sgd", "time_vs_fastest_baseline"] == pytest.approx(8.0 / 5.0, abs=1e-3)
    expected = stats.ttest_ind([1.0, 2.0, 3.0], [4.0, 5.0, 6.0], equal_var=False).pvalue
    assert t.loc["kfac", "p_time"] == pytest.approx(expected)
    assert math.isnan(t.loc["adamw", "time_vs_fastest_baseline"])  # the reference itself
    assert math.isnan(t.loc["mbf", "time_vs_fastest_baseline"])


def test_welch_p_matches_scipy():
    from scipy import stats

    a, b = pd.Series([1.0, 2.0, 3.5]), pd.Series([4.0, 5.5, 6.0, 7.0])
    assert report.welch_p(a, b) == pytest.approx(stats.ttest_ind(a, b, equal_var=False).pvalue)


def test_performance_profile_formula():
    # two tasks: A fastest on t1, B twice as slow on t1 and fastest on t2; C 5x slower (cut at 4x)
    df = pd.DataFrame(
        [
            {"task": "t1", "label": "A", "time_to_target_s": 1.0},
            {"task": "t1", "label": "B", "time_to_target_s": 2.0},
            {"task": "t1", "label": "C", "time_to_target_s": 5.0},
            {"task": "t2", "label": "A", "time_to_target_s": 3.0},
            {"task": "t2", "label": "B", "time_to_target_s": 1.5},
            {"task": "t2", "label": "C", "time_to_target_s": None},
        ]
    )
    taus = np.linspace(1, 4, 3001)
    rho, score = report.performance_profile(df, taus)
    assert rho.loc["A", 1.0] == 0.5 and rho.loc["B", 1.0] == 0.5
    # A: rho = 0.5 on [1,2), 1 on [2,4] -> integral (0.5*1 + 1*2)/3 = 0.8333
    assert score["A"] == pytest.approx(2.5 / 3, abs=1e-3)
    assert score["B"] == pytest.approx(2.5 / 3, abs=1e-3)
    assert score["C"] == 0.0


def test_report_cli_on_real_runs_and_wandb_mirror(ngbench, tmp_path):
    p = ngbench("train", "-m", "debug=smoke", "optimizer=sgd,adamw", "seed=0,1", "logger=wandb")
    assert p.returncode == 0, p.stderr
    run = tmp_path / "runs" / "debug" / "smoke" / "autoencoder_mnist_5k_tiny" / "adamw" / "default"
    run = run / "seed1"
    # W&B offline run file: its logged history equals metrics.jsonl
    hist = read_history(find_run_file(run))
    rows = records.read_metrics(run / "metrics.jsonl")
    assert [h["_step"] for h in hist] == [r["step"] for r in rows]
    for h, r in zip(hist, rows, strict=True):
        for k, v in r.items():
            if k != "step":
                assert h[k] == pytest.approx(v, rel=1e-12), k
    p = ngbench("report", "runs", "--out", "rep")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "| adamw" in p.stdout and "| sgd" in p.stdout and "4 runs, 0 skipped" in p.stdout
    assert (tmp_path / "rep" / "figures" / "curves_autoencoder_mnist_5k_tiny.png").exists()
    table = (tmp_path / "rep" / "tables" / "summary.md").read_text()
    assert "(2)" in table  # two seeds per optimizer
    p = ngbench("report", "does-not-exist")
    assert p.returncode == 2 and "does not exist" in p.stdout
    rec = json.loads((run / "record.json").read_text())
    assert rec["status"] == "completed"


def test_paper_numbers_printed_beside_ours_for_full_runs_only():
    pub = pd.DataFrame(
        [
            {
                "task": "resnet",
                "dataset": "imagenet",
                "optimizer": "ngplus",
                "metric": "epochs_to_target",
                "value": 40,
                "status": "verified",
                "source": "NG+ README",
            }
        ]
    )
    assert report.published_for("resnet/imagenet/full", "ngplus", pub) == (
        "40 epochs_to_target (verified; NG+ README)"
    )
    assert report.published_for("resnet/imagenet/tiny", "ngplus", pub) == ""
    assert report.published_for("resnet/imagenet/full", "sgd", pub) == ""
    shipped = report.load_published()
    assert {"task", "dataset", "optimizer", "metric", "value", "source", "status"} <= set(shipped)
