"""``ngbench bench`` (runners/bench.py): a few steps on both benchmark models through the real
CLI entry; the JSON schema and the ratio bookkeeping (no timing assertions)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ngbench.runners import bench, cli, costmodel


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


# --------------------------------------------------------------------------- workloads, floor
def test_task_workload_through_the_cli(tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = cli.main(["bench", "--task", "recommender:model=dlrm", "--optimizers",
                   "kfac,kfac:approx=reduce", "--steps", "2", "--warmup", "1", "--chunk", "1",
                   "--threads", "1", "--batch-size", "8", "--json", str(out), "--quiet"])
    assert rc == 0
    res = json.loads(out.read_text())
    assert set(res) == {"sgd", "adamw", "kfac", "kfac:approx=reduce"}
    assert {r["model"] for r in res.values()} == {"recommender:model=dlrm"}
    for name, r in res.items():
        assert r["floor_ratio"] >= 1.0 and r["mem_floor_mb"] > 0, name
        assert set(r["floor_phases"]) == {"statistics", "inverse", "precondition", "update"}
        assert r["excess_phase"] in (None, *r["floor_phases"], "other")
    assert res["sgd"]["mem_vs_sgd"] == 1.0
    assert res["adamw"]["mem_vs_sgd"] == pytest.approx(2.0, rel=1e-2)  # + step counters
    assert res["kfac"]["mem_vs_sgd"] > 1.0 and "QG" in res["kfac"]["memory"]
    err = capsys.readouterr().err
    assert "does not cover one refresh period of kfac (every 100)" in err  # issue 15 item 7


@pytest.mark.parametrize("task", ["autoencoder", "resnet", "transformer", "schnet",
                                  "recommender"])
def test_every_task_benches_with_the_config_train_composes(task, tmp_path):
    """The bench builds each tiny flavor from the config ``ngbench train task=<name>``
    composes (the transformer's train budget interpolates the schema's ``task.flavor``, which
    a bare load of its YAML does not have), and trains its default batch."""
    out = tmp_path / "bench.json"
    assert cli.main(["bench", "--task", task, "--optimizers", "sgd", "--steps", "1",
                     "--warmup", "0", "--chunk", "1", "--threads", "1", "--no-floor",
                     "--json", str(out), "--quiet"]) == 0
    res = json.loads(out.read_text())
    assert res["sgd"]["finite"] and res["sgd"]["batch_size"] > 1
    if task == "transformer":
        from ngbench.tasks.config import task_config

        tiny = task_config({"name": task}).train_by_flavor["tiny"]
        assert res["sgd"]["batch_size"] == tiny["batch_size"]


def test_bad_task_names_the_choices(capsys):
    assert bench.main(["--task", "nope"]) == 2
    assert "autoencoder" in capsys.readouterr().err
    assert bench.main(["--task", "recommender:no_such_key=1", "--steps", "1"]) == 2
    assert "task.no_such_key" in capsys.readouterr().err
    assert bench.main(["--task", "autoencoder", "--peers", "asdl"]) == 2
    assert "--model workloads only" in capsys.readouterr().err


class FakeRates(costmodel.Rates):
    """Deterministic kernel prices (proportional to the arithmetic)."""

    def __init__(self) -> None:
        self.call = 1e-6

    def gemm(self, m, k, n, dtype=None):
        return 2e-12 * m * k * n

    def bmm(self, b, m, k, n, dtype=None):
        return 2e-12 * b * m * k * n

    def eigh(self, n):
        return 1e-11 * n**3

    def qr(self, n):
        return 4e-12 * n**3

    def binv(self, b, n):
        return 1e-11 * b * n**3

    def passes(self, numel, k=1.0):
        return 1e-10 * numel * k


def test_cost_model_shapes_reduce_and_memory_floor():
    model = bench.SmallCNN()
    x = torch.randn(4, 3, 32, 32)
    shapes = {s.name: s for s in costmodel.layer_shapes(model, lambda: model(x))}
    c2 = shapes["conv2"]
    assert (c2.kind, c2.m, c2.n, c2.N, c2.T, c2.k2) == ("conv2d", 64, 32 * 9 + 1, 4, 256, 9)
    assert (shapes["fc1"].m, shapes["fc1"].n, shapes["fc1"].T) == (256, 129, 1)
    rates, params = FakeRates(), sum(p.numel() for p in model.parameters())
    shape_list = list(shapes.values())
    expand = costmodel.predict("kfac", {"stat_every": 1}, shape_list, rates, params)
    reduce = costmodel.predict("kfac", {"stat_every": 1, "approx": "reduce"}, shape_list,
                               rates, params)
    # conv Grams over N rows instead of N·T; the pass over the N·T patches stays
    assert reduce["statistics"] < expand["statistics"] / 4
    assert reduce["precondition"] == expand["precondition"]
    # the inverse damping forms: G⁻¹ V A⁻¹ (two products, not four) and two inverses, no eigh
    tik = costmodel.predict("kfac", {"stat_every": 1, "damping_form": "factored_tikhonov"},
                            shape_list, rates, params)
    gemms = sum(rates.gemm(s.m, s.m, s.n) + rates.gemm(s.m, s.n, s.n) for s in shape_list)
    assert expand["precondition"] - tik["precondition"] == pytest.approx(
        gemms + sum(rates.passes(s.m * s.n, 2) for s in shape_list))
    assert tik["inverse"] == pytest.approx(
        sum(rates.binv(1, s.m) + rates.binv(1, s.n) for s in shape_list))
    tk = costmodel.predict("tkfac", {"stat_every": 1}, shape_list, rates, params)
    assert tk["precondition"] == tik["precondition"]
    # what the bench passes: the settings read from a built optimizer, its config included
    from ngbench.optimizers import build_optimizer

    opt = build_optimizer("kfac", model, lr=1e-3, approx="reduce",
                          damping_form="factored_tikhonov", stat_every=1)
    built = costmodel.predict("kfac", costmodel.settings_of(opt), shape_list, rates, params)
    assert built["precondition"] == tik["precondition"]
    assert built["statistics"] == reduce["statistics"]
    # SNGD: the first and last layers (and convs) share the input metric, hidden Linear layers
    # get one n×n metric per output unit (optimizers/sngd.py)
    sngd = build_optimizer("sngd", model, lr=1e-3, stat_every=1, inv_every=1)
    st = costmodel.settings_of(sngd)
    assert st["block_kinds"] == {"conv1": "input", "conv2": "input", "conv3": "input",
                                 "fc1": "unit", "fc2": "input"}
    pred = costmodel.predict("sngd", st, shape_list, rates, params)
    fc1 = shapes["fc1"]
    assert pred["inverse"] == pytest.approx(
        rates.binv(fc1.m, fc1.n) + sum(rates.binv(1, s.n) for s in shape_list if s.name != "fc1"))
    assert costmodel.memory_floor("sngd", st, shape_list, params) == 4 * (
        params + 2 * fc1.m * fc1.n**2 + sum(2 * s.n**2 for s in shape_list if s.name != "fc1"))
    assert costmodel.predict("nope", {}, shape_list, rates, params) is None
    # MBF's per-kernel blocks and their inverses: 2·k² × the conv weights (optimizers/mbf.py)
    conv_w = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    only_convs = [s for s in shape_list if s.kind == "conv2d"]
    assert costmodel.memory_floor("mbf", {}, only_convs, 0) == 4 * 2 * 9 * conv_w


class FlopRates(costmodel.Rates):
    """Prices a product at its flop count (``2·m·k·n``, as torch's FlopCounterMode counts it)
    and everything FlopCounterMode does not count (factorisations, elementwise passes, calls)
    at zero: the model's predicted phases then sum to the products it expects a method to run."""

    def __init__(self) -> None:
        self.call = 0.0

    def gemm(self, m, k, n, dtype=None):
        return 2.0 * m * k * n

    def bmm(self, b, m, k, n, dtype=None):
        return 2.0 * b * m * k * n

    def eigh(self, n):
        return 0.0

    qr = eigh

    def binv(self, b, n):
        return 0.0

    def passes(self, numel, k=1.0):
        return 0.0


def _counted_flops(fn) -> int:
    """Flops of the products ``fn`` runs; the in-place ``addmm_``/``baddbmm_`` that the
    statistics accumulate with are counted too (torch's table has only the out-of-place ops)."""
    from torch.utils import flop_counter as fcm

    extra = {torch.ops.aten.addmm_: lambda s, a, b, *_, **__: fcm.mm_flop(a, b),
             torch.ops.aten.baddbmm_: lambda s, a, b, *_, **__: fcm.bmm_flop(a, b)}
    with fcm.FlopCounterMode(display=False, custom_mapping=extra) as counter:
        fn()
    return counter.get_total_flops()


def _mlp_and_batch():
    torch.manual_seed(0)
    # the last layer's 64 outputs exceed the batch of 16: NG+ takes its SMW path there
    model = torch.nn.Sequential(torch.nn.Linear(20, 48), torch.nn.Tanh(), torch.nn.Linear(48, 8),
                                torch.nn.Tanh(), torch.nn.Linear(8, 64))
    y = torch.randn(16, 64)
    return model, torch.randn(16, 20), lambda out: torch.nn.functional.mse_loss(out, y)


def _cnn_and_batch():
    torch.manual_seed(0)
    y = torch.randint(0, 10, (4,))
    return (bench.SmallCNN(), torch.randn(4, 3, 32, 32),
            lambda out: torch.nn.functional.cross_entropy(out, y))


@pytest.mark.parametrize("make", [_mlp_and_batch, _cnn_and_batch], ids=["mlp", "cnn"])
@pytest.mark.parametrize("label", ["kfac", "kfac:approx=reduce", "ekfac", "tekfac", "tkfac",
                                   "ngplus", "shampoo", "soap", "sngd", "mbf"])
def test_cost_model_counts_the_products_each_method_runs(label, make):
    """The floor's products are the method's own: over one full refresh period, the flops of
    forward + backward + step minus a plain model's forward + backward equal the model's
    predicted phases priced at flops (FlopRates).  Checks every code path the model mirrors:
    the 3/4 Gram split, bias columns as sums, EKFAC's rank-one projections and the projection
    steps that skip refreshes, NG+'s SMW layer, SOAP's three projections and power iteration."""
    import copy

    from ngbench.optimizers import build_optimizer

    model, x, loss_of = make()
    plain = copy.deepcopy(model)
    base = _counted_flops(lambda: loss_of(plain(x)).backward())
    name, extra = bench.parse_variant(label)
    period = 4
    hp = ({"precondition_frequency": period} if name in ("shampoo", "soap")
          else {"stat_every": 2, "inv_every": period})
    if name == "sngd":  # precondition from the first refresh (the model prices steady state)
        hp["rank_warmup"] = False
    opt = build_optimizer(name, model, lr=1e-4, **hp, **extra)

    def step() -> None:
        opt.zero_grad()
        loss_of(model(x)).backward()
        opt.step()

    for _ in range(2 * period):  # past every first-refresh path
        step()
    got = _counted_flops(lambda: [step() for _ in range(period)]) / period - base
    registered = getattr(opt, "layers", None)  # Shampoo and SOAP: parameters, not layers
    shapes = [s for s in costmodel.layer_shapes(model, lambda: model(x))
              if registered is None or s.name in registered]
    params = [p for p in model.parameters() if p.requires_grad]
    pred = costmodel.predict(name, costmodel.settings_of(opt), shapes, FlopRates(),
                             sum(p.numel() for p in params), [tuple(p.shape) for p in params])
    assert sum(pred.values()) == pytest.approx(got, rel=1e-9)


def test_kfac_memory_floor_is_a_tight_lower_bound():
    """After a refresh K-FAC holds A, G, their eigenbases and the scale matrix (+ momentum):
    the floor must not exceed what is held, and what is held stays within 2 % of it."""
    from ngbench.optimizers import build_optimizer

    model = bench.SmallCNN()
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    opt = build_optimizer("kfac", model, lr=1e-3, stat_every=1, inv_every=1)
    for _ in range(2):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    runner = bench.Runner("kfac", model, lambda: {}, opt)
    held = runner.state_bytes()
    shapes = costmodel.layer_shapes(model, lambda: model(x))
    params = sum(p.numel() for p in model.parameters())
    floor = costmodel.memory_floor("kfac", costmodel.settings_of(opt), shapes, params)
    assert floor <= held <= 1.02 * floor


def test_gpu_check_dry_run_end_to_end(tmp_path):

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(root)}
    proc = subprocess.run(
        [str(root / "scripts" / "gpu_check.sh"), "--dry-run", "--out", str(tmp_path),
         "--tasks", "autoencoder", "--optimizers", "sgd,kfac:approx=reduce",
         "--ratio-optimizers", "kfac", "--sections", "smoke,ratios", "--threads", "1"],
        cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rep = json.loads((tmp_path / "gpu_check.json").read_text())
    assert rep["dry_run"] and rep["autocast"] == "bf16"
    assert [r["status"] for r in rep["smoke"]] == ["ok", "ok"]
    assert rep["eval"][0]["status"] == "ok"
    for model in ("small_cnn", "resnet50"):
        assert rep["ratios"][model]["status"] == "ok"
        assert set(rep["ratios"][model]["results"]) == {"sgd", "adamw", "kfac"}
    assert "| kfac:approx=reduce | ok |" in (tmp_path / "gpu_check.md").read_text()


def test_a_diverging_row_is_flagged_and_a_smaller_lr_scale_keeps_it_finite(tmp_path, capsys):
    """The bench repeats one fixed batch: on the autoencoder (a summed loss) SGD at the bench's
    lr 0.01 turns NaN within ~30 steps, and a step on NaNs is not a real step. The row says so,
    the table names it, and ``--lr-scale`` keeps every row finite."""
    args = ["bench", "--task", "autoencoder", "--optimizers", "sgd", "--steps", "40",
            "--warmup", "0", "--chunk", "10", "--threads", "1", "--no-floor", "--quiet"]
    out = tmp_path / "big.json"
    assert cli.main([*args, "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["sgd"]["finite"] is False and res["sgd"]["lr_scale"] == 1.0
    assert "sgd (NaN!)" in capsys.readouterr().out
    out = tmp_path / "small.json"
    assert cli.main([*args, "--lr-scale", "0.01", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert all(r["finite"] for r in res.values()) and res["adamw"]["lr_scale"] == 0.01
    assert "NaN!" not in capsys.readouterr().out
    assert cli.main([*args, "--lr-scale", "0"]) == 2
    assert "--lr-scale must be > 0" in capsys.readouterr().err


def test_bench_workloads_script_writes_the_table(tmp_path):
    """``scripts/bench_workloads.py`` on one workload, short: its JSON per workload and the
    markdown table with the measured ratio, the floor ratio and measured ÷ floor."""
    root = Path(__file__).resolve().parent.parent
    out = tmp_path / "workloads"
    env = {**os.environ, "PYTHONPATH": str(root)}
    proc = subprocess.run(
        [sys.executable, "scripts/bench_workloads.py", "--workloads", "model:small_cnn",
         "--optimizers", "sgd,kfac:approx=reduce", "--repeat", "1", "--steps", "6",
         "--threads", "1", "--out", str(out)],
        cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads((out / "small_cnn.json").read_text())
    row = next(line for line in (tmp_path / "workloads.md").read_text().splitlines()
               if "| kfac:approx=reduce |" in line)
    cells = [c.strip() for c in row.strip("|").split("|")]
    r = res["kfac:approx=reduce"]
    assert float(cells[5]) == pytest.approx(r["floor_ratio"], abs=0.006)
    assert float(cells[6]) == pytest.approx(r["ratio_vs_sgd"] / r["floor_ratio"], abs=0.006)
    assert cells[7] == r["excess_phase"]


def test_denormals_are_flushed_during_the_bench_only(tmp_path, monkeypatch):
    """A method that memorises the bench's one batch drives its gradients into the denormal
    range; the bench flushes them to zero (recorded per row) and restores torch's default."""
    tiny = torch.tensor([1e-39])
    args = ["bench", "--optimizers", "sgd", "--steps", "2", "--warmup", "0", "--chunk", "2",
            "--threads", "1", "--no-floor", "--quiet"]
    seen: list[bool] = []
    real = bench.model_workload

    def spy(*args, **kw):
        seen.append(bool((tiny * 1.0).item() == 0.0))  # flushed inside the bench
        return real(*args, **kw)

    monkeypatch.setattr(bench, "model_workload", spy)
    assert cli.main([*args, "--json", str(tmp_path / "a.json")]) == 0
    assert cli.main([*args, "--keep-denormals", "--json", str(tmp_path / "b.json")]) == 0
    assert seen == [True, False]
    assert (tiny * 1.0).item() != 0.0  # restored after
    a, b = (json.loads((tmp_path / f).read_text()) for f in ("a.json", "b.json"))
    assert a["sgd"]["flush_denormal"] is True and b["sgd"]["flush_denormal"] is False
