"""Shampoo with the practical choices of Distributed Shampoo.

Gupta, Koren & Singer, "Shampoo: Preconditioned Stochastic Tensor Optimization", ICML 2018;
Shi et al., "A Distributed Data-Parallel PyTorch Implementation of the Distributed Shampoo
Optimizer for Training Neural Networks At-Scale", arXiv 2309.06497 (2023).
See ALGORITHMS.md section 7.

Each parameter is reshaped once into a "merged" shape (size-1 dims squeezed, adjacent dims merged
from the back while the product stays <= ``max_preconditioner_dim``), and every dim larger than
``max_preconditioner_dim`` is cut into blocks.  A block of order ``k`` keeps one factor per mode,
``H_i <- beta2 H_i + w G_(i) G_(i)^T`` (``w = 1`` for ``beta2 = 1``, else ``1 - beta2``), and is
preconditioned with ``(H_i + eps I)^(-1/(2k))`` along every mode (a factor whose smallest
eigenvalue came out negative is first shifted to 0, see :func:`matrix_inverse_root`).  Roots
come from ``torch.linalg.eigh`` every ``precondition_frequency`` steps; factors are updated every
step.
The Shampoo direction of each block is rescaled to the norm of a grafted method's direction
(SGD, AdaGrad, RMSprop or Adam).  Blocks of equal shape within one parameter are stacked, so the
per-step Python work scales with the number of parameters, not with the number of blocks.
"""

from __future__ import annotations

import itertools
import math
import time
import warnings
from dataclasses import dataclass
from enum import StrEnum, auto
from typing import Any

import torch
from torch import nn

from ._config import OptimizerConfig, OptimizerConfigError, option
from .param_groups import split_decay_groups

__all__ = [
    "Graft",
    "Shampoo",
    "ShampooConfig",
    "WeightDecayType",
    "build_shampoo",
    "matrix_inverse_root",
    "merge_dims",
]
#: what the ``torch._foreach_*`` functions take and return
_Tensors = tuple[torch.Tensor, ...] | list[torch.Tensor]

__all__ = ["Shampoo", "build_shampoo", "merge_dims", "matrix_inverse_root"]


class Graft(StrEnum):
    """The method whose per-block step norm the Shampoo direction is rescaled to."""

    adam = auto()
    rmsprop = auto()
    adagrad = auto()
    sgd = auto()
    none = auto()


class WeightDecayType(StrEnum):
    """``decoupled``: ``p <- p (1 - lr wd)``; ``l2``: ``wd * p`` added to the gradient."""

    decoupled = auto()
    l2 = auto()


@dataclass(kw_only=True)
class ShampooConfig(OptimizerConfig):
    """Shampoo's options: the Distributed Shampoo README's Adam-grafting preset, except
    ``max_preconditioner_dim = 1024`` (the README uses 8192; our models are small)."""

    lr: float = option(1e-3, "learning rate", ge=0)
    beta1: float = option(0.9, "first moment (filtered gradient), bias corrected", ge=0, lt=1)
    beta2: float = option(0.999, "factor EMA; 1.0 = AdaGrad sum", gt=0, le=1)
    epsilon: float = option(1e-12, "added to factor eigenvalues before the root", gt=0)
    use_bias_correction: bool = option(True, "divide factors by 1 - beta2^t (beta2 < 1 only)")
    max_preconditioner_dim: int = option(1024, "merge dims up to this size, block above", ge=1)
    precondition_frequency: int = option(100, "roots recomputed every f steps", ge=1)
    start_preconditioning_step: int | None = option(
        None, "null = precondition_frequency; graft only before it", ge=1
    )
    graft: Graft = option(Graft.adam, "adam | rmsprop | adagrad | sgd | none")
    graft_beta2: float = option(0.999, "graft second-moment EMA", ge=0, lt=1)
    graft_epsilon: float = option(1e-8, "graft epsilon", gt=0)
    momentum: float = option(0.0, "heavy-ball momentum on the grafted direction", ge=0, lt=1)
    nesterov: bool = option(False, "Nesterov momentum (needs momentum > 0)")
    weight_decay: float = option(0.0, "weight decay (not on biases and norms)", ge=0)
    weight_decay_type: WeightDecayType = option(WeightDecayType.decoupled, "decoupled | l2")
    precondition_1d: bool = option(True, "1-D params: full-matrix root (false: graft only)")

    def check(self) -> None:
        if self.nesterov and not self.momentum > 0:
            raise OptimizerConfigError(
                "optimizer.nesterov must be false when momentum = 0, got True"
            )


def merge_dims(shape: tuple[int, ...] | torch.Size, max_dim: int) -> tuple[int, ...]:
    """Squeeze size-1 dims, then merge adjacent dims from the back while the product <= max_dim.

    ``(32, 3, 64, 64)`` with ``max_dim=8192`` gives ``(96, 4096)``; a conv weight
    ``(C_out, C_in, k, k)`` gives ``(C_out, C_in*k*k)`` when ``C_in*k*k <= max_dim`` and
    ``C_out*C_in*k*k > max_dim``.  A scalar or all-ones shape gives ``(1,)``.
    """
    dims = [int(d) for d in shape if d != 1] or [1]
    merged = [dims[-1]]
    for d in reversed(dims[:-1]):
        if merged[0] * d <= max_dim:
            merged[0] *= d
        else:
            merged.insert(0, d)
    return tuple(merged)


def _block_slices(merged: tuple[int, ...], max_dim: int) -> list[tuple[slice, ...]]:
    per_dim = [[slice(s, min(s + max_dim, d)) for s in range(0, d, max_dim)] for d in merged]
    return list(itertools.product(*per_dim))


@dataclass(frozen=True)
class _BlockGroup:
    """Blocks of one parameter that share a shape; their factors are stored stacked."""

    shape: tuple[int, ...]
    slices: tuple[tuple[slice, ...], ...]  # empty tuple: the block is the whole merged tensor

    @property
    def order(self) -> int:
        return len(self.shape)


@dataclass(frozen=True)
class _Plan:
    merged: tuple[int, ...]
    groups: tuple[_BlockGroup, ...]
    precondition: bool  # False: this parameter takes the grafted step only


def _make_plan(p: torch.Tensor, max_dim: int, precondition_1d: bool) -> _Plan:
    merged = merge_dims(p.shape, max_dim)
    if p.ndim <= 1 and not precondition_1d:
        return _Plan(merged, (), False)
    slices = _block_slices(merged, max_dim)
    if len(slices) == 1:
        return _Plan(merged, (_BlockGroup(merged, ()),), True)
    by_shape: dict[tuple[int, ...], list[tuple[slice, ...]]] = {}
    for sl in slices:
        by_shape.setdefault(tuple(s.stop - s.start for s in sl), []).append(sl)
    groups = tuple(_BlockGroup(shape, tuple(sls)) for shape, sls in by_shape.items())
    return _Plan(merged, groups, True)


def _gather(x: torch.Tensor, group: _BlockGroup) -> torch.Tensor:
    """Stack the blocks of ``x`` (merged shape) that belong to ``group``: ``(n, *shape)``."""
    if not group.slices:
        return x.unsqueeze(0)
    return torch.stack([x[sl] for sl in group.slices])


def matrix_inverse_root(
    h: torch.Tensor, exponent: float, epsilon: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``Q diag((lam + eps)^exponent) Q^T`` for a batch of symmetric ``h`` of shape ``(n, d, d)``:
    the inverse root of ``h + eps I``.

    Only a spectrum with ``lam_min < 0`` (a factor that lost positive semi-definiteness to
    rounding) is first shifted by ``-lam_min``; a ``lam_min`` in ``[0, eps)`` is left alone.  This
    is Distributed Shampoo's default (``PerturbationConfig(perturb_before_computation=True)``: it
    decomposes ``h + eps I`` and shifts only if that has an eigenvalue below ``eps``) [C
    ``facebookresearch/optimizers``, ``preconditioner/matrix_functions.py``].  ``eigh`` runs in
    ``h``'s dtype and is retried in float64 on failure.
    Returns ``(roots, ok)`` where ``ok[j]`` is False for matrices whose root could not be computed
    (their entry in ``roots`` is then meaningless).
    """
    ok = torch.ones(h.shape[0], dtype=torch.bool, device=h.device)
    try:
        lam, q = torch.linalg.eigh(h)
        if not (torch.isfinite(lam).all() and torch.isfinite(q).all()):
            raise torch.linalg.LinAlgError("non-finite eigendecomposition")
    except (RuntimeError, torch.linalg.LinAlgError):
        lam = torch.empty(h.shape[:-1], dtype=torch.float64, device=h.device)
        q = torch.empty(h.shape, dtype=torch.float64, device=h.device)
        for j in range(h.shape[0]):  # float64 retry, one matrix at a time to isolate failures
            try:
                lam_j, q_j = torch.linalg.eigh(h[j].double())
                good = bool(torch.isfinite(lam_j).all() and torch.isfinite(q_j).all())
            except (RuntimeError, torch.linalg.LinAlgError):
                good = False
            if good:
                lam[j], q[j] = lam_j, q_j
            else:
                ok[j] = False
                lam[j], q[j] = 1.0, torch.eye(h.shape[-1], dtype=torch.float64, device=h.device)
    lam_min = lam.amin(dim=-1, keepdim=True)
    lam = lam - lam_min.clamp(max=0.0) + epsilon
    roots = (q * lam.pow(exponent).unsqueeze(-2)) @ q.mT
    return roots.to(h.dtype), ok


def _precondition(x: torch.Tensor, roots: list[torch.Tensor]) -> torch.Tensor:
    """Apply ``roots[i]`` (``(n, d_i, d_i)``, symmetric) along mode ``i`` of ``x`` (``(n, *d)``)."""
    k = x.ndim - 1
    if k == 1:
        return torch.bmm(roots[0], x.unsqueeze(-1)).squeeze(-1)
    if k == 2:
        return torch.bmm(torch.bmm(roots[0], x), roots[1])
    n = x.shape[0]
    for i, r in enumerate(roots):
        moved = x.movedim(i + 1, -1)
        shape = moved.shape
        x = torch.bmm(moved.reshape(n, -1, shape[-1]), r).reshape(shape).movedim(-1, i + 1)
    return x.contiguous()  # callers rescale views of the result in place


class Shampoo(torch.optim.Optimizer):
    """Blocked Shampoo with grafting (a shape-based optimizer: no hooks, works on any params).

    Per step, for every parameter with a gradient ``g`` (plus ``wd * p`` under L2 decay):
    first moment ``m_hat`` (bias-corrected EMA with ``beta1``; ``g`` when ``beta1 = 0``);
    factors updated with ``g``; roots refreshed when ``step % precondition_frequency == 0``
    (and at ``start_preconditioning_step``); per block ``P = Shampoo(m_hat)`` rescaled to the
    norm of the graft direction (before ``start_preconditioning_step`` the graft direction
    alone); optional heavy-ball/Nesterov momentum on ``P``; decoupled decay
    ``p <- p (1 - lr wd)``; ``p <- p - lr P``.  ``graft="none"`` uses the raw Shampoo
    direction (and ``m_hat`` before preconditioning starts).
    """

    def __init__(
        self, params: Any, config: ShampooConfig | None = None, /, **hparams: Any
    ) -> None:
        self.config = ShampooConfig.build(config, hparams)
        super().__init__(params, self.config.to_dict())
        for group in self.param_groups:  # per-group overrides are checked as well
            ShampooConfig(**{k: group[k] for k in ShampooConfig.keys()})
        self._plans: dict[torch.Tensor, _Plan] = {}
        self._times = {"statistics": 0.0, "inverse": 0.0, "precondition": 0.0, "update": 0.0}
        self.num_root_failures = 0
        self._warned = False

    # ------------------------------------------------------------------ reporting
    def phase_times(self) -> dict[str, float]:
        """Cumulative seconds per phase: statistics, inverse, precondition, update."""
        return dict(self._times)

    def refresh_period(self) -> int:
        """Steps between root recomputations (the largest ``precondition_frequency``)."""
        return max(int(g["precondition_frequency"]) for g in self.param_groups)

    def memory_usage(self) -> dict[str, int]:
        """Bytes held in optimizer state: factors, roots, graft second moments, moment buffers,
        and their ``total``."""
        out = {"factors": 0, "roots": 0, "graft": 0, "moments": 0}
        for st in self.state.values():
            for key, name in (("factors", "factors"), ("roots", "roots")):
                out[name] += sum(t.numel() * t.element_size() for t in st.get(key, []))
            if "graft_sq" in st:
                out["graft"] += st["graft_sq"].numel() * st["graft_sq"].element_size()
            for key in ("exp_avg", "momentum_buffer"):
                if key in st:
                    out["moments"] += st[key].numel() * st[key].element_size()
        out["total"] = sum(out.values())
        return out

    def block_shapes(self, p: torch.Tensor) -> list[tuple[int, ...]]:
        """Shapes of the Shampoo blocks of parameter ``p`` (empty: graft only)."""
        plan = self._plan(p, self._group_of(p))
        return [g.shape for g in plan.groups for _ in (g.slices or (None,))]

    # ------------------------------------------------------------------ internals
    def _group_of(self, p: torch.Tensor) -> dict[str, Any]:
        for group in self.param_groups:
            if any(q is p for q in group["params"]):
                return group
        raise KeyError("parameter is not managed by this optimizer")

    def _plan(self, p: torch.Tensor, group: dict[str, Any]) -> _Plan:
        plan = self._plans.get(p)
        if plan is None:
            plan = _make_plan(p, group["max_preconditioner_dim"], group["precondition_1d"])
            self._plans[p] = plan
        return plan

    def _init_state(self, p: torch.Tensor, group: dict[str, Any], plan: _Plan) -> dict[str, Any]:
        st: dict[str, Any] = self.state[p]
        if "step" in st:
            return st
        st["step"] = 0
        st["root_step"] = 0
        if group["beta1"] > 0:
            st["exp_avg"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
        if group["graft"] in ("adam", "rmsprop", "adagrad"):
            st["graft_sq"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
        if group["momentum"] > 0:
            st["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
        factors, roots = [], []
        for bg in plan.groups:
            n = max(len(bg.slices), 1)
            for d in bg.shape:
                factors.append(torch.zeros(n, d, d, dtype=p.dtype, device=p.device))
                roots.append(torch.eye(d, dtype=p.dtype, device=p.device).repeat(n, 1, 1))
        st["factors"], st["roots"] = factors, roots
        return st

    def _refresh_roots(self, st: dict[str, Any], plan: _Plan, group: dict[str, Any]) -> None:
        beta2 = group["beta2"]
        scale = 1.0
        if beta2 < 1 and group["use_bias_correction"]:
            scale = 1.0 / (1.0 - beta2 ** st["step"])
        i = 0
        for bg in plan.groups:
            exponent = -1.0 / (2 * bg.order)
            for _ in range(bg.order):
                h = st["factors"][i] * scale if scale != 1.0 else st["factors"][i]
                root, ok = matrix_inverse_root(h, exponent, group["epsilon"])
                if ok.all():
                    st["roots"][i] = root
                else:
                    n_bad = int((~ok).sum())
                    self.num_root_failures += n_bad
                    st["roots"][i][ok] = root[ok]
                    if not self._warned:
                        self._warned = True
                        warnings.warn(
                            f"Shampoo: eigh failed for {n_bad} factor(s) of size "
                            f"{h.shape[-1]} (also in float64); keeping the previous roots. "
                            "Further failures are counted in num_root_failures.",
                            RuntimeWarning,
                            stacklevel=3,
                        )
                i += 1
        st["root_step"] = st["step"]

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # noqa: D102
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            self._step_group(group)
        return loss

    def _step_group(self, group: dict[str, Any]) -> None:
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return
        if any(p.grad.is_sparse for p in params):
            raise RuntimeError("Shampoo does not support sparse gradients")
        lr, wd = group["lr"], group["weight_decay"]
        beta1, beta2 = group["beta1"], group["beta2"]
        freq = group["precondition_frequency"]
        start = group["start_preconditioning_step"] or freq
        graft = group["graft"]
        plans = [self._plan(p, group) for p in params]
        states = [self._init_state(p, group, plan) for p, plan in zip(params, plans, strict=True)]
        for st in states:
            st["step"] += 1
        steps = [st["step"] for st in states]

        t0 = time.perf_counter()
        grads: _Tensors = [p.grad for p in params]
        if wd != 0 and group["weight_decay_type"] == "l2":
            grads = torch._foreach_add(grads, params, alpha=wd)
        # --- statistics: factor update with the (L2-augmented) gradient
        w = 1.0 if beta2 == 1 else 1.0 - beta2
        for g, plan, st in zip(grads, plans, states, strict=True):
            if not plan.precondition:
                continue
            gm = g.reshape(plan.merged)
            i = 0
            for bg in plan.groups:
                x = _gather(gm, bg)
                n = x.shape[0]
                for mode, d in enumerate(bg.shape):
                    xi = x.movedim(mode + 1, 1).reshape(n, d, -1)
                    st["factors"][i].baddbmm_(xi, xi.mT, beta=beta2, alpha=w)
                    i += 1
        t1 = time.perf_counter()
        # --- inverse roots
        for plan, st in zip(plans, states, strict=True):
            s = st["step"]
            if plan.precondition and s >= start and (s % freq == 0 or st["root_step"] == 0):
                self._refresh_roots(st, plan, group)
        t2 = time.perf_counter()
        # --- first moment and graft direction
        same_step = all(s == steps[0] for s in steps)
        filtered: _Tensors
        if beta1 > 0:
            exp_avgs = [st["exp_avg"] for st in states]
            torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta1)
            if same_step:
                filtered = torch._foreach_mul(exp_avgs, 1.0 / (1.0 - beta1 ** steps[0]))
            else:
                filtered = torch._foreach_div(exp_avgs, [1.0 - beta1**s for s in steps])
        else:
            filtered = list(grads)
        if graft in ("adam", "rmsprop", "adagrad"):
            sq = [st["graft_sq"] for st in states]
            if graft == "adagrad":
                torch._foreach_addcmul_(sq, grads, grads)
                denom = torch._foreach_sqrt(sq)
            else:
                gb2 = group["graft_beta2"]
                torch._foreach_mul_(sq, gb2)
                torch._foreach_addcmul_(sq, grads, grads, value=1.0 - gb2)
                denom = torch._foreach_sqrt(sq)
                if graft == "adam" and same_step:
                    torch._foreach_mul_(denom, 1.0 / math.sqrt(1.0 - gb2 ** steps[0]))
                elif graft == "adam":
                    torch._foreach_div_(denom, [math.sqrt(1.0 - gb2**s) for s in steps])
            torch._foreach_add_(denom, group["graft_epsilon"])
            graft_dirs: _Tensors = torch._foreach_div(filtered, denom)
        else:
            graft_dirs = filtered
        # --- Shampoo direction per block, then one batched graft rescale over all blocks
        dirs = list(graft_dirs)
        pieces: list[tuple[int, torch.Tensor | None, _BlockGroup, torch.Tensor]] = []
        shampoo_flat: list[torch.Tensor] = []
        graft_flat: list[torch.Tensor] = []
        for idx, (f, gd, plan, st) in enumerate(
            zip(filtered, graft_dirs, plans, states, strict=True)
        ):
            if not plan.precondition or st["step"] < start:
                continue
            fm = f.reshape(plan.merged)
            gdm = gd.reshape(plan.merged)
            out = torch.empty_like(fm) if plan.groups[0].slices else None
            i = 0
            for bg in plan.groups:
                pb = _precondition(_gather(fm, bg), st["roots"][i : i + bg.order])
                i += bg.order
                pieces.append((idx, out, bg, pb))
                if graft != "none":
                    shampoo_flat.extend(pb.reshape(pb.shape[0], -1).unbind(0))
                    graft_flat.extend(_gather(gdm, bg).reshape(pb.shape[0], -1).unbind(0))
        if shampoo_flat:
            ns = torch.stack(torch._foreach_norm(shampoo_flat))
            ng = torch.stack(torch._foreach_norm(graft_flat))
            torch._foreach_mul_(shampoo_flat, (ng / (ns + 1e-16)).tolist())
        for idx, out, bg, pb in pieces:
            if out is None:
                dirs[idx] = pb.reshape(params[idx].shape)
            else:
                for j, sl in enumerate(bg.slices):
                    out[sl] = pb[j]
                dirs[idx] = out.reshape(params[idx].shape)
        t3 = time.perf_counter()
        # --- momentum, weight decay, parameter update
        if group["momentum"] > 0:
            bufs = [st["momentum_buffer"] for st in states]
            torch._foreach_mul_(bufs, group["momentum"])
            torch._foreach_add_(bufs, dirs)
            if group["nesterov"]:
                dirs = list(torch._foreach_add(dirs, bufs, alpha=group["momentum"]))
            else:
                dirs = bufs
        if wd != 0 and group["weight_decay_type"] == "decoupled":
            torch._foreach_mul_(params, 1.0 - lr * wd)
        torch._foreach_add_(params, dirs, alpha=-lr)
        t4 = time.perf_counter()
        self._times["statistics"] += t1 - t0
        self._times["inverse"] += t2 - t1
        self._times["precondition"] += t3 - t2
        self._times["update"] += t4 - t3

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._plans.clear()


def build_shampoo(model: nn.Module, config: ShampooConfig | None = None) -> Shampoo:
    """Shampoo over ``model``'s parameters (no weight decay on biases and norms)."""
    c = config or ShampooConfig()
    return Shampoo(split_decay_groups(model, c.weight_decay), c)
