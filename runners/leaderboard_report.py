"""Tables and figures of the fair comparison, from the scored runs of :mod:`runners.leaderboard`.

Written under ``<out>/``: ``trials.csv`` (every run, raw, long format), ``manifest.json``
(command, commit, package versions, jobs, threads, budgets, targets, search spaces),
``search_spaces.yaml``, and per track (``tuned``: the best trial of each optimizer rerun over
seeds; ``defaults``: no tuning) ``tables/<track>_leaderboard.{md,csv}``,
``tables/<track>_profile_scores.{md,csv}``, ``figures/<track>/performance_profile.png``, plus
``tables/headline.{md,csv}`` (per workload the fastest curvature method ÷ tuned AdamW, with its
Welch p), ``tables/decomposition.{md,csv}`` and ``figures/decomposition.png`` for the tuned
track.

Time to target is the training clock at the first evaluation that reaches the calibrated target;
the per-workload time of the profile is the median over seeds (∞ when the median seed does not
reach it), AlgoPerf's rule for a single tuned configuration.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from . import records
from .report import performance_profile, plot_profile, styles, welch_p

REFERENCE = "adamw"
BASELINES = ("sgd", "adamw")
GOAL = 0.6  # the time ratio to tuned AdamW the project aims for (issue 16)
TRACKS = {"tuned": "rerun", "defaults": "defaults"}


def _ms(x: pd.Series, digits: int = 3) -> str:
    x = pd.to_numeric(x, errors="coerce").dropna()
    if x.empty:
        return "—"
    sd = f"{x.std(ddof=1):.2g}" if len(x) > 1 else "0"
    return f"{x.mean():.{digits}g} ± {sd}"


def leaderboard_table(df: pd.DataFrame) -> pd.DataFrame:
    """One row per workload × optimizer of one track (``df``: that track's runs)."""
    out = []
    for wname, wdf in df.groupby("workload", sort=True):
        ref = wdf[wdf["optimizer"] == REFERENCE]
        ref_step = pd.to_numeric(ref["mean_step_s"], errors="coerce").median()
        ref_time = pd.to_numeric(ref["time_to_target_s"], errors="coerce")
        ref_med = _median_time(ref)
        for opt, g in wdf.groupby("optimizer", sort=True):
            t = pd.to_numeric(g["time_to_target_s"], errors="coerce")
            step = pd.to_numeric(g["mean_step_s"], errors="coerce").median()
            med = _median_time(g)
            knobs = {c[3:]: g[c].iloc[0] for c in g.columns
                     if c.startswith("hp.") and pd.notna(g[c].iloc[0])}
            out.append({
                "workload": wname,
                "optimizer": opt,
                "target": f"{g['metric'].iloc[0]} {'≤' if g['mode'].iloc[0] == 'min' else '≥'} "
                f"{g['target'].iloc[0]:.4g}",
                "reached": f"{int(t.notna().sum())}/{len(g)}",
                "time_to_target_s": _ms(t),
                "steps_to_target": _ms(g["steps_to_target"], 4),
                "final": _ms(g["final"], 4),
                "step_time_vs_adamw": round(step / ref_step, 2) if ref_step > 0 else math.nan,
                "time_vs_adamw": _ratio(med, ref_med),
                "p_time_vs_adamw": math.nan if opt == REFERENCE else welch_p(t, ref_time),
                "trial": g["trial"].iloc[0],
                "hparams": " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                                    for k, v in knobs.items()),
                "_median_time": med,
            })
    tab = pd.DataFrame(out)
    if tab.empty:
        return tab
    return tab.sort_values(["workload", "_median_time"]).drop(columns="_median_time")


def _ratio(a: float, b: float) -> float:
    """a / b for times where ∞ means "not reached": NaN when the reference never reached."""
    if not (math.isfinite(b) and b > 0):
        return math.nan
    return round(a / b, 3) if math.isfinite(a) else math.inf


def headline(tab: pd.DataFrame) -> pd.DataFrame:
    """Per workload, the fastest non-baseline method of a leaderboard table: its median time to
    target ÷ tuned AdamW's, the Welch p, and whether it meets the goal (≤ 0.6×, p < 0.05)."""
    rows = []
    for wname, g in tab[~tab["optimizer"].isin(BASELINES)].groupby("workload", sort=True):
        g = g.assign(_r=pd.to_numeric(g["time_vs_adamw"], errors="coerce").fillna(math.inf))
        best = g.sort_values("_r").iloc[0]
        p = best["p_time_vs_adamw"]
        rows.append({"workload": wname, "best method": best["optimizer"],
                     "time_vs_adamw": best["time_vs_adamw"], "p": p,
                     "reached": best["reached"],
                     "meets_goal": bool(best["_r"] <= GOAL and pd.notna(p) and p < 0.05)})
    return pd.DataFrame(rows)


def _median_time(g: pd.DataFrame) -> float:
    t = pd.to_numeric(g["time_to_target_s"], errors="coerce").fillna(math.inf).to_numpy(float)
    return float(np.median(t)) if len(t) else math.inf


def decomposition(df: pd.DataFrame) -> pd.DataFrame:
    """For every non-baseline method on every workload: time ratio to tuned AdamW =
    steps-to-target ratio × per-step time ratio (medians over seeds), and what the goal needs."""
    out = []
    for wname, wdf in df.groupby("workload", sort=True):
        ref = wdf[wdf["optimizer"] == REFERENCE]
        if ref.empty:
            continue
        r_steps = _median_steps(ref)
        r_step = pd.to_numeric(ref["mean_step_s"], errors="coerce").median()
        for opt, g in wdf.groupby("optimizer", sort=True):
            if opt in BASELINES:
                continue
            s_ratio = _ratio(_median_steps(g), r_steps)
            t_ratio = pd.to_numeric(g["mean_step_s"], errors="coerce").median() / r_step
            prod = s_ratio * t_ratio
            row = {
                "workload": wname, "optimizer": opt,
                "steps_ratio": s_ratio, "step_time_ratio": round(t_ratio, 3),
                "product": round(prod, 3) if math.isfinite(prod) else prod,
                "time_ratio": _ratio(_median_time(g), _median_time(ref)),
                "meets_goal": bool(prod <= GOAL),
            }
            if not math.isfinite(r_steps):
                row["needs"] = "tuned AdamW does not reach the target on its median seed"
            elif not math.isfinite(prod):
                row["needs"] = "reach the target on the median seed"
            elif prod > GOAL:
                row["needs"] = (f"steps ×{GOAL / prod:.2f} (to {GOAL / t_ratio:.2f}) or step time "
                                f"×{GOAL / prod:.2f} (to {GOAL / s_ratio:.2f})")
            out.append(row)
    return pd.DataFrame(out)


def _median_steps(g: pd.DataFrame) -> float:
    s = pd.to_numeric(g["steps_to_target"], errors="coerce").fillna(math.inf).to_numpy(float)
    return float(np.median(s)) if len(s) else math.inf


def plot_decomposition(dec: pd.DataFrame, out: Path) -> Path | None:
    if not dec.empty:
        prod = dec["product"].astype(float)
        dec = dec[np.isfinite(prod) & (prod > 0)]
    if dec.empty:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 5))
    for k, (w, g) in enumerate(dec.groupby("workload")):
        ax.scatter(g["step_time_ratio"], g["steps_ratio"], label=w,
                   color=matplotlib.colormaps["tab10"](k % 10))
        for r in g.itertuples():
            ax.annotate(r.optimizer, (r.step_time_ratio, r.steps_ratio), fontsize=7)
    xs = np.geomspace(0.1, 100, 50)
    for level, ls in ((1.0, "-"), (GOAL, "--")):
        ax.plot(xs, level / xs, color="k", ls=ls, lw=0.8, label=f"time ratio {level:g}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(0.3, max(10.0, float(dec["step_time_ratio"].max()) * 1.5))
    ax.set_ylim(min(0.05, float(dec["steps_ratio"].min()) / 1.5), 3)
    ax.set_xlabel("per-step time ÷ tuned AdamW")
    ax.set_ylabel("steps to target ÷ tuned AdamW")
    ax.set_title("time to target ratio = steps ratio × step-time ratio")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    path = out / "decomposition.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_table(tab: pd.DataFrame, stem: Path) -> None:
    """``stem.md`` and ``stem.csv`` of a result table (the scaling study's too)."""
    records.atomic_write_text(stem.with_suffix(".md"), tab.to_markdown(index=False) + "\n")
    records.atomic_write_text(stem.with_suffix(".csv"), tab.to_csv(index=False))


def write(rows: list[dict[str, Any]], out: Path, *, manifest: dict[str, Any], log: Any = print
          ) -> dict[str, Any]:
    out = Path(out)
    tables, figs = out / "tables", out / "figures"
    tables.mkdir(parents=True, exist_ok=True)
    figs.mkdir(parents=True, exist_ok=True)
    records.write_json(out / "manifest.json", manifest)
    records.atomic_write_text(out / "search_spaces.yaml",
                              yaml.safe_dump(manifest["search_spaces"], sort_keys=False))
    df = pd.DataFrame(rows)
    records.atomic_write_text(out / "trials.csv", df.to_csv(index=False))
    result: dict[str, Any] = {"trials": df}
    if df.empty:
        log("no finished runs yet")
        return result
    taus = np.linspace(1.0, 4.0, 301)
    for track, phase in TRACKS.items():
        tdf = df[df["phase"] == phase]
        if tdf.empty:
            continue
        tab = leaderboard_table(tdf)
        write_table(tab, tables / f"{track}_leaderboard")
        prof = tdf.assign(task=tdf["workload"], label=tdf["optimizer"])
        rho, score = performance_profile(prof, taus)
        if not score.empty:
            write_table(score.rename("score").rename_axis("optimizer").reset_index(),
                   tables / f"{track}_profile_scores")
            (figs / track).mkdir(exist_ok=True)
            style = styles(prof.assign(preset=prof["optimizer"], variant="default"))
            plot_profile(rho, score, figs / track, style)
        result[track] = tab
        result[f"{track}_score"] = score
        log(f"\n## {track} track\n" + tab.to_markdown(index=False))
        if not score.empty:
            log("profile score: " + json.dumps(score.round(3).to_dict()))
        if track == "tuned" and not tab.empty:
            head = headline(tab)
            write_table(head, tables / "headline")
            result["headline"] = head
            log("\n## best curvature method vs tuned AdamW\n" + head.to_markdown(index=False))
    rer = df[df["phase"] == "rerun"]
    if not rer.empty:
        dec = decomposition(rer)
        write_table(dec, tables / "decomposition")
        plot_decomposition(dec, figs)
        result["decomposition"] = dec
        log("\n## decomposition (tuned)\n" + dec.to_markdown(index=False))
    log(f"\nleaderboard written to {out}")
    return result
