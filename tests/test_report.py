"""``ngbench report`` on run folders with known numbers, and the W&B mirror read back."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from ngbench.runners import records, report, results
from ngbench.runners.wandb_reader import find_run_file, read_history


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
    steps: int = 30,
    batch_size: int = 1000,
    debug_preset: str | None = None,
) -> Path:
    run = root / "autoencoder_mnist_tiny" / opt / variant / f"seed{seed}"
    if debug_preset:
        run = root / "debug" / run.relative_to(root)
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
            "steps": steps,
            "batch_size": batch_size,
            "debug_preset": debug_preset,
            "config_hash": f"hash-{opt}-{variant}",
            "git": {"commit": "abc123", "dirty": False},
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
    t = out["table"].set_index("label")  # numbers only
    assert (t.loc["kfac", ["final_mean", "final_std", "final_n"]] == [72.0, 2.0, 3]).all()
    assert t.loc["kfac", "reached"] == 3 and t.loc["sgd", "reached"] == 0
    assert (t.loc["kfac", ["time_to_target_s_mean", "time_to_target_s_std"]] == [2.0, 1.0]).all()
    assert t.loc["kfac", "step_vs_sgd"] == 2.0
    assert t.loc["adamw", "diverged"] == 1 and t.loc["adamw", "seeds"] == 2
    assert list(out["table"]["label"]) == ["kfac", "adamw", "sgd"]  # best final first
    # Welch t-test against the best baseline (adamw has 1 finite value -> NaN; vs sgd real)
    assert math.isnan(t.loc["kfac", "p_vs_best_baseline"])
    skipped = {str(p.relative_to(runs)): why for p, why in out["skipped"]}
    assert "status failed" in skipped["autoencoder_mnist_tiny/adamw/default/seed1"]
    assert "no record.json" in skipped["orphan/seed0"]
    tables = tmp_path / "out" / "tables"
    for ext in ("md", "csv", "tex"):
        assert (tables / f"summary.{ext}").stat().st_size > 100
    csv = pd.read_csv(tables / "summary.csv").set_index("label")
    assert csv.shape[0] == 3 and csv.loc["kfac", "final_mean"] == 72.0  # numbers, not strings
    assert csv["final_mean"].dtype == float and csv.loc["adamw", "final_n"] == 1
    md = (tables / "summary.md").read_text()
    assert " 72 ± 2 (3) |" in md  # formatting comes last, from the numbers
    assert " 85 (1) |" in md and "± nan" not in md and "nan" not in md.replace("nanos", "")
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
    t = report.report(runs, tmp_path / "out", quiet=True)["table"].set_index("label")
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


def _rewrite_record(folder: Path, **changes) -> None:
    rec = json.loads((folder / "record.json").read_text())
    rec.update(changes)
    (folder / "record.json").write_text(json.dumps(rec))


def test_report_cli_on_real_runs_bad_files_and_wandb_mirror(ngbench, tmp_path):
    # real tiny runs (not debug=smoke: those are debug runs, kept out of the summary)
    small = ("task.flavor=tiny", "train.steps=6", "train.batch_size=100", "train.eval_every=3")
    p = ngbench("train", "-m", *small, "optimizer=sgd,adamw", "seed=0,1", "logger=wandb")
    assert p.returncode == 0, p.stderr
    folders = {
        (r["record"]["optimizer"], r["record"]["seed"]): r["path"]
        for r in results.load_runs(tmp_path / "runs").runs
    }
    assert len(folders) == 4
    run = folders[("adamw", 1)]
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
    assert "| adamw" in p.stdout and "| sgd" in p.stdout
    assert "4 runs, 0 debug runs, 0 skipped" in p.stdout
    assert (tmp_path / "rep" / "figures" / "curves_autoencoder_mnist_5k_tiny.png").exists()
    table = (tmp_path / "rep" / "tables" / "summary.md").read_text()
    assert "(2) |" in table  # two seeds per optimizer

    # bad files: each skipped with its reason, the report is still written
    runs = tmp_path / "runs"
    good = folders[("sgd", 0)]
    text = (good / "record.json").read_text()
    bad = {
        "truncated": lambda f: (f / "record.json").write_text(text[: len(text) // 2]),
        "list": lambda f: (f / "record.json").write_text("[]"),
        "empty": lambda f: (f / "record.json").write_text(""),
        "seedtype": lambda f: _rewrite_record(f, seed="zero"),
        "finaltype": lambda f: _rewrite_record(f, final_metrics=[1, 2]),
        "nokey": lambda f: (f / "record.json").write_text(
            json.dumps({k: v for k, v in json.loads(text).items() if k != "optimizer"})
        ),
    }
    for name, spoil in bad.items():
        shutil.copytree(good, runs / "bad" / name / "seed0")
        spoil(runs / "bad" / name / "seed0")
    with open(folders[("sgd", 1)] / "metrics.jsonl", "a") as f:  # torn/garbage lines
        f.write('[]\n{"step": "x"}\n{"step": 9, "train_lo')
    # a debug run (the loop records debug_preset; debug runs live under runs/debug/)
    debug = runs / "debug" / "autoencoder_mnist_tiny" / "sgd" / "default" / "seed0"
    shutil.copytree(good, debug)
    _rewrite_record(debug, debug_preset="smoke")
    p = ngbench("report", "runs", "--out", "rep2")
    assert p.returncode == 0, p.stdout + p.stderr
    out = p.stdout
    for name, why in [
        ("truncated", "not valid JSON"),
        ("list", "expected a JSON object, found list"),
        ("empty", "empty file"),
        ("seedtype", "'seed' must be an integer, found 'zero'"),
        ("finaltype", "'final_metrics' must be an object"),
        ("nokey", "missing key(s) optimizer"),
    ]:
        line = next(x for x in out.splitlines() if f"bad/{name}/seed0" in x)
        assert line.startswith("skipped ") and why in line, line
    assert "3 bad line(s) ignored" in out and "metrics.jsonl" in out
    assert "4 runs, 1 debug runs, 6 skipped" in out
    tables = tmp_path / "rep2" / "tables"
    assert "debug" not in (tables / "summary.md").read_text()
    summary = pd.read_csv(tables / "summary.csv")
    assert summary["seeds"].tolist() == [2, 2] and summary["debug_preset"].isna().all()
    dbg = pd.read_csv(tables / "debug_summary.csv")
    assert dbg["debug_preset"].tolist() == ["smoke"] and dbg["seeds"].tolist() == [1]
    assert "not results" in (tables / "debug_summary.md").read_text()
    long = pd.read_parquet(tables / "runs.parquet")
    assert len(long) == 5 and long["is_debug"].sum() == 1
    assert len(pd.read_csv(tables / "skipped.csv")) == 6
    figs = tmp_path / "rep2" / "figures"
    debug_fig = "debug_curves_autoencoder_mnist_5k_tiny_debug_smoke_steps_6_batch_100.png"
    assert (figs / debug_fig).exists()

    # nothing usable: a clear error naming why, exit 2
    p = ngbench("report", "runs/bad", "--out", "rep3")
    assert p.returncode == 2 and "no usable runs under runs/bad (6 skipped" in p.stdout
    p = ngbench("report", "does-not-exist")
    assert p.returncode == 2 and "does not exist" in p.stdout


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


# -- formatting, budgets, debug runs, the long table, figures --------------------------
NASTY = "kfac_x%&#$^~{}\\<>|"


def _mixed_runs(runs: Path) -> None:
    """Three kfac and three sgd seeds; one seed of a variant with every LaTeX special in its
    name; one sgd run with twice the step budget; one debug run."""
    for s, (f, t) in enumerate([(70.0, 1.0), (72.0, 2.0), (74.0, 3.0)]):
        _fake_run(runs, "kfac", s, final=f, ttt=t, step_s=0.02)
    for s, (f, t) in enumerate([(90.0, 4.0), (91.0, 5.0), (92.0, 6.0)]):
        _fake_run(runs, "sgd", s, final=f, ttt=t)
    _fake_run(runs, "mbf", 0, final=75.0, ttt=None, variant=f"lr=0.1 ± {NASTY} τ—é")
    _fake_run(runs, "sgd", 7, final=60.0, ttt=0.5, steps=60)
    _fake_run(runs, "sgd", 0, final=555.5, ttt=None, steps=6, debug_preset="smoke")


@pytest.fixture(scope="module")
def mixed(tmp_path_factory) -> tuple[Path, dict]:
    """One report over :func:`_mixed_runs`, shared by the tests that only read it."""
    root = tmp_path_factory.mktemp("mixed")
    _mixed_runs(root / "runs")
    return root, report.report(root / "runs", root / "out", quiet=True)


def test_single_seed_missing_values_and_notes(mixed):
    root, out = mixed
    assert report.fmt_stat(75.0, math.nan, 1) == "75 (1)"
    assert report.fmt_stat(72.0, 2.0, 3) == "72 ± 2 (3)"
    assert report.fmt_stat(math.nan, math.nan, 0) == report.MISSING
    md = (root / "out" / "tables" / "summary.md").read_text()
    lines = md.split("Notes:")[0].strip().splitlines()

    def cells(line: str) -> list[str]:  # split at the pipes that are not escaped
        return [c.strip() for c in re.split(r"(?<!\\)\|", line.strip()[1:-1])]

    header = cells(lines[0])
    rows = [dict(zip(header, cells(x), strict=True)) for x in lines[2:]]
    mbf = next(r for r in rows if r["optimizer"].startswith("mbf ["))
    assert mbf["final"] == "75 (1)" and mbf["best"] == "75 (1)"  # one seed: no "±"
    assert mbf["steps_to_target"] == report.MISSING == mbf["p_vs_best_baseline"]
    cells = [c for r in rows for c in r.values()]
    assert not {"nan", "NaN", "", "None", "<NA>"} & set(cells)  # missing prints one way
    # the missed time ratio says why, it does not vanish
    assert "time_vs_fastest_baseline" in md.splitlines()[0]
    assert "time_vs_fastest_baseline and p_time empty for mbf [" in md
    assert "not every seed reached the target" in md
    assert "step_vs_adamw empty: no adamw run" in md
    num = out["table"].set_index("label")
    assert math.isnan(num.filter(like="mbf", axis=0)["final_std"].iloc[0])  # no std of one


def test_budget_mismatch_is_flagged_and_kept_apart(mixed):
    root, out = mixed
    t = out["table"]
    assert set(t["budget"]) == {"steps=30, batch=1000", "steps=60, batch=1000"}
    sgd = t[t["label"] == "sgd"].set_index("budget")
    assert sgd.loc["steps=30, batch=1000", "seeds"] == 3  # the 60-step run is not averaged in
    assert sgd.loc["steps=60, batch=1000", "final_mean"] == 60.0
    # each group has its own references: the 60-step sgd is not the time reference of kfac
    kfac = t[t["label"] == "kfac"].iloc[0]
    assert kfac["time_vs_fastest_baseline"] == pytest.approx(2.0 / 5.0)
    warning = out["notes"][0]
    assert warning.startswith("warning: autoencoder/mnist/tiny has runs with 2 different budgets")
    assert warning in (root / "out" / "tables" / "summary.md").read_text()
    # the profile treats the two budgets as two tasks, never one
    prof = pd.read_csv(root / "out" / "tables" / "profile_scores.csv", index_col=0)
    # sgd: ratio 2.5 on the 30-step task, alone (1.0) on the 60-step one: (0.5·1.5 + 1.5)/3
    assert prof.loc["sgd", "score"] == pytest.approx(0.75, abs=0.01)
    assert prof.loc["kfac", "score"] == pytest.approx(0.5, abs=0.01)  # no 60-step kfac run


def test_debug_runs_never_mixed_with_real_runs(mixed, tmp_path):
    root, out = mixed
    assert not out["table"]["debug_preset"].notna().any()
    assert out["debug_table"]["budget"].tolist() == ["debug=smoke, steps=6, batch=1000"]
    assert len(out["scores"]) == 3  # the profile: kfac, sgd, mbf [...]; no debug run
    tables = root / "out" / "tables"
    assert "555.5" not in (tables / "summary.csv").read_text()
    assert "555.5 (1)" in (tables / "debug_summary.md").read_text()
    # an older record without the key, but under <runs>/debug/, is a debug run too
    shutil.copytree(root / "runs", tmp_path / "runs")
    old = tmp_path / "runs" / "debug" / "autoencoder_mnist_tiny" / "sgd" / "default" / "seed0"
    _rewrite_record(old, debug_preset=None)
    long = results.long_table(results.load_runs(tmp_path / "runs").runs, tmp_path / "runs")
    assert long.loc[long["run"].str.startswith("debug/"), "debug_preset"].tolist() == ["debug"]


def test_long_table_parquet_and_csv(mixed):
    root, _ = mixed
    tables = root / "out" / "tables"
    pq = pd.read_parquet(tables / "runs.parquet")
    csv = pd.read_csv(tables / "runs.csv")
    assert len(pq) == len(csv) == 9  # one row per run, debug included (flagged)
    for col in (
        "final",
        "best",
        "time_to_target_s",
        "mean_step_s",
        "target",
        "final.full_train_loss",
    ):
        assert pq[col].dtype == float, col
    for col in ("seed", "steps", "batch_size", "steps_to_target"):
        assert str(pq[col].dtype) == "Int64", col
    row = pq[(pq["label"] == "kfac") & (pq["seed"] == 1)].iloc[0]
    assert row["final"] == 72.0 and row["time_to_target_s"] == 2.0 and row["steps_to_target"] == 100
    assert row["config_hash"] == "hash-kfac-default" and row["commit"] == "abc123"
    assert row["budget"] == "steps=30, batch=1000" and row["task_label"] == "autoencoder/mnist/tiny"
    assert row["run"] == "autoencoder_mnist_tiny/kfac/default/seed1" and not row["is_debug"]
    assert pq["is_debug"].sum() == 1 and pq["steps_to_target"].isna().sum() == 2
    mbf = csv[csv["optimizer"] == "mbf"].iloc[0]
    assert mbf["final"] == 75.0 and mbf["label"] == f"mbf [{mbf['variant']}]"


def _tex_cells(line: str) -> list[str]:
    assert line.endswith(" \\\\"), line
    return re.split(r"(?<!\\)&", line[: -len(" \\\\")])


def test_latex_table_is_strictly_escaped_and_compiles(mixed, tmp_path):
    import subprocess

    root, _ = mixed
    tables = root / "out" / "tables"
    for stem in ("summary", "debug_summary"):
        tex = (tables / f"{stem}.tex").read_text()
        assert tex.isascii(), [c for c in tex if not c.isascii()]
        lines = tex.splitlines()
        begin = next(i for i, x in enumerate(lines) if x.startswith("\\begin{tabular}"))
        end = lines.index("\\end{tabular}")
        ncols = len(re.match(r"\\begin\{tabular\}\{([lr]+)\}", lines[begin]).group(1))
        body = [x for x in lines[begin + 1 : end] if x != "\\hline"]
        assert body and all(len(_tex_cells(x)) == ncols for x in body)
        for x in body + lines[end + 1 :]:
            # no special character left bare: #, %, &, _, ~, ^ only escaped; $ in pairs
            bare = re.sub(r"\\[#%&_${}]|\\text\w+\{\}|\\\w+", "", x)
            assert not re.search(r"[#%_~^]", bare), x
            assert bare.count("$") % 2 == 0, x
        unescaped = re.sub(r"\\[{}]", "", tex)
        depth = 0
        for c in unescaped:  # braces balanced and never closed before opened
            depth += {"{": 1, "}": -1}.get(c, 0)
            assert depth >= 0
        assert depth == 0
        if stem == "summary":
            assert "mbf [lr=0.1 $\\pm$ kfac\\_x\\%\\&\\#\\$\\textasciicircum{}" in tex
            assert "---" in tex and "72 $\\pm$ 2 (3)" in tex and "75 (1)" in tex
    if shutil.which("pdflatex") is None:
        pytest.skip("pdflatex not installed (CI installs texlive-latex-base): escaping checked")
    doc = tmp_path / "doc.tex"
    doc.write_text(
        "\\documentclass{article}\\begin{document}\n"
        f"\\input{{{tables / 'summary.tex'}}}\n\\input{{{tables / 'debug_summary.tex'}}}\n"
        "\\end{document}\n"
    )
    p = subprocess.run(
        ["pdflatex", "-interaction=nonstopmode", "-halt-on-error", doc.name],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 0, p.stdout[-2000:]
    assert (tmp_path / "doc.pdf").stat().st_size > 1000


def test_one_colour_per_optimizer_and_target_in_legend(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    _mixed_runs(tmp_path / "runs")
    _fake_run(tmp_path / "runs", "kfac", 9, final=71.0, ttt=1.0, variant="lr=0.5")
    seen: dict[str, list] = {}
    close = plt.close

    def spy(fig):  # every figure, just before the report closes it
        items = [
            (t.get_text(), h)
            for lg in fig.legends
            for t, h in zip(lg.get_texts(), lg.legend_handles, strict=True)
        ]
        for ax in fig.axes:
            if ax.get_legend():
                lg = ax.get_legend()
                texts = [t.get_text() for t in lg.get_texts()]
                items += list(zip(texts, lg.legend_handles, strict=True))
        seen[fig.get_suptitle() or fig.axes[0].get_title()] = items
        close(fig)

    monkeypatch.setattr(plt, "close", spy)
    out = report.report(tmp_path / "runs", tmp_path / "out", quiet=True)
    style = out["styles"]
    assert style["kfac"]["color"] == style["kfac [lr=0.5]"]["color"]  # same preset, same hue
    assert style["kfac"]["ls"] != style["kfac [lr=0.5]"]["ls"]
    assert (
        len({style[k]["color"] for k in ("kfac", "sgd", next(k for k in style if "mbf" in k))}) == 3
    )
    colours: dict[str, set] = {}
    for title, items in seen.items():
        labels = [t for t, _ in items]
        if "Performance profile" not in title:
            assert any(t.startswith("target: full_train_loss ≤ 80") for t in labels), labels
        for text, handle in items:
            if not text.startswith("target"):
                colours.setdefault(text.split(" (")[0], set()).add(handle.get_color())
    assert len(seen) == 4  # two budget groups, the debug group, the profile
    assert all(len(c) == 1 for c in colours.values()), colours


def test_report_help_imports_neither_torch_nor_pandas():
    import subprocess
    import sys

    code = (
        "import sys, ngbench.runners.report as r\n"
        "try:\n    r.main(['--help'])\nexcept SystemExit:\n    pass\n"
        "heavy = {'torch', 'pandas', 'matplotlib'} & set(sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    root = Path(__file__).resolve().parent.parent
    p = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert "usage: ngbench report" in p.stdout


def test_a_seed_twice_is_flagged(tmp_path):
    # two sweeps under one report folder hold the same cell: counted, but not silently
    _fake_run(tmp_path / "runs" / "a", "kfac", 0, final=70.0, ttt=1.0)
    _fake_run(tmp_path / "runs" / "b", "kfac", 0, final=72.0, ttt=2.0)
    loaded = results.load_runs(tmp_path / "runs")
    table, notes = report.summary_table(results.long_table(loaded.runs), pd.DataFrame())
    assert table["seeds"].tolist() == [2]
    assert any("kfac has seed(s) 0 more than once" in n for n in notes), notes
