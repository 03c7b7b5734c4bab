"""MBF: the mini-block Fisher method.

Bahamou, Goldfarb & Ren, "A Mini-Block Fisher Method for Deep Neural Networks", AISTATS 2023
(PMLR 206; arXiv 2202.04124).  See ALGORITHMS.md §6; no reference code was found, so the
uncertain details below are options with the most plausible default.

Each layer's block of the **empirical Fisher** is approximated by a block-diagonal matrix of
many small "mini-blocks" ``F_b = E_n[v_{n,b} v_{n,b}ᵀ]``, where ``v_{n,b}`` is the part of
example ``n``'s gradient that falls in mini-block ``b``.  Per block the direction is
``p_b = (F_b + λI)⁻¹ ∇_b`` (damping per block); all blocks of a layer are inverted in one batched
Cholesky call and applied with one batched matrix-vector product.  Then SGD with momentum and
decoupled weight decay acts on the preconditioned direction (§0.6), unless
``momentum_type="grad_ema"`` (below).

Partitions (all in the row-major ``[W | b]`` layout of the layer's gradient matrix):

* Conv2d: one ``k_h·k_w`` block per (output channel, input channel) pair, i.e.
  ``weight[i, j, :, :]`` (§6.1), plus a diagonal (``1 × 1`` blocks) for the bias.
* Linear, ``linear_block`` (§6.1 marks the FC partition as uncertain):

  - ``"row"`` (default): one block per output neuron (row of ``[W | b]``), split into the fewest
    equal chunks of at most ``max_block`` weights (default 128; short chunks are zero-padded,
    which leaves the solve of the real entries unchanged);
  - ``"chunk:<b>"``: consecutive runs of ``b`` weights of the flattened ``[W | b]`` (blocks may
    span rows);
  - ``"shared_input"``: per-row blocks ``F_i ≈ T·E[g_i²]·A`` with the shared input second moment
    ``A = E[ā āᵀ]`` (one eigendecomposition per layer; K-FAC with a diagonal ``G``).  Exact for
    one example per batch.

* Embedding layers get the plain SGD direction (a mini-block per token would cost ``V·d²``).

Statistics (``estimator``): ``"per_example"`` (default: the EF proper, from per-example gradient
matrices ``G_n = Σ_t g_{n,t} ā_{n,t}ᵀ``, formed in chunks of examples so the memory stays
bounded) or ``"batch"`` (``N · v̄ v̄ᵀ`` of the mini-batch mean gradient, Shampoo/TNT-style).
EMA ``stat_decay=0.9`` (weight of the old value, the Goldfarb-group convention), statistics every
``stat_every=10`` and inverses every ``inv_every=100`` steps (the CNN setting of §6.2; use 1/20
for the auto-encoders).

``damping=0.1`` by default: a block with little curvature gets ``p_b ≈ ∇_b / λ``, and λ = 0.01
made the small CNN diverge at lr 0.1 within five steps (λ and lr were tuned on a grid in the
paper; tune them).

``momentum_type``: ``"heavy_ball"`` (default; as the rest of the K-FAC family here) or
``"grad_ema"``, the Goldfarb-group convention of §6.2: the raw gradient plus the L2 term
``weight_decay·θ`` (weights only) is averaged, ``m ← ρm + (1-ρ)(∇L + ηθ)`` with ``ρ = momentum``
(``m`` starts at zero), and the preconditioned ``m`` is the step direction (no momentum or decay
after preconditioning).  ``kl_clip=None`` by default (the group's codes do not clip).

Memory: the running blocks and their inverses take ``2·Σ_b b²`` numbers per layer, i.e. about
``2·k_h·k_w`` times the conv weights and ``2·max_block`` times the Linear weights (§6.3).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum, auto
from typing import Any, cast

import torch
from torch import Tensor, nn

from ._config import OptimizerConfigError, option, redefault
from ._layers import LayerHelper
from ._linalg import compute_dtype, safe_eigh, symmetrize
from .base import CurvatureBlock, CurvatureConfig, CurvatureOptimizer

__all__ = ["Estimator", "MBF", "MBFBlock", "MBFConfig", "MomentumType", "parse_linear_block"]


class Estimator(StrEnum):
    """Mini-block statistics from per-example gradients or the mini-batch gradient."""

    per_example = auto()
    batch = auto()


class MomentumType(StrEnum):
    """``heavy_ball`` on the preconditioned direction, or an EMA of the raw gradient."""

    heavy_ball = auto()
    grad_ema = auto()

#: elements of per-example gradient matrices formed at once (bounds the statistics' memory)
_CHUNK_ELEMS = 1 << 22


def parse_linear_block(spec: str) -> tuple[str, int]:
    """``"row"`` -> ``("row", 0)``, ``"chunk:64"`` -> ``("chunk", 64)``, ``"shared_input"``."""
    if spec in ("row", "shared_input"):
        return spec, 0
    if isinstance(spec, str) and spec.startswith("chunk:"):
        size = spec.split(":", 1)[1]
        if size.isdigit() and int(size) >= 1:
            return "chunk", int(size)
    raise OptimizerConfigError(
        "optimizer.linear_block must be 'row', 'shared_input' or 'chunk:<b>' with an int b >= 1, "
        f"got {spec!r}"
    )


def batched_spd_inverse(mats: Tensor) -> Tensor | None:
    """Inverses of a batch of SPD matrices ``(B, b, b)`` by one batched Cholesky call.

    Retried in float64 when a factorisation fails; ``None`` when that fails too.
    """
    if not bool(torch.isfinite(mats).all()):
        return None
    out_dtype = compute_dtype(mats.dtype)
    for dtype in dict.fromkeys((out_dtype, torch.float64)):
        chol, info = torch.linalg.cholesky_ex(symmetrize(mats.to(dtype)))
        if bool((info != 0).any()):
            continue
        inv = torch.cholesky_inverse(chol)
        if bool(torch.isfinite(inv).all()):
            return inv.to(out_dtype)
    return None


class _Layout:
    """Maps an ``(…, m, n)`` gradient matrix to mini-block vectors ``(…, B, b)`` and back."""

    def __init__(self, layer: LayerHelper, kind: str, size: int, max_block: int) -> None:
        m, n = layer.out_dim, layer.in_dim
        self.m, self.n = m, n
        #: the bias column is a diagonal (conv) rather than part of the blocks
        self.diag_last = layer.kind == "conv2d" and layer.has_bias
        self.cols = n - int(self.diag_last)
        self.flat = kind == "chunk"
        if layer.kind == "conv2d":
            kh, kw = cast(nn.Conv2d, layer.module).kernel_size
            self.b, self.per_row = kh * kw, self.cols // (kh * kw)
        elif kind == "row":
            self.per_row = math.ceil(self.cols / max_block)
            self.b = math.ceil(self.cols / self.per_row)
        else:
            self.b = size
            self.per_row = 0
        if self.flat:
            self.blocks = math.ceil(m * self.cols / self.b)
            self.pad = self.blocks * self.b - m * self.cols
        else:
            self.blocks = m * self.per_row
            self.pad = self.per_row * self.b - self.cols

    def to_blocks(self, x: Tensor) -> Tensor:
        lead = x.shape[:-2]
        w = x[..., : self.cols] if self.diag_last else x
        if self.flat:
            w = w.reshape(*lead, self.m * self.cols)
        if self.pad:
            w = torch.nn.functional.pad(w, (0, self.pad))
        return w.reshape(*lead, self.blocks, self.b)

    def from_blocks(self, p: Tensor, diag: Tensor | None) -> Tensor:
        if self.flat:
            w = p.reshape(-1)[: self.m * self.cols].reshape(self.m, self.cols)
        else:
            w = p.reshape(self.m, self.per_row * self.b)[:, : self.cols]
        if self.diag_last:
            assert diag is not None, "a conv layer's bias diagonal"
            w = torch.cat([w, diag.unsqueeze(1)], dim=1)
        return w


class MBFBlock(CurvatureBlock):
    """Mini-blocks of one layer (``F`` ``(B, b, b)``, bias diagonal ``D``), see the module doc."""

    statistic_keys = frozenset({"F", "D", "A", "S", "T"})

    def __init__(
        self,
        layer: LayerHelper,
        *,
        linear_block: str = "row",
        max_block: int = 128,
        estimator: str = "per_example",
    ) -> None:
        kind, size = parse_linear_block(linear_block)
        super().__init__(layer)
        self.shared = kind == "shared_input" and layer.kind == "linear"
        self.passthrough = layer.diagonal_input  # embedding: plain SGD direction
        self.estimator = str(Estimator(estimator))
        self._layout = (
            None if self.shared or self.passthrough else _Layout(layer, kind, size, max_block)
        )
        # conv blocks never contain the bias: skip building the ones column
        self.homogeneous_input = layer.kind != "conv2d"

    @property
    def layout(self) -> _Layout:
        """The mini-block layout (blocks that are neither shared-input nor passthrough)."""
        if self._layout is None:
            raise AttributeError(f"{self!r} has no mini-block layout (shared input or embedding)")
        return self._layout

    @property
    def block_size(self) -> int:
        return self.layer.in_dim if self.shared else self.layout.b

    # -- statistics ---------------------------------------------------------------
    def _example_grads(self, a: Tensor, g: Tensor) -> Tensor:
        """Per-example gradient matrices ``(N, m, n_a)`` (``n_a`` = columns of ``a``)."""
        if a.shape[1] == 1:
            return g[:, 0, :, None] * a[:, 0, None, :]
        return torch.bmm(g.transpose(1, 2), a)

    def update_stats(self, a: Tensor, g: Tensor) -> None:
        if self.passthrough:
            return
        N, T = g.shape[0], g.shape[1]
        g = g.to(self.dtype)
        a = a.to(self.dtype)
        if self.shared:
            rows = a.reshape(-1, a.shape[-1])
            self.accumulate("A", rows.t() @ rows, rows=N * T, examples=N)
            self.accumulate("S", g.reshape(-1, g.shape[-1]).pow(2).sum(0))
            return
        lay = self.layout
        diag = None
        if self.estimator == "batch":
            mean = g.reshape(-1, g.shape[-1]).t() @ a.reshape(-1, a.shape[-1]) / N
            v = lay.to_blocks(mean)
            # pending values are sums over examples (divided by N at commit): N · (N v̄ v̄ᵀ)
            F = N * N * torch.einsum("bk,bl->bkl", v, v)
            if lay.diag_last:
                diag = N * N * (g.sum((0, 1)) / N).pow(2)
        else:
            F = g.new_zeros(lay.blocks, lay.b, lay.b)
            if lay.diag_last:
                diag = g.sum(1).pow(2).sum(0)  # bias gradient per example = Σ_t g
            step = max(1, _CHUNK_ELEMS // max(1, lay.m * lay.n))
            for s in range(0, N, step):
                v = lay.to_blocks(self._example_grads(a[s : s + step], g[s : s + step]))
                vb = v.transpose(0, 1)  # (B, c, b)
                F.baddbmm_(vb.transpose(1, 2), vb)
        self.accumulate("F", F, rows=N * T, examples=N)
        if diag is not None:
            self.accumulate("D", diag)

    def commit_stats(self, decay: float) -> None:
        sums, rows, examples = self.take_pending()
        examples = max(examples, 1)
        if self.shared:
            self.ema("A", sums["A"] / rows, decay)
            self.ema("S", sums["S"] / rows, decay)
            t = torch.tensor(rows / examples, dtype=self.dtype, device=self.device)
            self.ema("T", t, decay)
            return
        self.ema("F", sums["F"] / examples, decay)
        if "D" in sums:
            self.ema("D", sums["D"] / examples, decay)

    # -- refresh ------------------------------------------------------------------------
    def refresh_cost(self) -> float:
        if self.passthrough:
            return 0.0
        if self.shared:
            return float(self.layer.in_dim**3)
        return float(self.layout.blocks * self.layout.b**3)

    def refresh(self, damping: float) -> bool:
        t = self.tensors
        if self.shared:
            if "A" not in t:
                return True
            eig = safe_eigh(t["A"])
            if eig is None:
                return False
            d, q = eig
            t["QA"] = q
            t["scale"] = 1.0 / (float(t["T"]) * torch.outer(t["S"], d) + damping)
        else:
            if "F" not in t:
                return True
            F = t["F"]
            eye = torch.eye(F.shape[-1], dtype=F.dtype, device=F.device)
            inv = batched_spd_inverse(F + damping * eye)
            if inv is None:
                return False
            t["Finv"] = inv
            if "D" in t:
                t["Dinv"] = 1.0 / (t["D"] + damping)
        self.ready = True
        return True

    def precondition(self, grad: Tensor) -> Tensor:
        t = self.tensors
        if self.shared:
            q = t["QA"]
            return ((grad @ q) * t["scale"]) @ q.t()
        lay = self.layout
        v = lay.to_blocks(grad)
        p = torch.bmm(t["Finv"], v.unsqueeze(-1)).squeeze(-1)
        diag = grad[:, -1] * t["Dinv"] if lay.diag_last else None
        return lay.from_blocks(p, diag)

    def damped_dense(self, damping: float) -> Tensor:
        """The damped block-diagonal matrix (row-major ``[W | b]``, ``(m·n)²``), tests only."""
        m, n = self.layer.out_dim, self.layer.in_dim
        if self.shared:
            S, A, T = self.tensors["S"], self.tensors["A"], float(self.tensors["T"])
            eye = torch.eye(m * n, dtype=A.dtype, device=A.device)
            blocks: Tensor = torch.block_diag(*[T * s * A for s in S])
            return blocks + damping * eye
        lay = self.layout
        F = self.tensors["F"]
        idx = torch.arange(m * n, dtype=torch.float64, device=F.device).reshape(m, n)
        pos = lay.to_blocks(idx + 1).long() - 1  # -1 marks padding
        dense = torch.zeros(m * n, m * n, dtype=F.dtype, device=F.device)
        for blk in range(lay.blocks):
            keep = pos[blk] >= 0
            ix = pos[blk][keep]
            dense[ix.unsqueeze(1), ix.unsqueeze(0)] = F[blk][keep][:, keep]
        if lay.diag_last:
            ix = idx[:, -1].long()
            dense[ix, ix] = self.tensors["D"]
        return dense + damping * torch.eye(m * n, dtype=F.dtype, device=F.device)


@dataclass(kw_only=True)
class MBFConfig(CurvatureConfig):
    """MBF's options (module docstring): the shared curvature options plus the block layout."""

    damping: float = redefault(CurvatureConfig, "damping", 0.1)
    stat_decay: float = redefault(CurvatureConfig, "stat_decay", 0.9)
    kl_clip: float | None = redefault(CurvatureConfig, "kl_clip", None)
    linear_block: str = option("row", "Linear mini-blocks: row | shared_input | chunk:<b>")
    max_block: int = option(128, "largest mini-block side (conv blocks split above it)", ge=1)
    estimator: Estimator = option(Estimator.per_example, "per_example | batch statistics")
    momentum_type: MomentumType = option(MomentumType.heavy_ball, "heavy_ball | grad_ema")

    def check(self) -> None:
        super().check()
        parse_linear_block(self.linear_block)
        if self.nesterov and self.momentum_type == MomentumType.grad_ema:
            raise OptimizerConfigError("optimizer.nesterov=true needs momentum_type='heavy_ball'")


class MBF(CurvatureOptimizer):
    """Mini-block Fisher (see the module docstring)."""

    Config = MBFConfig
    config: MBFConfig

    def __init__(
        self, model: nn.Module, config: MBFConfig | None = None, /, **hparams: object
    ) -> None:
        super().__init__(model, config, **hparams)
        self.momentum_type = str(self.config.momentum_type)
        if self.momentum_type == "grad_ema":
            for group in self.param_groups:
                group["grad_ema"] = group["momentum"]
                group["l2"] = group["weight_decay"]
                group["momentum"] = 0.0
                group["weight_decay"] = 0.0

    def make_block(self, layer: LayerHelper) -> MBFBlock:
        return MBFBlock(
            layer,
            linear_block=self.config.linear_block,
            max_block=self.config.max_block,
            estimator=self.config.estimator,
        )

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        if self.momentum_type == "grad_ema":
            for group in self.param_groups:
                rho, l2 = group["grad_ema"], group["l2"]
                for p in group["params"]:
                    if p.grad is None:
                        continue
                    d = p.grad if l2 == 0 else p.grad.add(p, alpha=l2)
                    buf = self.state[p].get("grad_ema")
                    if buf is None:
                        buf = self.state[p]["grad_ema"] = torch.zeros_like(p)
                    buf.mul_(rho).add_(d, alpha=1.0 - rho)
                    p.grad = buf.clone()
        return super().step(closure)
