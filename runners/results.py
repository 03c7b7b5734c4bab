"""Raw results first: run folders read tolerantly into one long-format table.

One row per run, one column per fact (task, optimizer, budget, seed, status, final and best
metrics, steps and time to target, step time, config hash, commit); numbers stay numbers.
Everything the report prints — means, spreads, tests, markdown and LaTeX — is computed from
this table afterwards (benchopt keeps its results the same way, as a parquet of raw rows).

Reading never stops at a bad file: a ``record.json`` that is cut short, not an object, has
a missing key or a value of the wrong type makes its run *skipped* with the reason; bad
lines of a ``metrics.jsonl`` are dropped with a *note* (the run's numbers come from its
record, so the run stays). Runs that are not finished (status other than completed or
diverged) are skipped as before.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

RECORD, METRICS, CONFIG = "record.json", "metrics.jsonl", "config.yaml"

# what a record.json must hold for its run to enter the tables, and the types allowed
_NUM = (int, float)
_REQUIRED: dict[str, tuple[type, ...]] = {
    "task": (str,),
    "optimizer": (str,),
    "seed": (int,),
    "status": (str,),
}
_OPTIONAL: dict[str, tuple[type, ...]] = {
    "dataset": (str,),
    "flavor": (str,),
    "preset": (str,),
    "debug_preset": (str,),
    "steps_to_target": _NUM,
    "epochs_to_target": _NUM,
    "time_to_target_s": _NUM,
    "mean_step_s": _NUM,
    "train_time_s": _NUM,
    "steps": (int,),
    "steps_done": (int,),
    "batch_size": (int,),
    "lr_mult": _NUM,
    "world_size": (int,),
    "config_hash": (str,),
    "final_metrics": (dict,),
    "best_metrics": (dict,),
    "git": (dict,),
    "target": (dict,),
    "error": (str,),
}
_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", dict: "an object"}


class RecordError(ValueError):
    """A record.json that cannot enter the tables; the message is the reason."""


@dataclass
class Loaded:
    """Usable runs, skipped run folders ``(folder, reason)``, notes ``(file, what)``."""

    runs: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    notes: list[tuple[Path, str]] = field(default_factory=list)


def _type_ok(value: Any, types: tuple[type, ...]) -> bool:
    if isinstance(value, bool):  # JSON true/false is no number
        return False
    if float in types and isinstance(value, int):
        return True
    return isinstance(value, types)


def _want(types: tuple[type, ...]) -> str:
    return " or ".join(_TYPE_NAMES.get(t, t.__name__) for t in dict.fromkeys(types))


def check_record(rec: Any) -> dict[str, Any]:
    """``rec`` if it can enter the tables, else :class:`RecordError` naming the key."""
    if not isinstance(rec, dict):
        raise RecordError(f"expected a JSON object, found {type(rec).__name__}")
    missing = [k for k in _REQUIRED if k not in rec]
    if missing:
        raise RecordError(f"missing key(s) {', '.join(missing)}")
    for key, types in {**_REQUIRED, **_OPTIONAL}.items():
        value = rec.get(key)
        if value is None and key not in _REQUIRED:
            continue
        if not _type_ok(value, types):
            raise RecordError(f"{key!r} must be {_want(types)}, found {value!r:.60}")
    for key in ("final_metrics", "best_metrics"):
        for name, value in (rec.get(key) or {}).items():
            if value is not None and not _type_ok(value, _NUM):
                raise RecordError(f"{key}.{name} must be a number, found {value!r:.60}")
    target = rec.get("target")
    if rec["status"] in ("completed", "diverged"):
        if not isinstance(target, dict):
            raise RecordError("no 'target' object (metric, value, mode)")
        if not isinstance(target.get("metric"), str):
            raise RecordError("'target.metric' must be a string")
        if target.get("mode", "min") not in ("min", "max"):
            raise RecordError(f"'target.mode' must be min or max, found {target.get('mode')!r}")
        if target.get("value") is not None and not _type_ok(target["value"], _NUM):
            raise RecordError(f"'target.value' must be a number, found {target['value']!r:.60}")
    return rec


def read_record(path: Path) -> dict[str, Any]:
    """A checked record; :class:`RecordError` with a one-line reason otherwise."""
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise RecordError(f"unreadable ({type(exc).__name__}: {exc})") from None
    if not text.strip():
        raise RecordError("empty file")
    try:
        rec = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RecordError(f"not valid JSON ({exc}); the file is cut short or corrupt") from None
    return check_record(rec)


def read_metrics(path: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """Good rows of a ``metrics.jsonl`` and what was wrong with the others.

    A good row is a JSON object with a numeric ``step``; other values that are not numbers
    are dropped from their row. A missing file gives no rows and no complaint.
    """
    path = Path(path)
    if not path.exists():
        return [], []
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        return [], [f"unreadable ({type(exc).__name__}); no curves for this run"]
    rows, bad = [], []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            bad.append(f"line {i}: not valid JSON")
            continue
        if not isinstance(row, dict):
            bad.append(f"line {i}: a {type(row).__name__}, not an object")
            continue
        if not _type_ok(row.get("step"), (int,)):
            bad.append(f"line {i}: no integer 'step'")
            continue
        rows.append({k: v for k, v in row.items() if _type_ok(v, _NUM)})
    problems = []
    if bad:
        shown = "; ".join(bad[:3]) + (f"; … {len(bad) - 3} more" if len(bad) > 3 else "")
        problems.append(f"{len(bad)} bad line(s) ignored ({shown})")
    return rows, problems


def _debug_preset(rec: dict[str, Any], folder: Path, runs_dir: Path) -> str | None:
    """The record's ``debug_preset``; for older records a run under ``<runs>/debug/``."""
    if rec.get("debug_preset"):
        return str(rec["debug_preset"])
    try:
        rel = folder.resolve().relative_to(runs_dir.resolve()).parts
    except ValueError:
        rel = folder.parts
    return "debug" if "debug" in rel[:-1] else None


def load_runs(runs_dir: Path) -> Loaded:
    """Read every run folder under ``runs_dir``; never raises for a bad file."""
    from . import records  # imports torch: only when a report is really made

    runs_dir = Path(runs_dir)
    out = Loaded()
    for folder in records.find_run_folders(runs_dir):
        rec_path = folder / RECORD
        if not rec_path.exists():
            out.skipped.append((folder, "no record.json (never started or killed at start-up)"))
            continue
        try:
            rec = read_record(rec_path)
        except RecordError as exc:
            out.skipped.append((folder, f"record.json {exc}"))
            continue
        status = rec["status"]
        if status not in records.TERMINAL:
            why = rec.get("error") or ""
            out.skipped.append((folder, f"status {status}" + (f": {why}" if why else "")))
            continue
        metrics, problems = read_metrics(folder / METRICS)
        out.notes.extend((folder / METRICS, p) for p in problems)
        out.runs.append(
            {
                "path": folder,
                "record": rec,
                "metrics": metrics,
                "debug_preset": _debug_preset(rec, folder, runs_dir),
            }
        )
    return out


# -- the long table ---------------------------------------------------------------
def variant_of(folder: Path) -> str:
    """The hyperparameter-variant folder above ``seed<N>`` (``default`` when none)."""
    parts = Path(folder).parts
    if len(parts) >= 2 and parts[-1].startswith("seed"):
        return parts[-2]
    return "default"


def task_label(rec: dict[str, Any]) -> str:
    return f"{rec['task']}/{rec.get('dataset')}/{rec.get('flavor')}"


def row_label(rec: dict[str, Any], variant: str) -> str:
    """Row label: the optimizer preset (config file) name, plus the hyperparameter variant."""
    name = rec.get("preset") or rec["optimizer"]
    return name if variant == "default" else f"{name} [{variant}]"


def budget_label(steps: Any, batch_size: Any, debug_preset: str | None) -> str:
    """What runs must share to be compared: step budget, global batch and debug preset
    (the flavor is part of the task label)."""
    parts = [f"debug={debug_preset}"] if debug_preset else []
    parts += [f"steps={_or_q(steps)}", f"batch={_or_q(batch_size)}"]
    return ", ".join(parts)


def _or_q(x: Any) -> str:
    return "?" if x is None else str(x)


def _num(x: Any) -> float:
    return float(x) if _type_ok(x, _NUM) else math.nan


INT_COLUMNS = ("seed", "steps", "steps_done", "batch_size", "world_size", "steps_to_target")
FLOAT_COLUMNS = (
    "target",
    "final",
    "best",
    "epochs_to_target",
    "time_to_target_s",
    "mean_step_s",
    "train_time_s",
    "lr_mult",
)


def long_table(runs: list[dict[str, Any]], runs_dir: Path | None = None) -> pd.DataFrame:
    """One row per run: identifiers as strings, every measurement a number (NaN if none).

    ``final``/``best`` are the target metric; ``final.<name>``/``best.<name>`` every metric
    the record holds. ``final`` of a diverged run is NaN (its last value is not a result).
    """
    rows = []
    for run in runs:
        rec, folder = run["record"], Path(run["path"])
        tgt = rec.get("target") or {}
        metric = tgt.get("metric")
        variant = variant_of(folder)
        finals = rec.get("final_metrics") or {}
        bests = rec.get("best_metrics") or {}
        git = rec.get("git") or {}
        debug = run.get("debug_preset")
        try:
            rel = str(folder.resolve().relative_to(Path(runs_dir).resolve())) if runs_dir else ""
        except ValueError:
            rel = ""
        row = {
            "run": rel or str(folder),
            "task": rec["task"],
            "dataset": rec.get("dataset"),
            "flavor": rec.get("flavor"),
            "task_label": task_label(rec),
            "optimizer": rec["optimizer"],
            "preset": rec.get("preset") or rec["optimizer"],
            "variant": variant,
            "label": row_label(rec, variant),
            "seed": rec["seed"],
            "status": rec["status"],
            "debug_preset": debug,
            "is_debug": debug is not None,
            "budget": budget_label(rec.get("steps"), rec.get("batch_size"), debug),
            "steps": rec.get("steps"),
            "steps_done": rec.get("steps_done"),
            "batch_size": rec.get("batch_size"),
            "lr_mult": rec.get("lr_mult"),
            "world_size": rec.get("world_size"),
            "metric": metric,
            "mode": tgt.get("mode", "min"),
            "target": tgt.get("value"),
            "final": _num(finals.get(metric)) if rec["status"] == "completed" else math.nan,
            "best": _num(bests.get(metric)),
            "steps_to_target": rec.get("steps_to_target"),
            "epochs_to_target": rec.get("epochs_to_target"),
            "time_to_target_s": rec.get("time_to_target_s"),
            "mean_step_s": rec.get("mean_step_s"),
            "train_time_s": rec.get("train_time_s"),
            "config_hash": rec.get("config_hash"),
            "commit": git.get("commit"),
            "dirty": git.get("dirty"),
            "path": str(folder),
        }
        for name, value in finals.items():
            row[f"final.{name}"] = _num(value)
        for name, value in bests.items():
            row[f"best.{name}"] = _num(value)
        rows.append(row)
    df = pd.DataFrame(rows)
    if df.empty:
        return df
    for col in INT_COLUMNS:
        df[col] = pd.to_numeric(df[col], errors="coerce").astype("Int64")
    for col in FLOAT_COLUMNS + tuple(c for c in df if c.startswith(("final.", "best."))):
        df[col] = pd.to_numeric(df[col], errors="coerce").astype(float)
    df["dirty"] = df["dirty"].astype("boolean")
    return df


def write_long_table(df: pd.DataFrame, folder: Path, stem: str = "runs") -> list[Path]:
    """``<stem>.parquet`` and ``<stem>.csv`` (missing values: empty CSV cells, parquet nulls)."""
    import io

    from . import records

    folder.mkdir(parents=True, exist_ok=True)
    pq, csv = folder / f"{stem}.parquet", folder / f"{stem}.csv"
    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    records.atomic_write_bytes(pq, buf.getvalue())
    records.atomic_write_text(csv, df.to_csv(index=False))
    return [pq, csv]
