"""Shared curvature core for the K-FAC family (K-FAC, EKFAC, TKFAC/TEKFAC, NG+, MBF, SNGD).

Block-diagonal (per-layer) natural-gradient methods in the sense of Martens & Grosse 2015
("Optimizing Neural Networks with Kronecker-factored Approximate Curvature") all follow one
skeleton (ALGORITHMS.md §0.3b): hooks capture each layer's input ``a`` and output gradient ``g``
on *statistic steps*; a per-layer **block** turns them into curvature statistics, refreshes an
inverse / eigendecomposition on *inverse steps*, and preconditions the layer's gradient matrix on
every step; a shared optimizer applies KL clipping and an SGD step (momentum + weight decay on the
preconditioned direction, the "preconditioner + SGD" pattern of §0.6).  Layers without a block
(norms, skipped or unsupported layers, stray parameters) get the plain SGD direction.

Extension API
-------------
A method is a :class:`CurvatureBlock` subclass plus a small :class:`CurvatureOptimizer` subclass
whose :meth:`~CurvatureOptimizer.make_block` returns it.  The base class owns hooks, schedules,
timers, KL clip, the SGD step, ``state_dict`` and ``memory_usage``.

Block contract (all tensors in ``self.dtype`` = at least float32, on the layer's device):

* ``update_stats(a, g)`` — called during backward on statistic steps, once per captured forward
  call.  ``a`` is ``layer.input_rows(...)``: ``(N, T, n)`` homogeneous inputs (bias column last),
  or ``(N, T)`` token ids when ``layer.diagonal_input`` (embedding); a block with
  ``homogeneous_input = False`` gets ``(N, T, n-1)`` rows without the bias column (a
  possibly non-contiguous view) and adds the constant-1 column itself; ``g`` is ``(N, T, m)``
  per-example output gradients (already × N, or × N·R with ``loss_average="tokens"``).
  Accumulate *batch* statistics with :meth:`CurvatureBlock.accumulate`.
* ``commit_stats(decay)`` — once per statistic step, in ``step()``: fold the accumulated batch
  statistics (:meth:`CurvatureBlock.take_pending`) into running estimates with
  :meth:`CurvatureBlock.ema` (``decay`` = weight of the OLD value; the first value is the batch
  value).
* ``refresh(damping) -> bool`` — on inverse steps (and the first time statistics exist):
  recompute decompositions; set ``self.ready = True``; return ``False`` on a numerical failure
  (keep the old state — the optimizer warns once).  Use :func:`optimizers._linalg.safe_eigh` /
  ``safe_inv``.
* ``precondition(grad) -> Tensor`` — every step when ``self.ready``: ``m × n`` in, ``m × n`` out
  (``grad = layer.grad_matrix()``; the optimizer writes the result back with KL clip).
* Everything persistent goes in the dict ``self.tensors`` (saved by ``state_dict``, counted by
  ``memory_usage``); python scalars in ``self.meta``.

Example (a diagonal-of-A toy method)::

    class DiagABlock(CurvatureBlock):
        def update_stats(self, a, g):
            rows = a.reshape(-1, a.shape[-1]).to(self.dtype)
            self.accumulate("A", (rows * rows).sum(0), rows=rows.shape[0])

        def commit_stats(self, decay):
            sums, rows, _ = self.take_pending()
            self.ema("A", sums["A"] / rows, decay)

        def refresh(self, damping):
            self.tensors["Ainv"] = 1.0 / (self.tensors["A"] + damping)
            self.ready = True
            return True

        def precondition(self, grad):
            return grad * self.tensors["Ainv"]

    class DiagA(CurvatureOptimizer):
        def make_block(self, layer):
            return DiagABlock(layer)

A method with options of its own declares a :class:`CurvatureConfig` subclass (fields made
with :func:`optimizers._config.option`), sets ``Config`` to it, and reads ``self.config`` in
``make_block``; the optimizer takes ``(model, config)`` or the config's keys as keywords.

Distributed (KAISA, :mod:`optimizers._distributed`): every exchange goes through the
optimizer's communication object, local in one process.  Under DDP (``torch.distributed``
initialised, world size > 1) it all-reduces every block's pending sums and counters
before ``commit_stats``, ``refresh`` runs only on the block's *inverse worker*, and it
broadcasts the block's **decomposition** tensors.  Block authors declare
``statistic_keys`` — the names in ``tensors`` maintained by ``commit_stats`` (identical on every
rank; never broadcast).  Every other tensor is a decomposition: written by ``refresh`` (which
must not modify statistics), broadcast to the holders and dropped on the other ranks when
``grad_worker_fraction < 1``.  A block whose ``update_stats``/``commit_stats``/``precondition``
reads or updates decomposition tensors (EKFAC's eigenbasis and scalings) sets
``decomposition_on_every_rank = True``.  ``refresh_cost()`` (default ``n³ + m³``) balances
the load.  Pending statistics must be floating tensors that are sums (or means) over the local
batch, with the row/example counts passed to :meth:`CurvatureBlock.accumulate`.

:class:`optimizers._kronecker.KroneckerBlock` is the reusable ``A ⊗ G`` block (factors, eigen /
factored-Tikhonov / inverse damping); :class:`optimizers._eigencorrect.EigenCorrectedBlock` adds
eigenvalue-corrected scalings to any such factor structure (EKFAC, TEKFAC).
"""

from __future__ import annotations

import fnmatch
import logging
import math
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum, auto
from typing import Any, cast

import torch
from torch import Tensor, nn

from ._config import OptimizerConfig, OptimizerConfigError, Schedule, option
from ._distributed import Assignment, Comm, LocalComm, PendingStats, Refreshed, make_comm
from ._layers import LayerHelper, LossAverage, make_helper, unsupported_reason
from ._linalg import compute_dtype
from .param_groups import split_decay_groups

__all__ = [
    "FISHER_TYPES",
    "PHASES",
    "CurvatureBlock",
    "CurvatureOptimizer",
    "CurvatureConfig",
    "Fisher",
    "Schedule",
    "STAT_DTYPES",
    "StatDtype",
    "check_schedule",
    "freq_at",
]

log = logging.getLogger(__name__)

class Fisher(StrEnum):
    """``ef``: G from the training backward (empirical Fisher); ``mc``: from the sampled-label
    backward run inside :meth:`CurvatureOptimizer.sampled_backward` (true Fisher, MC estimate)."""

    ef = auto()
    mc = auto()


class StatDtype(StrEnum):
    """dtype of the per-step batch sums of blocks that have one (null: the compute dtype)."""

    float32 = auto()
    float64 = auto()


FISHER_TYPES = tuple(Fisher)
PHASES = ("statistics", "inverse", "precondition")
#: ``stat_dtype`` choices: dtype of the per-step batch sums of blocks that have one
STAT_DTYPES: dict[str | None, torch.dtype | None] = {
    None: None, "float32": torch.float32, "float64": torch.float64,
}


@dataclass(kw_only=True)
class CurvatureConfig(OptimizerConfig):
    """The options every curvature optimizer shares.

    SGD (``lr``, ``momentum``, ``nesterov``, ``weight_decay``) acts on the preconditioned
    direction.  ``damping`` lives in each param group (a schedule may change
    ``group["damping"]``; it takes effect at the next refresh).  ``stat_every``/``inv_every``
    may be a callable ``step -> int`` in the Python API.  ``kl_clip``: ALGORITHMS.md §0.7.
    ``grad_worker_fraction`` (KAISA, only under DDP with world size ``W > 1``): ``1`` = every
    rank holds every decomposition (COMM_OPT), ``1/W`` = one rank per layer preconditions and
    broadcasts the result (MEM_OPT); ``W·f`` must divide ``W``.  ``stat_dtype="float64"`` makes
    a 2-process DDP run reproduce a 1-process run within 1e-4, where float32 sums drift ~2e-4,
    at about twice the statistics cost on CPU.
    """

    lr: float = option(0.1, "learning rate", ge=0)
    momentum: float = option(0.9, "heavy-ball momentum on the preconditioned direction", ge=0, lt=1)
    nesterov: bool = option(False, "Nesterov momentum (needs momentum > 0)")
    weight_decay: float = option(0.0, "weight decay (not on biases and norms)", ge=0)
    damping: float = option(1e-2, "Tikhonov damping of the curvature (per param group)", gt=0)
    stat_every: int = option(10, "statistics on steps k % stat_every == 0", schedule=True)
    inv_every: int = option(
        100, "inverse / eigendecomposition refresh every k steps", schedule=True
    )
    stat_decay: float = option(0.95, "EMA weight of the OLD statistic", ge=0, lt=1)
    kl_clip: float | None = option(1e-2, "KL clip kappa (null: off)", gt=0)
    fisher: Fisher = option(Fisher.ef, "ef: training labels; mc: sampled labels (extra backward)")
    loss_average: LossAverage = option(
        LossAverage.batch, "batch: hook grad x N; tokens: x N*R (every token an example)"
    )
    skip_layers: list[str] | None = option(
        None, "module names, globs or class names left to plain SGD"
    )
    layers: list[str] | None = option(
        None, "null: every supported layer; else only these (an unsupported one is an error)"
    )
    grad_worker_fraction: float = option(
        1.0, "DDP (KAISA): 1 = every rank holds every decomposition; 1/world: one per layer",
        gt=0, le=1,
    )
    stat_dtype: StatDtype | None = option(
        None, "batch-sum dtype: null (compute dtype), float32 or float64 (exact DDP)"
    )

    def check(self) -> None:
        if self.nesterov and self.momentum <= 0:
            raise OptimizerConfigError("optimizer.nesterov=true needs optimizer.momentum > 0")


def check_schedule(key: str, value: Any) -> Schedule:
    """``value`` as a frequency (:data:`Schedule`); a bad one raises naming ``optimizer.key``."""
    if callable(value):
        return cast(Schedule, value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(
            f"optimizer.{key} must be an int >= 1 or a callable step -> int, got {value!r}"
        )
    return value


def freq_at(key: str, sched: Schedule, step: int) -> int:
    """The frequency of ``sched`` at ``step`` (a schedule's value is checked)."""
    f = sched(step) if callable(sched) else sched
    if isinstance(f, bool) or not isinstance(f, int) or f < 1:
        raise ValueError(f"optimizer.{key} schedule returned {f!r} at step {step}; need int >= 1")
    return f


def _matches(pattern: str, name: str, module: nn.Module) -> bool:
    return pattern == name or pattern == type(module).__name__ or fnmatch.fnmatchcase(name, pattern)


class CurvatureBlock:
    """Curvature state of one layer; subclass and implement the four methods below."""

    #: ``False``: ``update_stats`` receives inputs without the bias column (``(N, T, n-1)``
    #: for a layer with a bias) and handles the constant-1 column itself (saves a copy)
    homogeneous_input = True
    #: ``True``: ``update_stats`` receives the module's raw (detached) input instead of
    #: ``input_rows`` (e.g. to unfold a conv input chunk by chunk); safe without a copy
    #: because autograd itself keeps that input for the weight gradient (in-place changes
    #: to it would fail the backward)
    raw_input = False
    #: ``True``: ``update_stats`` receives the hook's raw output gradient (the layer's
    #: ``output_rows`` not applied: the block scales it, e.g. with ``layer.output_gram``)
    raw_output = False
    #: input-row elements per chunk when a raw-input block builds rows itself
    #: (:meth:`row_chunks`): ~8 MB in float32, cache-sized
    ROW_CHUNK_ELEMENTS = 1 << 21

    #: names in ``tensors`` that are running *statistics* (written by ``commit_stats`` from the
    #: rank-averaged pending sums, so identical on every rank; never broadcast).  Everything
    #: else in ``tensors`` is a *decomposition* (written by ``refresh``; broadcast from the
    #: inverse worker under DDP).  ``None``: inferred as the keys written with :meth:`ema`.
    statistic_keys: frozenset[str] | None = None

    #: ``True`` when the block needs its decomposition on every rank even with
    #: ``grad_worker_fraction < 1`` (its statistics or preconditioning read/update it)
    decomposition_on_every_rank = False

    def __init__(self, layer: LayerHelper) -> None:
        self.layer = layer
        self.dtype = compute_dtype(layer.weight.dtype)
        self.device = layer.weight.device
        #: dtype of the per-step batch sums of outer products (blocks that form them read it;
        #: the optimizer's ``stat_dtype`` promotes it)
        self.stat_dtype = self.dtype
        #: persistent tensors (saved in ``state_dict``, counted in ``memory_usage``)
        self.tensors: dict[str, Tensor] = {}
        #: persistent python scalars
        self.meta: dict[str, Any] = {"ready": False}
        #: batch statistics since the last commit (:meth:`accumulate`, :meth:`take_pending`)
        self.pending = PendingStats()

    # -- to implement -----------------------------------------------------------
    def update_stats(self, a: Tensor, g: Tensor) -> None:
        raise NotImplementedError

    def commit_stats(self, decay: float) -> None:
        raise NotImplementedError

    def refresh(self, damping: float) -> bool:
        raise NotImplementedError

    def precondition(self, grad: Tensor) -> Tensor:
        raise NotImplementedError

    # -- helpers ----------------------------------------------------------------
    @property
    def ready(self) -> bool:
        """``True`` once :meth:`precondition` may be called."""
        return bool(self.meta.get("ready", False))

    @ready.setter
    def ready(self, value: bool) -> None:
        self.meta["ready"] = bool(value)

    @property
    def has_stats(self) -> bool:
        """Running statistics exist (at least one :meth:`commit_stats`)."""
        return bool(self.meta.get("commits", 0))

    @property
    def has_pending(self) -> bool:
        return self.pending.rows > 0

    def row_chunks(self, a: Tensor, g: Tensor) -> Iterator[tuple[Tensor, Tensor]]:
        """``(rows, g_chunk)``: input rows without the bias column (``input_rows``) of the raw
        input ``a``, a few examples at a time (``layer.example_chunks``, about
        ``ROW_CHUNK_ELEMENTS`` entries each), with the matching output rows."""
        for ai, gi in self.layer.example_chunks(a, g, elements=self.ROW_CHUNK_ELEMENTS):
            yield self.layer.input_rows(ai, homogeneous=False), gi

    def accumulate(self, key: str, value: Tensor, *, rows: int = 0, examples: int = 0) -> None:
        """Add ``value`` to the pending batch sum ``key``; count ``rows``/``examples`` once per
        captured call (pass them with one of the keys only)."""
        self.pending.add(key, value, rows=rows, examples=examples)

    def set_pending(self, stats: PendingStats) -> None:
        """Replace the pending statistics (the comm hands back their sum over ranks)."""
        self.pending = stats

    def take_pending(self) -> tuple[dict[str, Tensor], int, int]:
        """``(sums, rows, examples)`` accumulated since the last commit; clears them."""
        p = self.pending
        self.pending = PendingStats()
        self.meta["commits"] = int(self.meta.get("commits", 0)) + 1
        return p.sums, p.rows, p.examples

    def stat_keys(self) -> frozenset[str] | None:
        """The statistic names (declared, or inferred from :meth:`ema`; ``None``: unknown)."""
        if self.statistic_keys is not None:
            return frozenset(self.statistic_keys)
        inferred = self.meta.get("ema_keys")
        return frozenset(inferred) if inferred else None

    def decomposition_keys(self) -> set[str]:
        """Names in ``tensors`` that are decompositions (not statistics)."""
        stats = self.stat_keys() or frozenset()
        return {k for k in self.tensors if k not in stats}

    def refresh_cost(self) -> float:
        """Relative cost of :meth:`refresh` for the distributed load balance (``n³ + m³``)."""
        n = self.layer.in_dim if not self.layer.diagonal_input else 1
        return float(n**3 + self.layer.out_dim**3)

    def discard_pending(self) -> None:
        self.pending = PendingStats()

    def ema(self, key: str, value: Tensor, decay: float) -> Tensor:
        """``X <- decay·X + (1-decay)·value`` (first call: ``X = value``)."""
        cur = self.tensors.get(key)
        if self.statistic_keys is None and key not in self.meta.get("ema_keys", ()):
            self.meta["ema_keys"] = [*self.meta.get("ema_keys", ()), key]
        if cur is None:
            self.tensors[key] = value.to(self.dtype).clone()
        else:
            cur.mul_(decay).add_(value.to(self.dtype), alpha=1.0 - decay)
        return self.tensors[key]

    def memory_bytes(self) -> dict[str, int]:
        return {k: t.numel() * t.element_size() for k, t in self.tensors.items()}

    def state_dict(self) -> dict[str, Any]:
        return {
            "tensors": {k: t.detach().clone() for k, t in self.tensors.items()},
            "meta": dict(self.meta),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.tensors = {
            k: t.detach()
            .to(device=self.device, dtype=self.dtype if t.is_floating_point() else t.dtype)
            .clone()
            for k, t in state["tensors"].items()
        }
        self.meta = dict(state["meta"])
        self.discard_pending()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.layer!r})"


class _Capture:
    """One forward call of a registered layer on a statistic step."""

    __slots__ = ("a", "used", "fallback")

    def __init__(self, a: Tensor) -> None:
        self.a: Tensor | None = a
        self.used = False
        self.fallback: Tensor | None = None


class CurvatureOptimizer(torch.optim.Optimizer):
    """Shared optimizer for per-layer curvature blocks (see the module docstring).

    Options: :class:`CurvatureConfig` (or the method's subclass of it), given as a config or as
    its keys (``KFAC(model, damping=1e-3)``).

    Under DDP build the optimizer on the bare model after ``init_process_group``; the
    distributed work assignment is made at the first :meth:`step`.  Before saving a checkpoint
    from one rank with ``grad_worker_fraction < 1`` call :meth:`consolidate_state_dict` on every
    rank.
    """

    #: the config dataclass of this optimizer (a method with options of its own sets its own)
    Config: type[CurvatureConfig] = CurvatureConfig

    def __init__(
        self, model: nn.Module, config: CurvatureConfig | None = None, /, **hparams: Any
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ValueError(f"a curvature optimizer needs the model (nn.Module), got {model!r}")
        cfg = self.Config.build(config, hparams)
        #: the validated hyperparameters (one :class:`CurvatureConfig` subclass per method)
        self.config = cfg
        stat_every, inv_every = cfg.stat_every, cfg.inv_every
        if isinstance(stat_every, int) and isinstance(inv_every, int) and inv_every % stat_every:
            warnings.warn(
                f"optimizer.inv_every={inv_every} is not a multiple of "
                f"optimizer.stat_every={stat_every}",
                stacklevel=2,
            )
        self.grad_worker_fraction = float(cfg.grad_worker_fraction)
        self.stat_dtype = STAT_DTYPES[None if cfg.stat_dtype is None else str(cfg.stat_dtype)]
        self.stat_every: Schedule = stat_every
        self.inv_every: Schedule = inv_every
        self.stat_decay = float(cfg.stat_decay)
        self.kl_clip = None if cfg.kl_clip is None else float(cfg.kl_clip)
        self.fisher = str(cfg.fisher)
        self.loss_average = str(cfg.loss_average)
        weight_decay = cfg.weight_decay

        groups = split_decay_groups(model, float(weight_decay))
        defaults = dict(
            lr=float(cfg.lr),
            momentum=float(cfg.momentum),
            nesterov=bool(cfg.nesterov),
            weight_decay=float(weight_decay),
            damping=float(cfg.damping),
        )
        super().__init__(groups, defaults)

        self.model = model
        self.layers: dict[str, LayerHelper] = self._discover(
            model,
            list(cfg.skip_layers or []),
            None if cfg.layers is None else list(cfg.layers),
        )
        self.blocks: dict[str, CurvatureBlock] = {
            name: self.make_block(h) for name, h in self.layers.items()
        }
        if self.stat_dtype is not None:
            for block in self.blocks.values():
                block.stat_dtype = torch.promote_types(self.stat_dtype, block.dtype)
        group_of = {id(p): i for i, g in enumerate(self.param_groups) for p in g["params"]}
        self._group_index = {n: group_of[id(h.weight)] for n, h in self.layers.items()}

        self._step = 0
        self._times = dict.fromkeys(PHASES, 0.0)
        self._captures: dict[str, list[_Capture]] = {n: [] for n in self.layers}
        self._sampling = False
        self._warned: set[str] = set()
        self.last_kl_scale = 1.0
        self._handles = [
            h.module.register_forward_hook(self._make_forward_hook(n))
            for n, h in self.layers.items()
        ]
        self._capture_on = self.capture_step(0)
        #: the communication object: :class:`LocalComm` until the first step, then the one
        #: :func:`~optimizers._distributed.make_comm` picks (KAISA under DDP)
        self._comm: Comm = LocalComm(self.blocks)
        self._comm_ready = False
        self._after_load: set[str] | None = None
        self._consolidated: dict[str, dict[str, Tensor]] = {}

    # ------------------------------------------------------------------ extension points
    def make_block(self, layer: LayerHelper) -> CurvatureBlock:
        """The curvature block of one layer (override in each method)."""
        raise NotImplementedError

    def is_stat_step(self, step: int) -> bool:
        return step % freq_at("stat_every", self.stat_every, step) == 0

    def is_inv_step(self, step: int) -> bool:
        return step % freq_at("inv_every", self.inv_every, step) == 0

    def capture_step(self, step: int) -> bool:
        """Whether hooks capture ``(a, g)`` during the forward/backward of ``step``
        (default: statistic steps; override e.g. for per-step scalings)."""
        return self.is_stat_step(step)

    # ------------------------------------------------------------------ layer discovery
    def _discover(
        self, model: nn.Module, skip: list[str], only: list[str] | None
    ) -> dict[str, LayerHelper]:
        found: dict[str, LayerHelper] = {}
        skipped: list[str] = []
        used_skip: set[str] = set()
        used_only: set[str] = set()
        for name, module in model.named_modules():
            own = list(module.parameters(recurse=False))
            if not own:
                continue
            label = name or "<root>"
            hits = [s for s in skip if _matches(s, name, module)]
            if hits:
                used_skip.update(hits)
                skipped.append(f"{label} (skip_layers)")
                continue
            if only is not None:
                hits = [s for s in only if _matches(s, name, module)]
                if not hits:
                    skipped.append(f"{label} (not in layers)")
                    continue
                used_only.update(hits)
            reason = unsupported_reason(module)
            if reason is not None:
                if only is not None:
                    raise ValueError(f"optimizer.layers asks to precondition {label!r}: {reason}")
                if isinstance(module, nn.Conv2d):
                    warnings.warn(
                        f"{label}: {reason}; it gets the plain SGD direction", stacklevel=3
                    )
                skipped.append(f"{label} ({type(module).__name__})")
                continue
            if not all(p.requires_grad for p in own):
                skipped.append(f"{label} (frozen parameters)")
                continue
            found[name] = make_helper(name, module, loss_average=self.loss_average)
        for key, names, used in (
            ("skip_layers", skip, used_skip),
            ("layers", only or [], used_only),
        ):
            missing = [s for s in names if s not in used]
            if missing:
                raise ValueError(
                    f"optimizer.{key} entry {missing[0]!r} matches no module with parameters; "
                    "use module names (model.named_modules()), globs or class names"
                )
        # a parameter shared by two layers (tied weights) cannot take two preconditioners
        owner: dict[int, str] = {}
        shared: set[str] = set()
        for name, h in found.items():
            for p in h.params():
                if id(p) in owner:
                    shared.update({name, owner[id(p)]})
                owner[id(p)] = name
        if shared:
            warnings.warn(
                f"layers {sorted(shared)} share parameters; they get the plain SGD direction",
                stacklevel=3,
            )
            for name in shared:
                found.pop(name)
                skipped.append(f"{name or '<root>'} (shared parameters)")
        covered = {id(p) for h in found.values() for p in h.params()}
        stray = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in covered]
        log.info(
            "%s: preconditioning %d layers (%s); plain SGD direction for %d parameters%s",
            type(self).__name__,
            len(found),
            ", ".join(n or "<root>" for n in found),
            len(stray),
            f" of {', '.join(skipped)}" if skipped else "",
        )
        self.skipped_layers = skipped
        return found

    # ------------------------------------------------------------------ hooks
    def _make_forward_hook(self, name: str) -> Callable[..., None]:
        layer = self.layers[name]
        captures = self._captures[name]
        homogeneous = self.blocks[name].homogeneous_input
        raw = self.blocks[name].raw_input

        def hook(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
            if not self._capture_on or not module.training:
                return
            if not isinstance(output, Tensor) or not output.requires_grad or not inputs:
                return
            t0 = time.perf_counter()
            a = inputs[0]
            entry = _Capture(a.detach() if raw else layer.input_rows(a, homogeneous=homogeneous))
            captures.append(entry)
            output.register_hook(lambda g: self._grad_hook(name, entry, g))
            self._times["statistics"] += time.perf_counter() - t0

        return hook

    def _grad_hook(self, name: str, entry: _Capture, g: Tensor) -> None:
        if entry.used or entry.a is None:
            return
        if self.fisher == "mc" and not self._sampling:
            entry.fallback = g  # used only if no sampled backward happens on this step
            return
        if self.fisher == "ef" and self._sampling:
            return
        self._consume(name, entry, g)

    def _consume(self, name: str, entry: _Capture, g: Tensor) -> None:
        t0 = time.perf_counter()
        layer = self.layers[name]
        a = entry.a
        assert a is not None, "a capture is consumed once"
        entry.a, entry.used, entry.fallback = None, True, None
        block = self.blocks[name]
        block.update_stats(a, g.detach() if block.raw_output else layer.output_rows(g))
        self._times["statistics"] += time.perf_counter() - t0

    # ------------------------------------------------------------------ MC Fisher
    def needs_sampled_backward(self) -> bool:
        """``True`` when the loop should run a sampled-label backward in
        :meth:`sampled_backward` before the training backward of this step."""
        return (
            self.fisher == "mc"
            and self._capture_on
            and any(h.module.training for h in self.layers.values())
        )

    @contextmanager
    def sampled_backward(self) -> Iterator[None]:
        """Backward passes inside record ``G`` from sampled labels; the parameters' ``.grad``
        are restored to their values at entry on exit (the sampled gradients never leak)."""
        saved = {
            p: (None if p.grad is None else p.grad.clone())
            for g in self.param_groups
            for p in g["params"]
        }
        self._sampling = True
        try:
            yield
        finally:
            self._sampling = False
            for p, grad in saved.items():
                p.grad = grad

    # ------------------------------------------------------------------ the step
    def _warn_once(self, key: str, msg: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(msg, RuntimeWarning, stacklevel=3)

    def _finish_statistics(self) -> list[str]:
        """Consume leftover captures, commit pending statistics; names that got statistics."""
        t0 = time.perf_counter()
        for name, caps in self._captures.items():
            for entry in caps:
                if entry.fallback is not None and not entry.used:
                    self._warn_once(
                        "no-sampled",
                        f"{type(self).__name__}(fisher='mc'): no sampled-label backward on a "
                        "statistic step; using the training-label gradients (empirical "
                        "Fisher) for it. Run the sampled backward inside opt.sampled_backward().",
                    )
                    self._consume(name, entry, entry.fallback)
            caps.clear()
        comm0 = self._comm.seconds
        self._comm.reduce_pending([b for b in self.blocks.values() if b.has_pending])
        fresh = []
        for name, block in self.blocks.items():
            if block.has_pending:
                block.commit_stats(self.stat_decay)
                fresh.append(name)
        self._times["statistics"] += time.perf_counter() - t0 - self._comm_delta(comm0)
        return fresh

    def _refresh(self, names: Sequence[str]) -> None:
        t0 = time.perf_counter()
        comm0 = self._comm.seconds
        names = [n for n in names if self.blocks[n].has_stats]
        results: dict[str, Refreshed] = {}
        for name in names:
            block = self.blocks[name]
            if not self._comm.is_inverse_worker(name):
                continue
            before = {k: id(t) for k, t in block.tensors.items()}
            damping = self.param_groups[self._group_index[name]]["damping"]
            ok = block.refresh(float(damping))
            stats = block.stat_keys()
            if stats is not None:
                keys = sorted(k for k in block.tensors if k not in stats)
            else:  # undeclared: whatever refresh added or replaced
                keys = sorted(k for k, t in block.tensors.items() if before.get(k) != id(t))
            results[name] = Refreshed(bool(ok), keys)
        if names:
            oks = self._comm.share_decompositions(names, self.blocks, results)
            for name, ok in oks.items():
                if not ok:
                    self._refresh_failed(name)
        self._times["inverse"] += time.perf_counter() - t0 - self._comm_delta(comm0)

    def _refresh_failed(self, name: str) -> None:
        self._warn_once(
            "refresh-failed",
            f"{type(self).__name__}: the eigendecomposition/inverse of layer {name!r} "
            "failed in float32 and float64; keeping the previous factors",
        )

    def _precondition(self) -> None:
        t0 = time.perf_counter()
        comm0 = self._comm.seconds
        grads: dict[str, Tensor] = {}
        mine: dict[str, Tensor] = {}
        for name, block in self.blocks.items():
            if not block.ready:
                continue
            grad = self.layers[name].grad_matrix()
            if grad is None:
                continue
            grads[name] = grad
            if self._comm.holds(name):
                mine[name] = block.precondition(grad.to(block.dtype))
        if grads:
            shapes = {n: (g.shape, self.blocks[n].dtype) for n, g in grads.items()}
            device = next(iter(grads.values())).device
            mine = self._comm.share_gradients(shapes, mine, device)
        done: list[tuple[LayerHelper, Tensor]] = []
        vdotp = 0.0
        for name, grad in grads.items():
            p = mine[name]
            if self.kl_clip is not None:
                lr = self.param_groups[self._group_index[name]]["lr"]
                vdotp += lr * lr * float((p * grad).sum())
            done.append((self.layers[name], p))
        scale = 1.0
        if self.kl_clip is not None and vdotp != 0.0:
            scale = min(1.0, math.sqrt(self.kl_clip / abs(vdotp)))
        self.last_kl_scale = scale
        for layer, p in done:
            layer.set_grad(p * scale if scale != 1.0 else p)
        self._times["precondition"] += time.perf_counter() - t0 - self._comm_delta(comm0)

    def _sgd(self) -> None:
        for group in self.param_groups:
            lr, mom, wd = group["lr"], group["momentum"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                d = p.grad
                if wd != 0:
                    d = d.add(p, alpha=wd)
                if mom != 0:
                    state = self.state[p]
                    buf = state.get("momentum_buffer")
                    if buf is None:
                        buf = state["momentum_buffer"] = d.detach().clone()
                    else:
                        buf.mul_(mom).add_(d)
                    d = d.add(buf, alpha=mom) if group["nesterov"] else buf
                p.add_(d, alpha=-lr)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        k = self._step
        self._setup_distributed()
        fresh = self._finish_statistics()
        if self.is_inv_step(k):
            self._refresh(list(self.blocks))
        else:
            again = self._after_load or set()
            self._refresh([n for n in self.blocks if n in again or (
                n in fresh and not self.blocks[n].ready)])
        self._after_load = None
        self._precondition()
        self._sgd()
        self._step = k + 1
        self._capture_on = self.capture_step(self._step)
        return loss

    # ------------------------------------------------------------------ distributed
    def _setup_distributed(self) -> None:
        if self._comm_ready:
            return
        self._comm_ready = True
        self._comm = make_comm(
            self.blocks, grad_worker_fraction=self.grad_worker_fraction,
            owner=type(self).__name__,
        )
        if self._comm.world > 1:
            self._times.setdefault("communication", 0.0)
        if self._after_load is not None:
            self._comm.trim(self.blocks)

    def _comm_delta(self, before: float) -> float:
        """Communication seconds since ``before`` (added to the ``communication`` phase)."""
        d = self._comm.seconds - before
        if d:
            self._times["communication"] = self._times.get("communication", 0.0) + d
        return d

    @property
    def work_assignment(self) -> Assignment:
        """The KAISA work :class:`~optimizers._distributed.Assignment` (in one process, and
        before the first step, the one-rank assignment: this rank does everything)."""
        return self._comm.assignment

    def consolidate_state_dict(self, to: int = 0) -> None:
        """Collective (call on every rank): gather the decompositions rank ``to`` does not hold
        so that its next :meth:`state_dict` is complete (``grad_worker_fraction < 1``)."""
        self._setup_distributed()
        self._consolidated = self._comm.gather_to(to, self.blocks)

    # ------------------------------------------------------------------ reporting
    @property
    def steps_taken(self) -> int:
        return self._step

    def phase_times(self) -> dict[str, float]:
        """Cumulative seconds per phase (``statistics`` includes the hook work)."""
        return dict(self._times)

    def refresh_period(self) -> int:
        """Steps between inverse refreshes (``inv_every``; a schedule's value at this step)."""
        return freq_at("inv_every", self.inv_every, self._step)

    def memory_usage(self) -> dict[str, int]:
        """Bytes of curvature state per tensor kind (e.g. ``A``, ``G``, ``QA``) and ``total``."""
        out: dict[str, int] = {}
        for block in self.blocks.values():
            for k, v in block.memory_bytes().items():
                out[k] = out.get(k, 0) + v
        out["total"] = sum(out.values())
        return out

    def remove_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._capture_on = False

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        blocks = {n: b.state_dict() for n, b in self.blocks.items()}
        for name, extra in self._consolidated.items():
            blocks[name]["tensors"].update({k: t.clone() for k, t in extra.items()})
        self._consolidated = {}
        sd["curvature"] = {"step": self._step, "blocks": blocks}
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        sd = dict(state_dict)
        curv = sd.pop("curvature", None)
        if curv is None:
            raise ValueError(
                f"{type(self).__name__}.load_state_dict: the state has no 'curvature' entry "
                "(factors and step counter); was it saved by a different optimizer?"
            )
        names = set(curv["blocks"])
        if names != set(self.blocks):
            raise ValueError(
                f"{type(self).__name__}.load_state_dict: saved layers {sorted(names)} differ "
                f"from this optimizer's {sorted(self.blocks)}"
            )
        super().load_state_dict(sd)
        for name, block in self.blocks.items():
            block.load_state_dict(curv["blocks"][name])
        self._step = int(curv["step"])
        # a ready block saved without its decomposition (a rank that did not hold it, no
        # consolidate_state_dict): recompute it from the saved statistics at the next step
        again = {n for n, b in self.blocks.items() if b.ready and not b.decomposition_keys()
                 and b.stat_keys() is not None}
        if again:
            warnings.warn(
                f"{type(self).__name__}.load_state_dict: layers {sorted(again)} were saved "
                "without their decomposition; it is recomputed from the saved statistics at "
                "the next step (call consolidate_state_dict() on every rank before saving)",
                RuntimeWarning, stacklevel=2,
            )
        self._after_load = again
        self._comm.trim(self.blocks)
        for caps in self._captures.values():
            caps.clear()
        self._capture_on = self.capture_step(self._step)
