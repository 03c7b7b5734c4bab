"""``ngbench report RUNS_DIR``: aggregate run folders into tables and plots.

Tables (markdown, CSV, LaTeX), one row per task × optimizer (× hyperparameter variant):
mean ± std over seeds of the final and best target metric, how many seeds reached the
target, steps and training time to target, mean step time and its ratio to SGD/AdamW,
and a Welch t-test of the final metric against the best first-order baseline.
Plots (PNG): training loss and the target metric vs steps and vs training time (mean
over seeds with a min–max band), and the AlgoPerf-style performance profile.
Runs that failed, are unfinished or have no record are skipped and listed.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from . import records

BASELINES = ("sgd", "adamw")


# -- loading -------------------------------------------------------------------
def collect(runs_dir: Path) -> tuple[list[dict[str, Any]], list[tuple[Path, str]]]:
    """Usable runs (completed or diverged) and the skipped folders with the reason."""
    runs, skipped = [], []
    for folder in records.find_run_folders(runs_dir):
        run = records.load_run(folder)
        if run is None:
            skipped.append((folder, "no record.json (never started or killed at start-up)"))
            continue
        status = run["record"].get("status")
        if status not in records.TERMINAL:
            why = run["record"].get("error") or ""
            skipped.append((folder, f"status {status}" + (f": {why}" if why else "")))
            continue
        runs.append(run)
    return runs, skipped


def _variant(folder: Path) -> str:
    parts = folder.parts
    if len(parts) >= 2 and parts[-1].startswith("seed"):
        return parts[-2]
    return "default"


def _label(rec: dict[str, Any], variant: str) -> str:
    """Row label: the optimizer preset (config file) name, plus the hyperparameter variant."""
    name = rec.get("preset") or rec["optimizer"]
    return name if variant == "default" else f"{name} [{variant}]"


def runs_frame(runs: list[dict[str, Any]]) -> pd.DataFrame:
    rows = []
    for run in runs:
        rec = run["record"]
        tgt = rec.get("target") or {}
        metric = tgt.get("metric")
        variant = _variant(Path(run["path"]))
        label = _label(rec, variant)
        rows.append(
            {
                "task": f"{rec['task']}/{rec.get('dataset')}/{rec.get('flavor')}",
                "optimizer": rec["optimizer"],
                "variant": variant,
                "label": label,
                "seed": rec["seed"],
                "status": rec["status"],
                "metric": metric,
                "mode": tgt.get("mode", "min"),
                "target": tgt.get("value"),
                "final": (rec.get("final_metrics") or {}).get(metric, math.nan)
                if rec["status"] == "completed"
                else math.nan,
                "best": (rec.get("best_metrics") or {}).get(metric, math.nan),
                "steps_to_target": rec.get("steps_to_target"),
                "epochs_to_target": rec.get("epochs_to_target"),
                "time_to_target_s": rec.get("time_to_target_s"),
                "mean_step_s": rec.get("mean_step_s"),
                "train_time_s": rec.get("train_time_s"),
                "path": str(run["path"]),
            }
        )
    df = pd.DataFrame(rows)
    for col in (
        "final",
        "best",
        "steps_to_target",
        "epochs_to_target",
        "time_to_target_s",
        "mean_step_s",
    ):
        if col in df:
            df[col] = pd.to_numeric(df[col], errors="coerce")
    return df


# -- statistics ----------------------------------------------------------------
def _mean_std(x: pd.Series) -> tuple[float, float, int]:
    x = x.dropna()
    n = len(x)
    if n == 0:
        return math.nan, math.nan, 0
    return float(x.mean()), float(x.std(ddof=1)) if n > 1 else 0.0, n


def _fmt(mean: float, std: float, n: int, digits: int = 4) -> str:
    if n == 0 or math.isnan(mean):
        return "—"
    return f"{mean:.{digits}g} ± {std:.2g} ({n})"


def welch_p(a: pd.Series, b: pd.Series) -> float:
    """Two-sided Welch t-test p-value (NaN when either side has fewer than 2 values)."""
    from scipy import stats

    a, b = a.dropna(), b.dropna()
    if len(a) < 2 or len(b) < 2:
        return math.nan
    if a.std() == 0 and b.std() == 0:
        return 0.0 if a.mean() != b.mean() else 1.0
    return float(stats.ttest_ind(a, b, equal_var=False).pvalue)


def load_published(folder: Path | None = None) -> pd.DataFrame:
    """Published numbers (``results/published/*.csv``) to print beside ours."""
    folder = folder or records.REPO_ROOT / "results" / "published"
    frames = [pd.read_csv(p) for p in sorted(Path(folder).glob("*.csv"))]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def published_for(task: str, optimizer: str, published: pd.DataFrame) -> str:
    """'value metric (status; source)' entries for a task label 'name/dataset/flavor'."""
    if published.empty:
        return ""
    name, dataset, flavor = (task.split("/") + ["", "", ""])[:3]
    if flavor == "tiny":
        return ""  # the papers' numbers are for the full problems
    m = published[
        (published["task"] == name)
        & (published["dataset"] == dataset)
        & (published["optimizer"] == optimizer)
    ]
    return "; ".join(f"{r.value:g} {r.metric} ({r.status}; {r.source})" for r in m.itertuples())


def summary_table(df: pd.DataFrame, published: pd.DataFrame | None = None) -> pd.DataFrame:
    published = load_published() if published is None else published
    out = []
    for task, tdf in df.groupby("task", sort=True):
        mode = tdf["mode"].iloc[0]
        step_means = tdf.groupby("optimizer")["mean_step_s"].mean()
        # best first-order baseline by mean final metric: the reference for the t-test
        base = tdf[tdf["optimizer"].isin(BASELINES)].groupby("label")["final"].mean().dropna()
        ref_label = None
        if len(base):
            ref_label = base.idxmin() if mode == "min" else base.idxmax()
        # fastest first-order baseline to target (every seed reached): the time reference
        tt = tdf[tdf["optimizer"].isin(BASELINES)].groupby("label")
        tt_means = {
            lab: float(g["time_to_target_s"].mean())
            for lab, g in tt
            if g["time_to_target_s"].notna().all()
        }
        time_ref = min(tt_means, key=tt_means.__getitem__) if tt_means else None
        for label, g in tdf.groupby("label", sort=False):
            fm, fs, fn = _mean_std(g["final"])
            bm, bs, bn = _mean_std(g["best"])
            reached = g["steps_to_target"].notna()
            sm, ss, sn = _mean_std(g.loc[reached, "steps_to_target"])
            tm, ts, tn = _mean_std(g.loc[reached, "time_to_target_s"])
            em, es, en = (
                _mean_std(g.loc[reached, "epochs_to_target"])
                if "epochs_to_target" in g
                else (math.nan, math.nan, 0)
            )
            step = float(g["mean_step_s"].mean())
            row = {
                "task": task,
                "optimizer": label,
                "metric": g["metric"].iloc[0],
                "target": g["target"].iloc[0],
                "seeds": len(g),
                "diverged": int((g["status"] == "diverged").sum()),
                "final": _fmt(fm, fs, fn),
                "best": _fmt(bm, bs, bn),
                "reached": f"{int(reached.sum())}/{len(g)}",
                "steps_to_target": _fmt(sm, ss, sn),
                "epochs_to_target": _fmt(em, es, en, 3),
                "time_to_target_s": _fmt(tm, ts, tn, 3),
                "step_ms": round(step * 1000, 2) if not math.isnan(step) else math.nan,
            }
            for b in BASELINES:
                if b in step_means and step_means[b] > 0:
                    row[f"step_vs_{b}"] = round(step / step_means[b], 2)
            if ref_label is not None and label != ref_label:
                row["p_vs_" + "best_baseline"] = welch_p(
                    g["final"], tdf.loc[tdf["label"] == ref_label, "final"]
                )
            if time_ref is not None and label != time_ref and reached.all():
                ref_t = tdf.loc[tdf["label"] == time_ref, "time_to_target_s"]
                row["time_vs_fastest_baseline"] = round(tm / tt_means[time_ref], 3)
                row["p_time"] = welch_p(g["time_to_target_s"], ref_t)
            paper = published_for(task, g["optimizer"].iloc[0], published)
            if paper:
                row["paper"] = paper
            row["_final_mean"] = fm
            out.append(row)
    table = pd.DataFrame(out)
    if table.empty:
        return table
    table = table.sort_values(["task", "_final_mean"], ascending=[True, True]).drop(
        columns="_final_mean"
    )
    return table.reset_index(drop=True)


def performance_profile(df: pd.DataFrame, taus: np.ndarray) -> tuple[pd.DataFrame, pd.Series]:
    """AlgoPerf-style profiles: per task the median time to target over seeds (∞ if not
    reached by the median seed); ratio to the fastest; ∞ beyond 4×; ρ(τ) and the score
    (mean of ρ over τ ∈ [1, 4] by the trapezoid rule)."""
    times: dict[str, dict[str, float]] = {}
    for task, tdf in df.groupby("task"):
        for label, g in tdf.groupby("label"):
            t = g["time_to_target_s"].fillna(math.inf).to_numpy(dtype=float)
            times.setdefault(label, {})[task] = float(np.median(t)) if len(t) else math.inf
    tab = pd.DataFrame(times).T  # rows: optimizers, cols: tasks
    if tab.empty:
        return pd.DataFrame(), pd.Series(dtype=float)
    best = tab.min(axis=0).replace(0, np.nan)
    ratios = tab / best
    ratios = ratios.where(ratios <= 4.0, math.inf).fillna(math.inf)
    rho = pd.DataFrame({tau: (ratios <= tau).mean(axis=1) for tau in taus}, index=ratios.index)
    score = pd.Series(
        {
            k: float(np.trapezoid(rho.loc[k].to_numpy(), taus) / (taus[-1] - taus[0]))
            for k in rho.index
        }
    )
    return rho, score.sort_values(ascending=False)


# -- plots ---------------------------------------------------------------------
def _curves(runs: list[dict[str, Any]]) -> dict[str, dict[str, list[pd.DataFrame]]]:
    by_task: dict[str, dict[str, list[pd.DataFrame]]] = {}
    for run in runs:
        rec = run["record"]
        if not run["metrics"]:
            continue
        task = f"{rec['task']}/{rec.get('dataset')}/{rec.get('flavor')}"
        label = _label(rec, _variant(Path(run["path"])))
        by_task.setdefault(task, {}).setdefault(label, []).append(pd.DataFrame(run["metrics"]))
    return by_task


def _style(k: int) -> dict[str, Any]:
    """Line style of the ``k``-th optimizer: the 10 tab10 colours, then the same hues dashed,
    then dotted, so that more than 10 optimizers stay distinguishable."""
    import matplotlib

    return {"color": matplotlib.colormaps["tab10"](k % 10), "ls": ("-", "--", ":")[(k // 10) % 3]}


def plot_curves(runs: list[dict[str, Any]], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for task, per_opt in _curves(runs).items():
        target = next(
            (
                r["record"]["target"]
                for r in runs
                if f"{r['record']['task']}/{r['record'].get('dataset')}/{r['record'].get('flavor')}"
                == task
            ),
            None,
        )
        metrics = ["train_loss"] + ([target["metric"]] if target else [])
        fig, axes = plt.subplots(len(metrics), 2, figsize=(11, 3.6 * len(metrics)), squeeze=False)
        for i, metric in enumerate(metrics):
            for j, xkey in enumerate(("step", "train_time_s")):
                ax = axes[i][j]
                for k, (label, frames) in enumerate(sorted(per_opt.items())):
                    frames = [f for f in frames if metric in f]
                    if not frames:
                        continue
                    n = min(len(f) for f in frames)
                    ys = np.stack([f[metric].to_numpy(dtype=float)[:n] for f in frames])
                    xs = np.stack([f[xkey].to_numpy(dtype=float)[:n] for f in frames]).mean(0)
                    (line,) = ax.plot(
                        xs, np.nanmean(ys, 0), label=f"{label} (n={len(frames)})", **_style(k)
                    )
                    if len(frames) > 1:
                        ax.fill_between(
                            xs,
                            np.nanmin(ys, 0),
                            np.nanmax(ys, 0),
                            color=line.get_color(),
                            alpha=0.2,
                        )
                if target and metric == target["metric"]:
                    ax.axhline(target["value"], color="k", ls="--", lw=0.8, label="target")
                ax.set_xlabel("step" if xkey == "step" else "training time (s)")
                ax.set_ylabel(metric)
                ax.set_yscale("log")
                ax.grid(alpha=0.3)
        axes[0][0].legend(fontsize=8)
        fig.suptitle(f"{task}: mean over seeds, band = min–max")
        fig.tight_layout()
        path = out / f"curves_{task.replace('/', '_')}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def plot_profile(rho: pd.DataFrame, score: pd.Series, out: Path) -> Path | None:
    if rho.empty:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for k, label in enumerate(score.index):
        ax.step(
            rho.columns, rho.loc[label], where="post", label=f"{label} ({score[label]:.2f})",
            **_style(k),
        )
    ax.set_xlabel("τ (time to target / fastest)")
    ax.set_ylabel("ρ(τ): fraction of tasks")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("Performance profile (score = ∫ρ over τ∈[1,4] / 3)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = out / "performance_profile.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# -- entry point -----------------------------------------------------------------
def write_tables(table: pd.DataFrame, out: Path, stem: str = "summary") -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{stem}.md", out / f"{stem}.csv", out / f"{stem}.tex"]
    records.atomic_write_text(paths[0], table.to_markdown(index=False) + "\n")
    records.atomic_write_text(paths[1], table.to_csv(index=False))
    records.atomic_write_text(paths[2], table.to_latex(index=False, na_rep="—"))
    return paths


def report(runs_dir: Path, out: Path, *, quiet: bool = False) -> dict[str, Any]:
    runs_dir = Path(runs_dir)
    if not runs_dir.exists():
        raise FileNotFoundError(f"runs directory {runs_dir} does not exist")
    runs, skipped = collect(runs_dir)
    say = (lambda *a: None) if quiet else print
    for folder, why in skipped:
        say(f"skipped {folder}: {why}")
    if not runs:
        raise ValueError(
            f"no finished runs under {runs_dir} ({len(skipped)} skipped); run "
            "`ngbench train ...` first"
        )
    df = runs_frame(runs)
    table = summary_table(df)
    tables_dir, figs_dir = out / "tables", out / "figures"
    figs_dir.mkdir(parents=True, exist_ok=True)
    files = write_tables(table, tables_dir)
    records.atomic_write_text(tables_dir / "runs.csv", df.to_csv(index=False))
    taus = np.linspace(1.0, 4.0, 301)
    rho, score = performance_profile(df, taus)
    if not score.empty:
        prof = score.rename("score").to_frame()
        records.atomic_write_text(tables_dir / "profile_scores.md", prof.to_markdown() + "\n")
        records.atomic_write_text(tables_dir / "profile_scores.csv", prof.to_csv())
    figs = plot_curves(runs, figs_dir)
    p = plot_profile(rho, score, figs_dir)
    if p:
        figs.append(p)
    say(table.to_markdown(index=False))
    if not score.empty:
        say("\nperformance-profile score (1 = fastest to target on every task):")
        say(score.round(3).to_string())
    say(
        f"\n{len(runs)} runs, {len(skipped)} skipped; tables in {tables_dir}, figures in {figs_dir}"
    )
    return {
        "table": table,
        "runs": df,
        "skipped": skipped,
        "files": files,
        "figures": figs,
        "scores": score,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="ngbench report",
        description="Aggregate run folders into comparison tables (markdown, CSV, LaTeX) and "
        "plots (curves vs steps and vs time, performance profile).",
    )
    ap.add_argument("runs_dir", type=Path, help="folder holding run folders (searched recursively)")
    ap.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output folder (default: RUNS_DIR/report); tables/ and figures/ go inside",
    )
    ap.add_argument("--quiet", action="store_true", help="do not print the table")
    args = ap.parse_args(argv)
    out = args.out or args.runs_dir / "report"
    try:
        report(args.runs_dir, out, quiet=args.quiet)
    except (FileNotFoundError, ValueError) as exc:
        print(f"ngbench report: error: {exc}")
        return 2
    return 0
