"""Run identity: which config keys decide a run's result.

Every key that can change a result is part of a run's identity: its run folder
(``<runs_root>/[debug/<preset>/]<task>_<data>_<flavor>/<optimizer preset>/<tag>/seed<N>``,
where ``<tag>`` lists the result-changing command-line overrides) and its config hash
(``record.json: config_hash``).  The keys in :data:`RESULT_NEUTRAL_KEYS` are in neither:
changing them reruns the same experiment, so a rerun finds (and skips or resumes) the same
folder.  This list is the only place that decides it.

Decided (and why):

* neutral: ``runs_root``, ``task.data_root`` (where files are, not what they hold);
  ``logger`` (W&B only mirrors the run folder); ``objective_metric`` (what a sweeper reads from
  a finished run); ``train.progress`` (a progress bar); ``train.threads`` (CPU speed; float
  sums may differ in the last bits, as between any two machines);
  ``train.eval_every`` and ``train.checkpoint_every`` (when metrics are measured and state is
  saved, not the training trajectory; ``steps_to_target`` is measured at evaluations, so its
  resolution is ``eval_every``).
* part of the identity: everything else, including ``train.device`` (CPU and GPU kernels give
  different numbers and times), ``debug_preset`` (a smoke run is not a real one; its folders live
  under ``<runs_root>/debug/<preset>/``), ``seed``, ``task.*``, ``optimizer.*`` and ``train.*``.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from typing import Any

#: dotted config keys (a key covers everything below it) that never change a result
RESULT_NEUTRAL_KEYS: tuple[str, ...] = (
    "runs_root",
    "objective_metric",
    "logger",
    "task.data_root",
    "train.progress",
    "train.threads",
    "train.eval_every",
    "train.checkpoint_every",
)

#: command-line choices that are folder components of their own (or Hydra's), never in the tag
FOLDER_KEYS: tuple[str, ...] = (
    "task",
    "optimizer",
    "seed",
    "debug",
    "debug_preset",
    "experiment",
    "sweep",
    "tuned",
    "local",
    "hydra",
)

DEBUG_ROOT = "debug"  # debug presets write under <runs_root>/debug/<preset>/


def _covered(key: str, prefixes: Iterable[str]) -> bool:
    return any(key == p or key.startswith(p + ".") or key.startswith(p + "/") for p in prefixes)


def is_result_neutral(key: str) -> bool:
    """True when the dotted ``key`` (or a key above it) is in :data:`RESULT_NEUTRAL_KEYS`."""
    return _covered(key, RESULT_NEUTRAL_KEYS)


def identity_view(resolved: Mapping[str, Any]) -> dict[str, Any]:
    """The resolved config without ``hydra`` and the result-neutral keys."""

    def strip(node: Mapping[str, Any], prefix: str) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in node.items():
            full = f"{prefix}{key}"
            if full == "hydra" or is_result_neutral(full):
                continue
            out[key] = strip(value, full + ".") if isinstance(value, Mapping) else value
        return out

    return strip(resolved, "")


def config_hash(resolved: Mapping[str, Any]) -> str:
    """Hash of the result-deciding part of a resolved config (16 hex digits)."""
    blob = json.dumps(identity_view(resolved), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _flat(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, Mapping):
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(_flat(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: node}


def differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """``key: old -> new`` for every result-changing key whose value differs."""
    a, b = _flat(identity_view(old)), _flat(identity_view(new))
    missing = "(absent)"
    return [
        f"{key}: {a.get(key, missing)!r} -> {b.get(key, missing)!r}"
        for key in sorted(set(a) | set(b))
        if a.get(key, missing) != b.get(key, missing)
    ]


def folder_tag(overrides: Iterable[str]) -> str:
    """Folder component for the result-changing command-line overrides ('default' if none):
    ``key=value`` items sorted and joined by ``,`` (Hydra's ``override_dirname`` format)."""
    items = []
    for line in overrides:
        key = str(line).split("=", 1)[0].lstrip("+~")
        if "=" not in str(line) or key in FOLDER_KEYS or _covered(key, ("hydra",)):
            continue
        if is_result_neutral(key):
            continue
        items.append(str(line))
    if not items:
        return "default"
    return re.sub(r"[^A-Za-z0-9=,._+-]", "_", ",".join(sorted(items)))[:180]


def debug_prefix(preset: str | None) -> str:
    """``debug/<preset>/`` for a debug run, ``""`` for a real one (the folder's first part)."""
    if preset in (None, "", "None", "null"):
        return ""
    return f"{DEBUG_ROOT}/{preset}/"
