"""``ngbench report RUNS_DIR``: aggregate run folders into tables and plots.

Raw results first (:mod:`runners.results`): one long-format row per run, written as
``tables/runs.parquet`` and ``tables/runs.csv``. Everything else is computed from it:

- ``tables/summary.csv``: numbers only, one row per task × budget × optimizer (× variant):
  mean, std and n over seeds of the final and best target metric, of steps, epochs and
  training time to target; how many seeds reached the target; mean step time and its ratio
  to SGD/AdamW; a Welch t-test of the final metric against the best first-order baseline and
  of the time to target against the fastest one. ``summary.md``/``summary.tex`` print the
  same numbers for people, with the notes that say why a cell is empty.
- Runs are compared only within a *budget group*: the same task and flavor, step budget,
  global batch size and debug preset. A task with several budgets gets several groups and a
  warning. Debug runs (``debug_preset`` set, e.g. ``debug=smoke``) are never mixed with real
  runs: their rows go to ``debug_summary.*``, their curves to ``debug_curves_*.png``, and
  the performance profile leaves them out.
- Plots (PNG): training loss and the target metric vs steps and vs training time (mean over
  seeds, min–max band) with the target line in the legend; the AlgoPerf-style performance
  profile. One colour per optimizer preset across every figure.

Bad files never stop a report: unfinished runs and unreadable or malformed records are
skipped and listed with the reason; bad metrics lines are dropped with a note.
"""

from __future__ import annotations

import argparse
import math
import unicodedata
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the heavy imports wait until a report is really made (fast --help)
    import numpy as np
    import pandas as pd

BASELINES = ("sgd", "adamw")
MISSING = "—"  # how an empty cell prints in markdown and on screen (LaTeX: ---)
REF = "ref"  # the cell of the row a ratio or a test is taken against
GROUP = ["task_label", "budget"]


# -- statistics ----------------------------------------------------------------
def _mean_std(x: pd.Series) -> tuple[float, float, int]:
    """Mean, sample std (NaN for a single value) and count of the finite values."""
    x = x.astype(float)
    x = x[x.notna() & (x.abs() != math.inf)]
    n = len(x)
    if n == 0:
        return math.nan, math.nan, 0
    return float(x.mean()), float(x.std(ddof=1)) if n > 1 else math.nan, n


def welch_p(a: pd.Series, b: pd.Series) -> float:
    """Two-sided Welch t-test p-value (NaN when either side has fewer than 2 values)."""
    from scipy import stats

    a, b = a.dropna().astype(float), b.dropna().astype(float)
    if len(a) < 2 or len(b) < 2:
        return math.nan
    if a.std() == 0 and b.std() == 0:
        return 0.0 if a.mean() != b.mean() else 1.0
    return float(stats.ttest_ind(a, b, equal_var=False).pvalue)


def load_published(folder: Path | None = None) -> pd.DataFrame:
    """Published numbers (``results/published/*.csv``) to print beside ours."""
    import pandas as pd

    folder = folder or Path(__file__).resolve().parent.parent / "results" / "published"
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


_STATS = ("final", "best", "steps_to_target", "epochs_to_target", "time_to_target_s")


def _group_table(
    task: str, budget: str, gdf: pd.DataFrame, published: pd.DataFrame
) -> tuple[list[dict[str, Any]], list[str]]:
    """Rows and notes of one budget group (runs that may be compared with each other)."""
    where = f"{task} ({budget})"
    notes: list[str] = []
    mode = gdf["mode"].iloc[0]
    is_base = gdf["optimizer"].isin(BASELINES)
    step_means = gdf.groupby("optimizer")["mean_step_s"].mean()
    # best first-order baseline by mean final metric: the reference for the t-test
    base = gdf[is_base].groupby("label")["final"].mean().dropna()
    ref_label = None
    if len(base):
        ref_label = base.idxmin() if mode == "min" else base.idxmax()
    else:
        notes.append(
            f"{where}: p_vs_best_baseline empty: no first-order baseline "
            f"({', '.join(BASELINES)}) with a finite final metric"
        )
    # fastest first-order baseline to target (every seed reached): the time reference
    tt_means = {
        lab: float(g["time_to_target_s"].mean())
        for lab, g in gdf[is_base].groupby("label")
        if g["time_to_target_s"].notna().all()
    }
    time_ref = min(tt_means, key=tt_means.__getitem__) if tt_means else None
    if time_ref is None:
        notes.append(
            f"{where}: time_vs_fastest_baseline and p_time empty: no first-order baseline "
            f"({', '.join(BASELINES)}) reached the target on every seed"
        )
    for b in BASELINES:
        if not step_means.get(b, math.nan) > 0:
            notes.append(f"{where}: step_vs_{b} empty: no {b} run with a step time here")
    if ref_label or time_ref:
        notes.append(
            f"{where}: references: final metric vs {ref_label or MISSING}, "
            f"time to target vs {time_ref or MISSING}"
        )
    missed = []
    rows = []
    for label, g in gdf.groupby("label", sort=False):
        twice = sorted(int(x) for x in g.loc[g["seed"].duplicated(), "seed"].unique())
        if twice:
            notes.append(
                f"warning: {where}: {label} has seed(s) {', '.join(map(str, twice))} more than "
                f"once (the same cell in two run folders? see runs.csv); each run is counted"
            )
        reached = g["steps_to_target"].notna()
        row: dict[str, Any] = {
            "task": task,
            "budget": budget,
            "debug_preset": g["debug_preset"].iloc[0],
            "label": label,
            "optimizer": g["optimizer"].iloc[0],
            "metric": g["metric"].iloc[0],
            "mode": mode,
            "target": g["target"].iloc[0],
            "seeds": len(g),
            "diverged": int((g["status"] == "diverged").sum()),
            "reached": int(reached.sum()),
        }
        for col in _STATS:
            sel = g[col] if col in ("final", "best") else g.loc[reached, col]
            row[f"{col}_mean"], row[f"{col}_std"], row[f"{col}_n"] = _mean_std(sel)
        step = float(g["mean_step_s"].mean())
        row["step_ms"] = step * 1000
        for b in BASELINES:
            ok = step_means.get(b, math.nan) > 0
            row[f"step_vs_{b}"] = step / step_means[b] if ok else math.nan
        row["p_vs_best_baseline"] = math.nan
        if ref_label is not None and label != ref_label:
            ref_final = gdf.loc[gdf["label"] == ref_label, "final"]
            row["p_vs_best_baseline"] = welch_p(g["final"], ref_final)
        row["time_vs_fastest_baseline"] = row["p_time"] = math.nan
        if time_ref is not None and label != time_ref:
            if reached.all():
                ref_t = gdf.loc[gdf["label"] == time_ref, "time_to_target_s"]
                row["time_vs_fastest_baseline"] = row["time_to_target_s_mean"] / tt_means[time_ref]
                row["p_time"] = welch_p(g["time_to_target_s"], ref_t)
            else:
                missed.append(str(label))
        row["is_ref_final"] = label == ref_label
        row["is_ref_time"] = label == time_ref
        row["paper"] = published_for(task, g["optimizer"].iloc[0], published)
        rows.append(row)
    if missed:
        notes.append(
            f"{where}: time_vs_fastest_baseline and p_time empty for {', '.join(missed)}: "
            "not every seed reached the target"
        )
    sign = 1.0 if mode == "min" else -1.0
    rows.sort(key=lambda r: (math.isnan(r["final_mean"]), sign * r["final_mean"]))
    return rows, notes


def summary_table(
    df: pd.DataFrame, published: pd.DataFrame | None = None
) -> tuple[pd.DataFrame, list[str]]:
    """Numbers-only summary of a long table (one row per group × label) and its notes."""
    import pandas as pd

    published = load_published() if published is None else published
    rows, notes = [], []
    for (task, budget), gdf in df.groupby(GROUP, sort=True):
        r, n = _group_table(task, budget, gdf, published)
        rows += r
        notes += n
    notes.append(
        "p_vs_best_baseline, p_time: two-sided Welch t-test; empty where either side has "
        f"fewer than 2 finite values; {REF} marks the reference row"
    )
    return pd.DataFrame(rows), notes


def budget_warnings(df: pd.DataFrame) -> list[str]:
    """One line per task whose runs have different budgets (kept as separate groups)."""
    out = []
    for task, tdf in df.groupby("task_label", sort=True):
        budgets = sorted(tdf["budget"].unique())
        if len(budgets) > 1:
            out.append(
                f"warning: {task} has runs with {len(budgets)} different budgets "
                f"({'; '.join(budgets)}); each is its own group: compare rows only within one"
            )
    return out


def performance_profile(df: pd.DataFrame, taus: np.ndarray) -> tuple[pd.DataFrame, pd.Series]:
    """AlgoPerf-style profiles: per task the median time to target over seeds (∞ if not
    reached by the median seed); ratio to the fastest; ∞ beyond 4×; ρ(τ) and the score
    (mean of ρ over τ ∈ [1, 4] by the trapezoid rule)."""
    import numpy as np
    import pandas as pd

    times: dict[str, dict[str, float]] = {}
    for task, tdf in df.groupby("task"):
        for label, g in tdf.groupby("label"):
            t = g["time_to_target_s"].astype(float).fillna(math.inf).to_numpy(dtype=float)
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


# -- formatting (last, from the numbers) ---------------------------------------
def _is_missing(x: Any) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


def fmt_stat(mean: float, std: float, n: int, digits: int = 4) -> str:
    """'mean ± std (n)'; a single value prints as 'mean (1)', none as the missing mark."""
    if not n or _is_missing(mean):
        return MISSING
    if n == 1 or _is_missing(std):
        return f"{mean:.{digits}g} ({n})"
    return f"{mean:.{digits}g} ± {std:.2g} ({n})"


def _fmt_num(x: Any, spec: str) -> str:
    return MISSING if _is_missing(x) else format(x, spec)


def display_table(table: pd.DataFrame) -> pd.DataFrame:
    """The summary as strings for people: one cell per statistic, the missing mark for
    cells that have no value and ``ref`` for a row that the ratios/tests are taken against."""
    import pandas as pd

    rows = []
    for r in table.to_dict("records"):
        row = {
            "task": r["task"],
            "budget": r["budget"],
            "optimizer": r["label"],
            "metric": r["metric"],
            "target": _fmt_num(r["target"], "g"),
            "seeds": str(r["seeds"]),
            "diverged": str(r["diverged"]),
            "final": fmt_stat(r["final_mean"], r["final_std"], r["final_n"]),
            "best": fmt_stat(r["best_mean"], r["best_std"], r["best_n"]),
            "reached": f"{r['reached']}/{r['seeds']}",
        }
        for col, digits in (("steps_to_target", 4), ("epochs_to_target", 3)):
            row[col] = fmt_stat(r[f"{col}_mean"], r[f"{col}_std"], r[f"{col}_n"], digits)
        row["time_to_target_s"] = fmt_stat(
            r["time_to_target_s_mean"], r["time_to_target_s_std"], r["time_to_target_s_n"], 3
        )
        row["step_ms"] = _fmt_num(r["step_ms"], ".2f")
        for b in BASELINES:
            row[f"step_vs_{b}"] = _fmt_num(r[f"step_vs_{b}"], ".2f")
        row["p_vs_best_baseline"] = (
            REF if r["is_ref_final"] else _fmt_num(r["p_vs_best_baseline"], ".2g")
        )
        row["time_vs_fastest_baseline"] = (
            REF if r["is_ref_time"] else _fmt_num(r["time_vs_fastest_baseline"], ".3f")
        )
        row["p_time"] = REF if r["is_ref_time"] else _fmt_num(r["p_time"], ".2g")
        row["paper"] = r.get("paper") or MISSING
        rows.append(row)
    out = pd.DataFrame(rows)
    if not out.empty and (out["paper"] == MISSING).all():
        out = out.drop(columns="paper")
    return out


def to_markdown(display: pd.DataFrame, notes: list[str]) -> str:
    """A pipe table (a '|' inside a cell escaped) and the notes as a list below it."""
    cells = display.map(lambda v: str(v).replace("|", "\\|"))
    align = ["left" if c in _TEXT_COLUMNS else "right" for c in cells.columns]
    text = cells.to_markdown(index=False, disable_numparse=True, colalign=align) + "\n"
    if notes:
        text += "\nNotes:\n\n" + "".join(f"- {n}\n" for n in notes)
    return text


_TEX = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
    "<": r"\textless{}",
    ">": r"\textgreater{}",
    "|": r"\textbar{}",
    "±": r"$\pm$",
    "—": "---",
    "–": "--",
    "−": "-",
    "×": r"$\times$",
    "≤": r"$\leq$",
    "≥": r"$\geq$",
    "τ": r"$\tau$",
    "ρ": r"$\rho$",
    "∞": r"$\infty$",
    "…": r"\dots{}",
    "·": r"$\cdot$",
    "→": r"$\rightarrow$",
}


def tex_escape(value: Any) -> str:
    """Text as LaTeX that compiles with the base classes alone: the ten special characters
    escaped, known symbols as commands, any other non-ASCII character by its ASCII base
    letter (é → e) or dropped."""
    out = []
    for c in str(value):
        if c in _TEX:
            out.append(_TEX[c])
        elif c.isascii():
            out.append(c)
        else:
            base = unicodedata.normalize("NFKD", c).encode("ascii", "ignore").decode()
            out.append(tex_escape(base) if base else "")
    return "".join(out)


_TEXT_COLUMNS = ("task", "budget", "optimizer", "metric", "paper")


def to_latex(display: pd.DataFrame, notes: list[str]) -> str:
    """A ``tabular`` (no packages needed) to ``\\input`` into a table, notes below it."""
    cols = list(display.columns)
    spec = "".join("l" if c in _TEXT_COLUMNS else "r" for c in cols)
    lines = [
        "% written by `ngbench report`; needs no LaTeX package",
        f"\\begin{{tabular}}{{{spec}}}",
        "\\hline",
        " & ".join(tex_escape(c) for c in cols) + " \\\\",
        "\\hline",
    ]
    prev = None
    for r in display.itertuples(index=False):
        group = (r.task, r.budget)
        if prev is not None and group != prev:
            lines.append("\\hline")
        prev = group
        lines.append(" & ".join(tex_escape(v) for v in r) + " \\\\")
    lines += ["\\hline", "\\end{tabular}"]
    if notes:
        lines += ["", "\\par\\smallskip", "{\\footnotesize"]
        lines += [f"{tex_escape(n)}\\par" for n in notes]
        lines.append("}")
    return "\n".join(lines) + "\n"


def write_tables(
    table: pd.DataFrame, notes: list[str], out: Path, stem: str = "summary"
) -> list[Path]:
    """``<stem>.csv`` (numbers), ``<stem>.md`` and ``<stem>.tex`` (formatted, with notes)."""
    from . import records

    out.mkdir(parents=True, exist_ok=True)
    display = display_table(table)
    paths = [out / f"{stem}.md", out / f"{stem}.csv", out / f"{stem}.tex"]
    records.atomic_write_text(paths[0], to_markdown(display, notes))
    records.atomic_write_text(paths[1], table.to_csv(index=False))
    records.atomic_write_text(paths[2], to_latex(display, notes))
    return paths


# -- plots ---------------------------------------------------------------------
def styles(df: pd.DataFrame) -> dict[str, dict[str, Any]]:
    """Line style per row label from ONE colour map keyed by optimizer preset name: every
    figure draws a preset in the same colour; its hyperparameter variants differ by dash.
    More than 20 presets reuse the colours with a different dash."""
    import matplotlib

    names = sorted(df["preset"].unique())
    cmap = matplotlib.colormaps["tab10" if len(names) <= 10 else "tab20"]
    colour = {n: cmap(i % cmap.N) for i, n in enumerate(names)}
    dashes = ("-", "--", ":", "-.")
    out = {}
    for name in names:
        labels = df.loc[df["preset"] == name, ["variant", "label"]].drop_duplicates()
        variants = sorted(labels["variant"], key=lambda v: (v != "default", v))
        for r in labels.itertuples():
            k = variants.index(r.variant) + names.index(name) // cmap.N
            out[r.label] = {"color": colour[name], "ls": dashes[k % len(dashes)]}
    return out


def _slug(text: str) -> str:
    """File-name form: runs of anything but letters, digits, '.', '-' become one '_'."""
    import re

    return re.sub(r"[^A-Za-z0-9.-]+", "_", text).strip("_")


def _group_names(df: pd.DataFrame) -> dict[tuple[str, str], str]:
    """Group → name used in file names and the profile: the task label, plus the budget
    when the task has several; debug groups are always named with their budget."""
    counts = df.groupby("task_label")["budget"].nunique()
    names = {}
    for task, budget in df[GROUP].drop_duplicates().itertuples(index=False):
        several = counts[task] > 1 or budget.startswith("debug=")
        names[(task, budget)] = f"{task} ({budget})" if several else task
    return names


def plot_curves(
    runs: list[dict[str, Any]], df: pd.DataFrame, out: Path, style: dict[str, dict[str, Any]]
) -> list[Path]:
    """One figure per budget group: loss and target metric vs steps and vs time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    import pandas as pd

    names = _group_names(df)
    groups: dict[tuple[str, str], dict[str, list[pd.DataFrame]]] = {}
    targets: dict[tuple[str, str], dict[str, Any]] = {}
    for run, row in zip(runs, df.itertuples(index=False), strict=True):
        key = (row.task_label, row.budget)
        targets.setdefault(key, run["record"].get("target") or {})
        if run["metrics"]:
            frame = pd.DataFrame(run["metrics"])
            groups.setdefault(key, {}).setdefault(row.label, []).append(frame)
    written = []
    for key, per_opt in sorted(groups.items()):
        target = targets[key]
        tmetric = target.get("metric")
        metrics = ["train_loss"] + ([tmetric] if tmetric else [])
        fig, axes = plt.subplots(len(metrics), 2, figsize=(11, 3.6 * len(metrics)), squeeze=False)
        handles: dict[str, Any] = {}
        for i, metric in enumerate(metrics):
            for j, xkey in enumerate(("step", "train_time_s")):
                ax = axes[i][j]
                for label, frames in sorted(per_opt.items()):
                    frames = [f for f in frames if metric in f and xkey in f]
                    if not frames:
                        continue
                    n = min(len(f) for f in frames)
                    ys = np.stack([f[metric].to_numpy(dtype=float)[:n] for f in frames])
                    xs = np.stack([f[xkey].to_numpy(dtype=float)[:n] for f in frames]).mean(0)
                    name = f"{label} (n={len(frames)})"
                    (line,) = ax.plot(xs, np.nanmean(ys, 0), label=name, **style[label])
                    handles.setdefault(name, line)
                    if len(frames) > 1:
                        ax.fill_between(
                            xs,
                            np.nanmin(ys, 0),
                            np.nanmax(ys, 0),
                            color=line.get_color(),
                            alpha=0.2,
                        )
                if metric == tmetric and target.get("value") is not None:
                    sign = "≤" if target.get("mode", "min") == "min" else "≥"
                    name = f"target: {tmetric} {sign} {target['value']:g}"
                    handles.setdefault(
                        name, ax.axhline(target["value"], color="k", ls="--", lw=0.8, label=name)
                    )
                ax.set_xlabel("step" if xkey == "step" else "training time (s)")
                ax.set_ylabel(metric)
                ax.set_yscale("log")
                ax.grid(alpha=0.3)
        fig.legend(
            list(handles.values()),
            list(handles),
            loc="lower center",
            fontsize=8,
            ncol=min(4, len(handles)),
            frameon=False,
        )
        debug = key[1].startswith("debug=")
        title = f"{names[key]}: mean over seeds, band = min–max"
        fig.suptitle(("DEBUG RUNS, NOT RESULTS — " if debug else "") + title)
        rows_legend = math.ceil(len(handles) / min(4, len(handles)))
        fig.tight_layout(rect=(0, 0.03 + 0.025 * rows_legend, 1, 1))
        stem = "debug_curves" if debug else "curves"
        path = out / f"{stem}_{_slug(names[key].replace('/', '_'))}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def plot_profile(
    rho: pd.DataFrame, score: pd.Series, out: Path, style: dict[str, dict[str, Any]]
) -> Path | None:
    if rho.empty:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label in score.index:
        ax.step(
            rho.columns,
            rho.loc[label],
            where="post",
            label=f"{label} ({score[label]:.2f})",
            **style[label],
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
def report(runs_dir: Path, out: Path, *, quiet: bool = False) -> dict[str, Any]:
    import numpy as np
    import pandas as pd

    from . import records, results

    runs_dir, out = Path(runs_dir), Path(out)
    if not runs_dir.exists():
        raise FileNotFoundError(f"runs directory {runs_dir} does not exist")
    loaded = results.load_runs(runs_dir)
    say = (lambda *a: None) if quiet else print
    for folder, why in loaded.skipped:
        say(f"skipped {folder}: {why}")
    for path, what in loaded.notes:
        say(f"note: {path}: {what}")
    if not loaded.runs:
        raise ValueError(
            f"no usable runs under {runs_dir} ({len(loaded.skipped)} skipped, reasons above); "
            "run `ngbench train ...` first, or fix or move away the files named above"
        )
    runs = loaded.runs
    df = results.long_table(runs, runs_dir)
    tables_dir, figs_dir = out / "tables", out / "figures"
    figs_dir.mkdir(parents=True, exist_ok=True)
    files = results.write_long_table(df, tables_dir)
    if loaded.skipped:
        skipped = pd.DataFrame([{"path": str(p), "reason": why} for p, why in loaded.skipped])
        records.atomic_write_text(tables_dir / "skipped.csv", skipped.to_csv(index=False))
    warnings = budget_warnings(df[~df["is_debug"]])
    for w in warnings:
        say(w)
    real, debug = df[~df["is_debug"]], df[df["is_debug"]]
    table, notes = summary_table(real) if len(real) else (pd.DataFrame(), [])
    dtable, dnotes = summary_table(debug) if len(debug) else (pd.DataFrame(), [])
    if len(real):
        files += write_tables(table, warnings + notes, tables_dir)
    if len(debug):
        dnotes = ["debug runs: smoke tests of the harness, not results"] + dnotes
        files += write_tables(dtable, dnotes, tables_dir, stem="debug_summary")
    # the profile: real runs only, one "task" per budget group
    taus = np.linspace(1.0, 4.0, 301)
    names = _group_names(real) if len(real) else {}
    prof_df = real.assign(task=[names[k] for k in zip(real.task_label, real.budget, strict=True)])
    rho, score = performance_profile(prof_df, taus) if len(real) else (pd.DataFrame(), None)
    score = score if score is not None else pd.Series(dtype=float)
    if not score.empty:
        prof = score.rename("score").to_frame()
        records.atomic_write_text(tables_dir / "profile_scores.md", prof.to_markdown() + "\n")
        records.atomic_write_text(tables_dir / "profile_scores.csv", prof.to_csv())
    style = styles(df)
    figs = plot_curves(runs, df, figs_dir, style)
    p = plot_profile(rho, score, figs_dir, style)
    if p:
        figs.append(p)
    if len(real):
        say(to_markdown(display_table(table), warnings + notes))
    if len(debug):
        say("\nDEBUG RUNS (not results; kept apart from the table above):")
        say(to_markdown(display_table(dtable), dnotes[1:]))
    if not score.empty:
        say("\nperformance-profile score (1 = fastest to target on every task):")
        say(score.round(3).to_string())
    say(
        f"\n{len(real)} runs, {len(debug)} debug runs, {len(loaded.skipped)} skipped; "
        f"tables in {tables_dir}, figures in {figs_dir}"
    )
    return {
        "table": table,
        "debug_table": dtable,
        "notes": warnings + notes,
        "runs": df,
        "skipped": loaded.skipped,
        "file_notes": loaded.notes,
        "files": files,
        "figures": figs,
        "scores": score,
        "styles": style,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="ngbench report",
        description="Aggregate run folders into a long table of runs (Parquet, CSV), summary "
        "tables (CSV numbers; markdown, LaTeX) and plots (curves vs steps and vs time, "
        "performance profile). Runs with different budgets are kept in separate groups; "
        "debug runs go to debug_summary.*; bad or unfinished run folders are skipped with "
        "the reason.",
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
