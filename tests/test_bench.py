"""``ngbench bench`` (runners/bench.py): a few steps on both benchmark models through the real
CLI entry; the JSON schema and the ratio bookkeeping (no timing assertions)."""

from __future__ import annotations

import json

import pytest

from runners import bench, cli


@pytest.mark.parametrize(
    ("model", "opts"), [("small_cnn", "sgd,kfac"), ("autoencoder", "adamw,kfac")]
)
def test_bench_json_schema_and_ratios(tmp_path, capsys, model, opts):
    out = tmp_path / "bench.json"
    rc = cli.main(["bench", "--model", model, "--optimizers", opts, "--steps", "4",
                   "--warmup", "1", "--chunk", "2", "--threads", "1", "--batch-size", "8",
                   "--json", str(out), "--quiet"])
    assert rc == 0
    res = json.loads(out.read_text())
    assert set(res) == {"sgd", "adamw", "kfac"}  # both baselines always measured
    for name, r in res.items():
        for key in ("mean_step_s", "ratio_vs_sgd", "ratio_vs_adamw", "phases", "peak_mem_mb",
                    "cpu_step_s", "max_rss_mb"):
            assert key in r, (name, key)
        assert r["steps"] == 4 and r["mean_step_s"] > 0 and r["cpu_step_s"] >= 0
        assert r["ratio_vs_sgd"] == pytest.approx(r["mean_step_s"] / res["sgd"]["mean_step_s"])
        assert r["ratio_vs_adamw"] == pytest.approx(
            r["mean_step_s"] / res["adamw"]["mean_step_s"])
        assert {"forward", "backward", "optimizer"} <= set(r["phases"])
    assert res["sgd"]["ratio_vs_sgd"] == 1.0 and res["adamw"]["ratio_vs_adamw"] == 1.0
    kfac = res["kfac"]
    assert {"statistics", "inverse", "precondition"} <= set(kfac["phases"])
    assert kfac["refresh_every"] == 100 and kfac["peak_mem_mb"] > res["sgd"]["peak_mem_mb"]
    assert "kfac" in capsys.readouterr().out  # the printed table


def test_default_steps_cover_two_refresh_periods():
    res = bench.run_bench(model="autoencoder", optimizers=["kfac"], batch_size=2, warmup=0,
                          chunk=50, progress=False)
    # kfac refreshes every 100 steps: the window is max(200, 2 x 100) steps, interleaved
    assert {r["steps"] for r in res.values()} == {200}
    assert res["kfac"]["phases"]["inverse"] > 0  # refresh steps fell inside the window


def test_bad_arguments_name_the_choice(capsys):
    assert bench.main(["--model", "resnet"]) == 2
    assert "small_cnn" in capsys.readouterr().err
    assert bench.main(["--optimizers", "nope"]) == 2
    assert "kfac" in capsys.readouterr().err
    assert bench.main(["--peers", "nope"]) == 2
    assert "asdl" in capsys.readouterr().err


def test_variants_run_side_by_side(tmp_path):
    """``name:key=value`` entries run one optimizer at two settings in the same process."""
    assert bench.parse_variant("ekfac:projection_dtype=float32:scale_every=20") == (
        "ekfac", {"projection_dtype": "float32", "scale_every": 20})
    out = tmp_path / "bench.json"
    rc = cli.main(["bench", "--model", "small_cnn", "--optimizers",
                   "ekfac,ekfac:projection_dtype=float32", "--steps", "2", "--warmup", "0",
                   "--threads", "1", "--batch-size", "4", "--json", str(out), "--quiet"])
    assert rc == 0
    res = json.loads(out.read_text())
    assert {"ekfac", "ekfac:projection_dtype=float32"} <= set(res)


@pytest.mark.parametrize(
    ("entry", "match"),
    [("ekfac:projection_dtype", "expected name:key=value"),
     ("ekfac:bogus=1", "bogus"),
     ("ekfac:projection_dtype=int8", "projection_dtype")],
)
def test_bad_variants_name_the_key(capsys, entry, match):
    rc = cli.main(["bench", "--optimizers", entry, "--steps", "1", "--warmup", "0", "--quiet",
                   "--batch-size", "2", "--threads", "1"])
    assert rc == 2
    assert match in capsys.readouterr().err


def test_repeat_reports_medians_and_every_ratio(tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = cli.main(["bench", "--model", "autoencoder", "--optimizers", "kfac", "--steps", "2",
                   "--warmup", "0", "--threads", "1", "--batch-size", "4", "--repeat", "3",
                   "--json", str(out), "--quiet"])
    assert rc == 0
    res = json.loads(out.read_text())
    for r in res.values():
        assert r["repeats"] == 3 and len(r["ratio_vs_sgd_runs"]) == 3
        assert r["ratio_vs_sgd"] == sorted(r["ratio_vs_sgd_runs"])[1]  # the median
        assert min(r["ratio_vs_adamw_runs"]) <= r["ratio_vs_adamw"] <= max(
            r["ratio_vs_adamw_runs"])
    assert res["sgd"]["ratio_vs_sgd_runs"] == [1.0, 1.0, 1.0]
    table = capsys.readouterr().out
    assert "median of 3 repeats" in table and "x sgd range" in table


def test_combine_repeats_medians():
    def run(step, phase):
        return {"sgd": {"mean_step_s": 1.0, "ratio_vs_sgd": 1.0, "ratio_vs_adamw": 1.0,
                        "cpu_step_s": 1.0, "phases": {}, "peak_mem_mb": 1.0, "max_rss_mb": 5.0},
                "kfac": {"mean_step_s": step, "ratio_vs_sgd": step, "ratio_vs_adamw": step,
                         "cpu_step_s": step, "phases": {"statistics": phase},
                         "peak_mem_mb": step, "max_rss_mb": 5.0}}
    got = bench.combine_repeats([run(1.5, 0.2), run(1.1, 0.4), run(1.2, 0.1)])
    k = got["kfac"]
    assert k["mean_step_s"] == 1.2 and k["ratio_vs_sgd"] == 1.2
    assert k["phases"]["statistics"] == 0.2 and k["peak_mem_mb"] == 1.5
    assert k["ratio_vs_sgd_runs"] == [1.5, 1.1, 1.2] and k["repeats"] == 3
    single = run(1.3, 0.3)
    assert bench.combine_repeats([single]) is single
