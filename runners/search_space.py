"""Declared search spaces of the fair comparison (AlgoPerf's external-tuning rule).

Every registered optimizer declares, in ``configs/leaderboard/search_space/<name>.yaml``, the
distributions over the knobs that set its step::

    optimizer: kfac
    space:                          # sampled per trial
      lr: {log: [1.0e-3, 1.0]}      # log-uniform on [low, high]
      momentum: {one_minus_log: [1.0e-2, 0.5]}   # 1 - log-uniform (AlgoPerf's one_minus_beta)
      eps: {uniform: [0.0, 1.0]}    # uniform
      fisher: {choice: [ef, mc]}    # one of the listed values
    fixed:                          # pinned in every run of the comparison (numerics)
      projection_dtype: float32

Trials are drawn quasi-randomly with ``scipy.stats.qmc.Sobol`` (scrambled, fixed seed): the
same seed gives the same points, so a rerun of a sweep finds its run folders in the run cache.
Keys are checked against the optimizer's real hyperparameters (``build_optimizer``'s check).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from ngbench.optimizers import list_optimizers, make_config

SPACE_DIR = Path(__file__).resolve().parent.parent / "configs" / "leaderboard" / "search_space"
KINDS = ("log", "one_minus_log", "uniform", "choice")


class SearchSpaceError(ValueError):
    """A bad search-space file; the message names the file, the key and the fix."""


@dataclass(frozen=True)
class Dim:
    key: str
    kind: str
    args: tuple[Any, ...]

    def value(self, u: float) -> Any:
        """Map a unit-interval coordinate ``u`` to a value (rounded to 3 significant digits so
        that run-folder names stay short and a value reads the same everywhere)."""
        if self.kind == "choice":
            return self.args[min(int(u * len(self.args)), len(self.args) - 1)]
        lo, hi = self.args
        if self.kind == "uniform":
            x = lo + u * (hi - lo)
        else:
            x = math.exp(math.log(lo) + u * (math.log(hi) - math.log(lo)))
            if self.kind == "one_minus_log":
                return _round(1.0 - x)
        return _round(x)

    def describe(self) -> str:
        if self.kind == "choice":
            return "{" + ", ".join(map(str, self.args)) + "}"
        lo, hi = self.args
        if self.kind == "one_minus_log":
            return f"1 - log-uniform[{lo:g}, {hi:g}]  (= [{1 - hi:g}, {1 - lo:g}])"
        return f"{'log-' if self.kind == 'log' else ''}uniform[{lo:g}, {hi:g}]"


def _round(x: float) -> float:
    return float(f"{x:.3g}")


@dataclass(frozen=True)
class SearchSpace:
    optimizer: str
    dims: tuple[Dim, ...]
    fixed: dict[str, Any]
    path: Path

    def sample(self, n: int, *, seed: int = 0) -> list[dict[str, Any]]:
        """``n`` quasi-random points (scrambled Sobol, ``seed``) as ``{key: value}``."""
        if n < 1:
            raise SearchSpaceError(f"number of trials must be >= 1, got {n}")
        from scipy.stats import qmc

        try:
            sobol = qmc.Sobol(d=len(self.dims), scramble=True, rng=seed)
        except TypeError:  # scipy < 1.15 names it seed (same generator)
            sobol = qmc.Sobol(d=len(self.dims), scramble=True, seed=seed)
        # Sobol points are balanced in blocks of 2^m; draw the enclosing power of two
        m = max(0, math.ceil(math.log2(n)))
        points = sobol.random_base2(m)[:n]
        return [
            {d.key: d.value(float(u)) for d, u in zip(self.dims, row, strict=True)}
            for row in points
        ]

    def as_dict(self) -> dict[str, Any]:
        return {
            "space": {d.key: {d.kind: list(d.args)} for d in self.dims},
            "fixed": dict(self.fixed),
        }


def _parse_dim(path: Path, key: str, spec: Any) -> Dim:
    if not (isinstance(spec, dict) and len(spec) == 1 and next(iter(spec)) in KINDS):
        raise SearchSpaceError(
            f"{path}: space.{key} must be one of {{log|one_minus_log|uniform: [low, high]}} or "
            f"{{choice: [v1, v2, ...]}}, got {spec!r}"
        )
    kind, args = next(iter(spec.items()))
    if not isinstance(args, list) or not args:
        raise SearchSpaceError(f"{path}: space.{key}.{kind} must be a non-empty list")
    if kind != "choice":
        ok = len(args) == 2 and all(isinstance(a, (int, float)) for a in args)
        ok = ok and args[0] < args[1] and (kind == "uniform" or args[0] > 0)
        if not ok:
            raise SearchSpaceError(
                f"{path}: space.{key}.{kind} must be [low, high] with low < high"
                + ("" if kind == "uniform" else " and low > 0")
                + f", got {args!r}"
            )
    return Dim(key, kind, tuple(args))


def load(name: str, folder: Path | None = None) -> SearchSpace:
    """The declared search space of optimizer ``name``, checked against its hyperparameters."""
    path = Path(folder or SPACE_DIR) / f"{name}.yaml"
    if not path.exists():
        raise SearchSpaceError(
            f"optimizer {name!r} declares no search space: create {path} (see "
            f"{SPACE_DIR}/sgd.yaml for the format)"
        )
    raw = yaml.safe_load(path.read_text()) or {}
    unknown = set(raw) - {"optimizer", "space", "fixed"}
    if unknown:
        raise SearchSpaceError(
            f"{path}: unknown top-level key(s) {sorted(unknown)}; valid: optimizer, space, fixed"
        )
    if raw.get("optimizer") != name:
        raise SearchSpaceError(
            f"{path}: 'optimizer' must be {name!r}, got {raw.get('optimizer')!r}"
        )
    space, fixed = raw.get("space") or {}, raw.get("fixed") or {}
    if not space:
        raise SearchSpaceError(f"{path}: 'space' is empty; declare at least lr")
    dims = tuple(_parse_dim(path, k, v) for k, v in space.items())
    both = set(space) & set(fixed)
    if both:
        raise SearchSpaceError(f"{path}: {sorted(both)} both searched and fixed; keep one")
    ss = SearchSpace(name, dims, dict(fixed), path)
    # the real check: every corner of the space is a valid hyperparameter set
    for u in (0.0, 1.0 - 1e-12):
        try:
            make_config(name, **fixed, **{d.key: d.value(u) for d in dims})
        except ValueError as exc:
            raise SearchSpaceError(f"{path}: {exc}") from exc
    return ss


def load_all(names: list[str] | None = None) -> dict[str, SearchSpace]:
    return {n: load(n) for n in (names or list_optimizers())}


def format_spaces(names: list[str] | None = None) -> str:
    """Text for ``ngbench list optimizers --search-space``."""
    lines = []
    for name, ss in load_all(names).items():
        lines.append(f"{name}  ({ss.path.relative_to(SPACE_DIR.parent.parent.parent)})")
        w = max(len(d.key) for d in ss.dims)
        lines += [f"  {d.key:<{w}}  {d.describe()}" for d in ss.dims]
        lines += [f"  {k:<{w}}  = {v}  (fixed)" for k, v in ss.fixed.items()]
    return "\n".join(lines)
