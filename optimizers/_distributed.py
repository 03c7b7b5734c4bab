"""Distributed curvature work for the K-FAC family: the KAISA scheme.

Pauloski et al., "KAISA: An Adaptive Second-Order Optimizer Framework for Deep Neural Networks"
(SC 2021), as summarised in ALGORITHMS.md §1.8.  Under DDP with world size ``W > 1``:

* **statistics** — every rank accumulates its local batch; before ``commit_stats`` the pending
  sums and their ``rows``/``examples`` counters of every block are all-reduced (summed over
  ranks) in one flat bucket per dtype, so the committed running statistics (sums over counts)
  are identical on every rank and equal to a 1-process run on the global batch, also with
  unequal local batches;
* **decompositions** — with gradient-worker fraction ``f ∈ [1/W, 1]`` there are ``g = W·f``
  gradient workers per block.  Ranks form a ``g × (W/g)`` grid (row-major); the *columns* are
  the gradient-worker groups, the *rows* the gradient-receiver groups.  Blocks go, in descending
  order of their refresh cost (``n³ + m³``), to the least-loaded column and inside it to the
  least-loaded rank (the *inverse worker*).  The inverse worker runs ``refresh`` and broadcasts
  the new decomposition tensors to its column (``f = 1``, COMM_OPT: to every rank);
* **preconditioning** — each gradient worker preconditions the block's gradient; when ``g < W``
  the worker in each row broadcasts the preconditioned gradient to the rest of the row
  (``f = 1/W``, MEM_OPT: one rank per block, broadcast to everyone).  The KL clip is computed
  afterwards, identically on every rank.

All broadcasts are bucketed: one flat tensor per (source rank, group, dtype).  Block authors only
declare which of their ``tensors`` are statistics (see :class:`optimizers.base.CurvatureBlock`).

The optimizer always holds a communication object (:func:`make_comm`): :class:`LocalComm` in one
process (every rank question answers "this rank", every exchange is the identity) or
:class:`KaisaComm` under DDP; both speak :class:`Comm`.  This module knows blocks only through
the :class:`CommBlock` protocol (it does not import :mod:`optimizers.base`), and the statistics a
block accumulates between commits are one :class:`PendingStats`, which the comm reads and hands
back summed (:meth:`CommBlock.set_pending`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "Assignment",
    "Comm",
    "CommBlock",
    "KaisaComm",
    "LocalComm",
    "PendingStats",
    "Refreshed",
    "assign_work",
    "dist_world",
    "make_comm",
]

log = logging.getLogger(__name__)


@dataclass
class PendingStats:
    """A block's batch statistics since its last commit: floating sums (or means) over the local
    batch per key, and the input rows / examples they cover (counted once per captured call).
    Under DDP the comm sums all of it over ranks before the commit."""

    sums: dict[str, Tensor] = field(default_factory=dict)
    rows: int = 0
    examples: int = 0

    def add(self, key: str, value: Tensor, *, rows: int = 0, examples: int = 0) -> None:
        cur = self.sums.get(key)
        self.sums[key] = value if cur is None else cur + value
        self.rows += rows
        self.examples += examples


class CommBlock(Protocol):
    """What the communication objects use of a curvature block
    (:class:`optimizers.base.CurvatureBlock` implements it)."""

    tensors: dict[str, Tensor]
    meta: dict[str, Any]
    device: torch.device
    decomposition_on_every_rank: bool

    @property
    def pending(self) -> PendingStats: ...

    def set_pending(self, stats: PendingStats) -> None: ...

    def refresh_cost(self) -> float: ...

    def stat_keys(self) -> frozenset[str] | None: ...

    def decomposition_keys(self) -> set[str]: ...


@dataclass
class Refreshed:
    """Outcome of one block's ``refresh`` on its inverse worker: success, and the names of the
    decomposition tensors to send to the block's holders."""

    ok: bool
    keys: list[str]


def dist_world() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group, ``(0, 1)`` when not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def check_fraction(fraction: Any, world_size: int) -> int:
    """Validate ``grad_worker_fraction`` and return ``g`` (gradient workers per block)."""
    ok = isinstance(fraction, (int, float)) and not isinstance(fraction, bool)
    if not ok or not 0 < fraction <= 1:
        raise ValueError(
            f"optimizer.grad_worker_fraction must be in [1/world_size, 1], got {fraction!r}"
        )
    exact = world_size * float(fraction)
    g = max(1, round(exact))
    if exact < 1 - 1e-9 or abs(exact - g) > 1e-6 or world_size % g:
        raise ValueError(
            f"optimizer.grad_worker_fraction={fraction} gives {g} gradient workers per layer, "
            f"which does not divide world_size={world_size}; use k/{world_size} with k a divisor "
            f"of {world_size}"
        )
    return g


@dataclass
class Assignment:
    """Which rank refreshes which block, and which ranks hold its decomposition."""

    world_size: int
    grad_workers: int  # g
    inv_worker: dict[str, int] = field(default_factory=dict)
    column: dict[str, int] = field(default_factory=dict)
    #: blocks whose decomposition lives on every rank (``decomposition_on_every_rank``)
    everywhere: set[str] = field(default_factory=set)

    @property
    def columns(self) -> int:
        return self.world_size // self.grad_workers

    def column_ranks(self, col: int) -> list[int]:
        return [col + j * self.columns for j in range(self.grad_workers)]

    def row_ranks(self, row: int) -> list[int]:
        return [row * self.columns + c for c in range(self.columns)]

    def holders(self, name: str) -> list[int]:
        """Ranks that hold (and apply) the decomposition of ``name``."""
        if name in self.everywhere:
            return list(range(self.world_size))
        return self.column_ranks(self.column[name])

    def holds(self, name: str, rank: int) -> bool:
        return name in self.everywhere or rank % self.columns == self.column[name]

    def loads(self, costs: dict[str, float]) -> list[float]:
        out = [0.0] * self.world_size
        for name, r in self.inv_worker.items():
            out[r] += costs[name]
        return out


def assign_work(
    costs: dict[str, float],
    *,
    world_size: int,
    grad_worker_fraction: float,
    everywhere: set[str] | None = None,
) -> Assignment:
    """Greedy KAISA assignment (ALGORITHMS.md §1.8): blocks by descending cost to the
    least-loaded column, then to the least-loaded rank of that column (ties: lowest index)."""
    g = check_fraction(grad_worker_fraction, world_size)
    asg = Assignment(world_size, g, everywhere=set(everywhere or ()))
    col_load = [0.0] * asg.columns
    rank_load = [0.0] * world_size
    order = sorted(costs, key=lambda n: -costs[n])  # stable: ties keep the block order
    for name in order:
        col = min(range(asg.columns), key=lambda c: col_load[c])
        rank = min(asg.column_ranks(col), key=lambda r: rank_load[r])
        asg.column[name], asg.inv_worker[name] = col, rank
        col_load[col] += costs[name]
        rank_load[rank] += costs[name]
    return asg


def _assign(
    blocks: Mapping[str, CommBlock], world: int, grad_worker_fraction: float
) -> tuple[dict[str, float], Assignment]:
    costs = {n: float(b.refresh_cost()) for n, b in blocks.items()}
    every = {n for n, b in blocks.items() if b.decomposition_on_every_rank}
    asg = assign_work(
        costs, world_size=world, grad_worker_fraction=grad_worker_fraction, everywhere=every
    )
    return costs, asg


class Comm(Protocol):
    """The collective side of a :class:`~optimizers.base.CurvatureOptimizer` (see the module
    docstring): :class:`LocalComm` or :class:`KaisaComm`."""

    rank: int
    world: int
    #: cumulative seconds spent communicating
    seconds: float
    assignment: Assignment

    def is_inverse_worker(self, name: str) -> bool: ...

    def holds(self, name: str) -> bool: ...

    def reduce_pending(self, blocks: Sequence[CommBlock]) -> None: ...

    def share_decompositions(
        self, names: list[str], blocks: Mapping[str, CommBlock], results: dict[str, Refreshed]
    ) -> dict[str, bool]: ...

    def trim(self, blocks: Mapping[str, CommBlock]) -> None: ...

    def share_gradients(
        self, shapes: dict[str, tuple[torch.Size, torch.dtype]], mine: dict[str, Tensor],
        device: torch.device,
    ) -> dict[str, Tensor]: ...

    def gather_to(
        self, to: int, blocks: Mapping[str, CommBlock]
    ) -> dict[str, dict[str, Tensor]]: ...


def make_comm(
    blocks: Mapping[str, CommBlock], *, grad_worker_fraction: float = 1.0, owner: str = ""
) -> Comm:
    """:class:`KaisaComm` when ``torch.distributed`` runs more than one rank, else
    :class:`LocalComm`; ``owner`` names the optimizer in the log line."""
    if dist_world()[1] > 1:
        return KaisaComm(blocks, grad_worker_fraction=grad_worker_fraction, owner=owner)
    return LocalComm(blocks)


class LocalComm:
    """One process: this rank refreshes, holds and applies every block; nothing is exchanged."""

    def __init__(self, blocks: Mapping[str, CommBlock]) -> None:
        self.rank, self.world = 0, 1
        self.seconds = 0.0
        #: rank 0 does everything (no costs needed to balance one rank)
        self.assignment = Assignment(
            1, 1, inv_worker=dict.fromkeys(blocks, 0), column=dict.fromkeys(blocks, 0)
        )

    def is_inverse_worker(self, name: str) -> bool:
        return True

    def holds(self, name: str) -> bool:
        return True

    def reduce_pending(self, blocks: Sequence[CommBlock]) -> None:
        pass

    def share_decompositions(
        self, names: list[str], blocks: Mapping[str, CommBlock], results: dict[str, Refreshed]
    ) -> dict[str, bool]:
        return {name: res.ok for name, res in results.items()}

    def trim(self, blocks: Mapping[str, CommBlock]) -> None:
        pass

    def share_gradients(
        self, shapes: dict[str, tuple[torch.Size, torch.dtype]], mine: dict[str, Tensor],
        device: torch.device,
    ) -> dict[str, Tensor]:
        return mine

    def gather_to(
        self, to: int, blocks: Mapping[str, CommBlock]
    ) -> dict[str, dict[str, Tensor]]:
        return {}


class KaisaComm:
    """The collective side of a :class:`~ngbench.optimizers.base.CurvatureOptimizer` under DDP."""

    def __init__(
        self,
        blocks: Mapping[str, CommBlock],
        *,
        grad_worker_fraction: float = 1.0,
        owner: str = "",
    ) -> None:
        self.rank, self.world = dist_world()
        self.fraction = float(grad_worker_fraction)
        self.costs, self.assignment = _assign(blocks, self.world, grad_worker_fraction)
        asg = self.assignment
        log.info(
            "%s: KAISA over %d ranks, %d gradient worker(s) per layer; inverse workers %s",
            owner, self.world, asg.grad_workers, asg.inv_worker,
        )
        # process groups: every rank must create every group, in the same order
        self._col_groups: dict[int, Any] = {}
        self._row_groups: dict[int, Any] = {}
        if 1 < asg.grad_workers < self.world:
            for c in range(asg.columns):
                self._col_groups[c] = dist.new_group(asg.column_ranks(c))
            for r in range(asg.grad_workers):
                self._row_groups[r] = dist.new_group(asg.row_ranks(r))
        self.seconds = 0.0

    # ------------------------------------------------------------------ queries
    def is_inverse_worker(self, name: str) -> bool:
        return self.assignment.inv_worker[name] == self.rank

    def holds(self, name: str) -> bool:
        return self.assignment.holds(name, self.rank)

    def _dest(self, name: str) -> tuple[tuple[str, int], list[int], Any] | None:
        """Broadcast group of a block's decomposition: ``(key, ranks, group)`` or ``None``."""
        asg = self.assignment
        if name in asg.everywhere or asg.grad_workers == self.world:
            return ("world", 0), list(range(self.world)), None
        if asg.grad_workers == 1:
            return None
        col = asg.column[name]
        return ("col", col), asg.column_ranks(col), self._col_groups[col]

    # ------------------------------------------------------------------ statistics
    def reduce_pending(self, blocks: Sequence[CommBlock]) -> None:
        """Sum every block's pending sums and counters over ranks (one flat bucket per dtype;
        the counters ride in the widest bucket).  Afterwards the pending state is that of the
        global batch: every block normalises its sums by the (global) counts, so the result
        equals one process on the whole batch, and counts kept across steps (e.g. SNGD's
        rows seen) are global too."""
        if not blocks:
            return
        t0 = time.perf_counter()
        items: list[tuple[int, str, Tensor]] = []
        for j, b in enumerate(blocks):
            sums = b.pending.sums
            for key in sorted(sums):
                t = sums[key]
                if not t.is_floating_point():
                    raise TypeError(
                        f"{type(b).__name__}: pending statistic {key!r} must be a floating "
                        f"tensor to be averaged over ranks, got {t.dtype}"
                    )
                items.append((j, key, t))
        counts = [float(c) for b in blocks for c in (b.pending.rows, b.pending.examples)]
        dtypes = sorted({t.dtype for _, _, t in items}, key=lambda d: -torch.finfo(d).bits)
        if not dtypes:
            dtypes = [torch.float64]
        device = blocks[0].device
        reduced: list[dict[str, Tensor]] = [dict(b.pending.sums) for b in blocks]
        summed: list[float] = []
        for i, dt in enumerate(dtypes):
            mine = [(j, k, t) for j, k, t in items if t.dtype == dt]
            parts = [t.reshape(-1) for _, _, t in mine]
            if i == 0:
                parts.append(torch.tensor(counts, dtype=dt, device=device))
            flat = torch.cat(parts)
            dist.all_reduce(flat)
            off = 0
            for j, k, t in mine:
                reduced[j][k] = flat[off : off + t.numel()].view_as(t)
                off += t.numel()
            if i == 0:
                summed = flat[off:].tolist()
        for j, b in enumerate(blocks):
            b.set_pending(PendingStats(
                reduced[j], rows=round(summed[2 * j]), examples=round(summed[2 * j + 1])
            ))
        self.seconds += time.perf_counter() - t0

    # ------------------------------------------------------------------ decompositions
    def share_decompositions(
        self, names: list[str], blocks: Mapping[str, CommBlock], results: dict[str, Refreshed]
    ) -> dict[str, bool]:
        """After the inverse workers refreshed ``names`` (``results`` for the ones this rank
        refreshed), broadcast the decompositions to their holders; ranks that do not hold a
        block drop its decomposition.  Returns ``ok`` per refreshed block."""
        t0 = time.perf_counter()
        info = {}
        for name, res in results.items():
            b = blocks[name]
            keys = res.keys if res.ok else []
            info[name] = {
                "ok": res.ok,
                "meta": dict(b.meta),
                "keys": [(k, tuple(b.tensors[k].shape), str(b.tensors[k].dtype)) for k in keys],
            }
        gathered: list[Any] = [None] * self.world
        dist.all_gather_object(gathered, info)
        everything: dict[str, dict[str, Any]] = {}
        for part in gathered:
            everything.update(part)
        # buckets: (group key, src) -> names, in ``names`` order; the group of each key
        buckets: dict[tuple[tuple[str, int], int], list[str]] = {}
        groups: dict[tuple[str, int], Any] = {}
        for name in names:
            rec = everything.get(name)
            if rec is None or not rec["ok"] or not rec["keys"]:
                continue
            dest = self._dest(name)
            if dest is None or self.rank not in dest[1]:
                continue
            groups[dest[0]] = dest[2]
            buckets.setdefault((dest[0], self.assignment.inv_worker[name]), []).append(name)
        for (gkey, src), bucket in sorted(buckets.items()):
            group = groups[gkey]
            specs = [(n, k, shape, dt) for n in bucket for k, shape, dt in everything[n]["keys"]]
            got = _broadcast_specs(
                specs, src=src, me=self.rank, group=group,
                source=lambda n, k: blocks[n].tensors[k], device=blocks[bucket[0]].device,
            )
            if src != self.rank:
                for (n, k), t in got.items():
                    blocks[n].tensors[k] = t
        ok: dict[str, bool] = {}
        for name in names:
            rec = everything.get(name)
            if rec is None:
                continue
            ok[name] = bool(rec["ok"])
            b = blocks[name]
            if self.assignment.inv_worker[name] == self.rank:
                continue
            b.meta = dict(rec["meta"])
            if rec["ok"]:
                received = {k for k, _, _ in rec["keys"]}
                stats = b.stat_keys()
                drop: set[str] = set()
                if stats is not None:  # stale decompositions (e.g. another damping form)
                    drop |= {k for k in b.tensors if k not in stats and k not in received}
                if not self.holds(name):
                    drop |= received
                for k in drop:
                    b.tensors.pop(k, None)
        self.seconds += time.perf_counter() - t0
        return ok

    def trim(self, blocks: Mapping[str, CommBlock]) -> None:
        """Drop decompositions this rank does not hold (after loading a checkpoint)."""
        for name, b in blocks.items():
            if not self.holds(name):
                for k in b.decomposition_keys():
                    b.tensors.pop(k, None)

    # ------------------------------------------------------------------ gradients
    def share_gradients(
        self, shapes: dict[str, tuple[torch.Size, torch.dtype]], mine: dict[str, Tensor],
        device: torch.device,
    ) -> dict[str, Tensor]:
        """Broadcast preconditioned gradients along the receiver rows (``g < W``).  ``shapes``
        lists every block being preconditioned this step (same on all ranks); ``mine`` the
        ones this rank computed.  Returns all of them."""
        asg = self.assignment
        if asg.columns == 1:
            return mine
        t0 = time.perf_counter()
        row = self.rank // asg.columns
        group = None if asg.grad_workers == 1 else self._row_groups[row]
        out = dict(mine)
        for col in range(asg.columns):
            src = row * asg.columns + col
            specs = [
                (n, "p", shape, str(dt)) for n, (shape, dt) in shapes.items()
                if n not in asg.everywhere and asg.column[n] == col
            ]
            if not specs:
                continue
            got = _broadcast_specs(
                specs, src=src, me=self.rank, group=group,
                source=lambda n, _k: mine[n], device=device,
            )
            if src != self.rank:
                out.update({n: t for (n, _k), t in got.items()})
        self.seconds += time.perf_counter() - t0
        return out

    # ------------------------------------------------------------------ checkpoints
    def gather_to(
        self, to: int, blocks: Mapping[str, CommBlock]
    ) -> dict[str, dict[str, Tensor]]:
        """Collective: the decompositions rank ``to`` lacks, sent from their inverse workers.
        Returns ``{name: {key: tensor}}`` on rank ``to`` (empty elsewhere, and everywhere when
        every rank holds every decomposition)."""
        if self.assignment.grad_workers == self.world:
            return {}
        t0 = time.perf_counter()
        want = [n for n in blocks if not self.assignment.holds(n, to)]
        info = {
            n: [(k, tuple(blocks[n].tensors[k].shape), str(blocks[n].tensors[k].dtype))
                for k in sorted(blocks[n].decomposition_keys())]
            for n in want if self.assignment.inv_worker[n] == self.rank
        }
        gathered: list[Any] = [None] * self.world
        dist.all_gather_object(gathered, info)
        out: dict[str, dict[str, Tensor]] = {}
        for src in range(self.world):
            specs = [(n, k, s, d) for n, keys in gathered[src].items() for k, s, d in keys]
            if src == to or not specs:
                continue
            got = _broadcast_specs(
                specs, src=src, me=self.rank, group=None,
                source=lambda n, k: blocks[n].tensors[k], device=next(iter(blocks.values())).device,
            )
            if self.rank == to:
                for (n, k), t in got.items():
                    out.setdefault(n, {})[k] = t
        self.seconds += time.perf_counter() - t0
        return out


def _broadcast_specs(
    specs: Sequence[tuple[str, str, tuple[int, ...], str]],
    *,
    src: int,
    me: int,
    group: Any,
    source: Callable[[str, str], Tensor],
    device: torch.device,
) -> dict[tuple[str, str], Tensor]:
    """Broadcast the tensors described by ``specs`` (``name, key, shape, dtype``) from ``src``,
    one flat tensor per dtype; on receivers returns fresh tensors, on ``src`` the originals."""
    by_dtype: dict[str, list[tuple[str, str, tuple[int, ...], str]]] = {}
    for spec in specs:
        by_dtype.setdefault(spec[3], []).append(spec)
    out: dict[tuple[str, str], Tensor] = {}
    for dt_name, group_specs in sorted(by_dtype.items()):
        dt = getattr(torch, dt_name.replace("torch.", ""))
        numels = [int(torch.Size(s).numel()) for _, _, s, _ in group_specs]
        if me == src:
            flat = torch.cat([source(n, k).reshape(-1).to(dt) for n, k, _, _ in group_specs])
        else:
            flat = torch.empty(sum(numels), dtype=dt, device=device)
        dist.broadcast(flat, src=src, group=group)
        off = 0
        for (n, k, shape, _), cnt in zip(group_specs, numels, strict=True):
            if me == src:
                out[(n, k)] = source(n, k)
            else:
                out[(n, k)] = flat[off : off + cnt].view(shape).clone()
            off += cnt
    return out
