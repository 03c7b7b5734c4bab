"""Tables and the figure of the batch-size scaling study (:mod:`runners.scaling`).

Per optimizer and batch size B, from the best trial at B rerun over seeds: steps to target
S(B) and time to target T(B) (medians over seeds; ∞ when the median seed misses the target,
the leaderboard's rule). Definitions:

- **perfect scaling**: doubling the batch halves the steps, S(B) = E_min / B, where
  E_min = min over B of B·S(B) is the fewest examples to the target over the measured batch
  sizes (Shallue et al., JMLR 2019, §3.1 "perfect scaling"; drawn through that point).
- **critical batch size**: the largest measured B up to which every measured batch size
  reaching the target needs at most ``MARGIN`` (2) × the perfect-scaling steps, i.e.
  B·S(B) ≤ 2·E_min — McCandlish et al. 2018 ("An empirical model of large-batch training",
  eq. 2.11: at B_crit the training takes 2× the minimal examples), the margin Shallue et al.
  and Zhang et al. (NeurIPS 2019) read off their log–log curves as "leaving perfect scaling".
  ``critical_batch_interp`` is where the log–log line between the last batch within the
  margin and the first beyond it crosses 2·E_min / B.
- **best batch size**: the B with the smallest median time to target; the headline is the best
  curvature (non-baseline) method's time there ÷ tuned AdamW's at AdamW's best B, with the
  Welch p over the seeds' times.

Written under ``<out>/``: ``trials.csv``, ``manifest.json``, ``tables/by_batch.{md,csv}``
(optimizer × B), ``tables/summary.{md,csv}`` (per optimizer), ``tables/headline.{md,csv}`` and
``figures/scaling.png`` (steps to target vs B with the perfect-scaling lines and critical batch
sizes, time to target vs B with each best batch size).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from . import records
from .leaderboard_report import write_table
from .report import styles, welch_p

REFERENCE = "adamw"
BASELINES = ("sgd", "adamw")
MARGIN = 2.0
GOAL = 0.6


def perfect_scaling(batches: list[float], steps: list[float]) -> float:
    """E_min: the fewest examples to target, min over B of B·S(B) (∞ if none reached).
    Perfect scaling is then S(B) = E_min / B."""
    ex = [b * s for b, s in zip(batches, steps, strict=True) if math.isfinite(s)]
    return min(ex) if ex else math.inf


def critical_batch(batches: list[float], steps: list[float], margin: float = MARGIN
                   ) -> tuple[float, float]:
    """(critical batch size, its log–log interpolation) of a steps-to-target curve.

    Walking up the sorted batch sizes that reach the target, the critical batch size is the
    last one with B·S(B) ≤ margin·E_min before the first that exceeds it (a batch size that
    misses the target also ends the walk: it needs more than the budget). The interpolated
    value is where log S crosses log(margin·E_min / B) on the segment to that first
    exceedance (= the last batch within the margin if the curve never leaves it). NaN, NaN when
    no batch size reaches the target."""
    pts = sorted(zip(batches, steps, strict=True))
    e_min = perfect_scaling([b for b, _ in pts], [s for _, s in pts])
    if not math.isfinite(e_min):
        return math.nan, math.nan
    limit = margin * e_min * (1 + 1e-12)
    first = next(i for i, (_, s) in enumerate(pts) if math.isfinite(s))
    crit = pts[first][0]  # the smallest batch size that reaches (even if beyond the margin)
    if pts[first][0] * pts[first][1] > limit:
        return crit, crit
    for (b0, s0), (b, s) in zip(pts[first:], pts[first + 1:], strict=False):
        if math.isfinite(s) and b * s <= limit:
            crit = b
            continue
        if not math.isfinite(s) or b0 != crit:
            return crit, crit
        # on the log-log segment, g = log(B·S / limit) is linear in log B: <= 0 at b0, > 0 at b
        g0, g1 = math.log(b0 * s0 / limit), math.log(b * s / limit)
        x = math.log(b0) + (math.log(b) - math.log(b0)) * (-g0) / (g1 - g0)
        return crit, math.exp(x)
    return crit, crit


def _median(x: pd.Series) -> float:
    v = pd.to_numeric(x, errors="coerce").fillna(math.inf).to_numpy(float)
    return float(np.median(v)) if len(v) else math.inf


def by_batch(rer: pd.DataFrame) -> pd.DataFrame:
    """One row per optimizer × batch size of the reruns (the best trial at B over seeds)."""
    out = []
    for (opt, b), g in rer.groupby(["optimizer", "batch_size"], sort=True):
        t = pd.to_numeric(g["time_to_target_s"], errors="coerce")
        knobs = {c[3:]: g[c].iloc[0] for c in g.columns
                 if c.startswith("hp.") and pd.notna(g[c].iloc[0])}
        out.append({
            "optimizer": opt, "batch_size": int(b),
            "reached": f"{int(t.notna().sum())}/{len(g)}",
            "steps_to_target": _median(g["steps_to_target"]),
            "time_to_target_s": _median(g["time_to_target_s"]),
            "examples_to_target": int(b) * _median(g["steps_to_target"]),
            "budget_steps": int(g["budget_steps"].iloc[0]) if "budget_steps" in g else None,
            "mean_step_s": float(pd.to_numeric(g["mean_step_s"], errors="coerce").median()),
            "trial": g["trial"].iloc[0],
            "hparams": " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                                for k, v in knobs.items()),
        })
    return pd.DataFrame(out)


def summary(tab: pd.DataFrame, rer: pd.DataFrame) -> pd.DataFrame:
    """Per optimizer: E_min, critical batch size, best batch size and its time (median and
    mean ± std over seeds), time ÷ AdamW's best with the Welch p."""
    times: dict[str, pd.Series] = {}
    rows = []
    for opt, g in tab.groupby("optimizer", sort=True):
        bs, st = g["batch_size"].tolist(), g["steps_to_target"].astype(float).tolist()
        crit, crit_i = critical_batch(bs, st)
        best = g.loc[g["time_to_target_s"].astype(float).idxmin()]
        seeds = rer[(rer["optimizer"] == opt) & (rer["batch_size"] == best["batch_size"])]
        t = pd.to_numeric(seeds["time_to_target_s"], errors="coerce")
        times[opt] = t
        rows.append({
            "optimizer": opt, "examples_min": perfect_scaling(bs, st),
            "critical_batch": crit, "critical_batch_interp": round(crit_i, 1)
            if math.isfinite(crit_i) else crit_i,
            "best_batch": int(best["batch_size"]) if math.isfinite(best["time_to_target_s"])
            else None,
            "best_time_s": best["time_to_target_s"],
            "best_time_mean_sd": (f"{t.mean():.3g} ± {t.std(ddof=1):.2g}" if t.notna().sum() > 1
                                  else "—"),
            "reached": best["reached"],
        })
    out = pd.DataFrame(rows)
    if out.empty:
        return out
    ref = out.loc[out["optimizer"] == REFERENCE, "best_time_s"]
    ref_t = float(ref.iloc[0]) if len(ref) else math.nan
    out["time_vs_adamw_best"] = [
        round(x / ref_t, 3) if math.isfinite(ref_t) and math.isfinite(x) else
        (math.inf if math.isfinite(ref_t) else math.nan) for x in out["best_time_s"]]
    out["p_vs_adamw_best"] = [math.nan if o == REFERENCE or REFERENCE not in times
                              else welch_p(times[o], times[REFERENCE]) for o in out["optimizer"]]
    return out


def headline(summ: pd.DataFrame) -> pd.DataFrame:
    """The best curvature method's time at its best batch ÷ tuned AdamW's at AdamW's best."""
    cur = summ[~summ["optimizer"].isin(BASELINES)]
    if cur.empty or REFERENCE not in set(summ["optimizer"]):
        return pd.DataFrame()
    r = pd.to_numeric(cur["time_vs_adamw_best"], errors="coerce").fillna(math.inf)
    best = cur.loc[r.idxmin()]
    ref = summ[summ["optimizer"] == REFERENCE].iloc[0]
    p = best["p_vs_adamw_best"]
    return pd.DataFrame([{
        "best method": best["optimizer"], "its best batch": best["best_batch"],
        "adamw best batch": ref["best_batch"], "time_s": best["best_time_s"],
        "adamw_time_s": ref["best_time_s"], "ratio": best["time_vs_adamw_best"], "p": p,
        "meets_goal": bool(float(r.min()) <= GOAL and pd.notna(p) and p < 0.05),
    }])


def plot(tab: pd.DataFrame, summ: pd.DataFrame, out: Path, title: str) -> Path | None:
    fin = tab[np.isfinite(tab["steps_to_target"].astype(float))]
    if fin.empty:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    style = styles(tab.assign(preset=tab["optimizer"], variant="default", label=tab["optimizer"]))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.5))
    bs_all = np.array(sorted(tab["batch_size"].unique()), float)
    for opt, g in tab.groupby("optimizer", sort=True):
        colour = style[opt]["color"]
        g = g.sort_values("batch_size")
        s = g["steps_to_target"].astype(float)
        ok = np.isfinite(s)
        ax1.plot(g["batch_size"][ok], s[ok], "o-", color=colour, label=opt)
        row = summ[summ["optimizer"] == opt].iloc[0]
        e_min = float(row["examples_min"])
        if math.isfinite(e_min):
            ax1.plot(bs_all, e_min / bs_all, ":", color=colour, lw=1)
        crit = row["critical_batch"]
        if pd.notna(crit) and math.isfinite(crit):
            c = g[g["batch_size"] == crit]
            ax1.plot(c["batch_size"], c["steps_to_target"], "s", ms=11, mfc="none",
                     color=colour)
        t = g["time_to_target_s"].astype(float)
        ok = np.isfinite(t)
        ax2.plot(g["batch_size"][ok], t[ok], "o-", color=colour, label=opt)
        if pd.notna(row["best_batch"]):
            ax2.plot([row["best_batch"]], [row["best_time_s"]], "*", ms=15, color=colour)
    ax1.set_title("steps to target (dotted: perfect scaling; □ critical batch)", fontsize=9)
    ax1.set_ylabel("steps to target (median of seeds)")
    ax2.set_title("time to target (★ best batch size)", fontsize=9)
    ax2.set_ylabel("training-clock time to target (s)")
    from matplotlib.ticker import NullFormatter

    for ax in (ax1, ax2):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(bs_all, [str(int(b)) for b in bs_all])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("batch size")
        ax.grid(alpha=0.3, which="both")
    ax2.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = out / "scaling.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write(rows: list[dict[str, Any]], out: Path, *, manifest: dict[str, Any], log: Any = print
          ) -> dict[str, Any]:
    out = Path(out)
    (out / "tables").mkdir(parents=True, exist_ok=True)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    records.write_json(out / "manifest.json", manifest)
    df = pd.DataFrame(rows)
    records.atomic_write_text(out / "trials.csv", df.to_csv(index=False))
    result: dict[str, Any] = {"trials": df}
    rer = df[df["phase"] == "rerun"] if not df.empty else df
    if rer.empty:
        log("no reruns finished yet")
        return result
    tab = by_batch(rer)
    summ = summary(tab, rer)
    head = headline(summ)
    write_table(tab, out / "tables" / "by_batch")
    write_table(summ, out / "tables" / "summary")
    if not head.empty:
        write_table(head, out / "tables" / "headline")
    t = manifest.get("target", {})
    title = (f"{manifest.get('workload', '')}: target {t.get('metric')} "
             f"{'≤' if t.get('mode') == 'min' else '≥'} {t.get('value')}")
    plot(tab, summ, out / "figures", title)
    log("\n## by batch size\n" + tab.to_markdown(index=False))
    log("\n## per optimizer\n" + summ.to_markdown(index=False))
    if not head.empty:
        log("\n## headline\n" + head.to_markdown(index=False))
    log(f"\nscaling study written to {out}")
    result.update(by_batch=tab, summary=summ, headline=head)
    return result
