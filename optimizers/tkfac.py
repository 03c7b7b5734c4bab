"""TKFAC: Gao, Liu, Huang, Wang, Wang, Xu & Yu, "A Trace-restricted Kronecker-Factored
Approximation to Natural Gradient", AAAI 2021, arXiv 2011.10741 (ALGORITHMS.md §3.1-§3.2).

⚠ Re-implementation from secondary sources (no paper text or code was available, §3 is rated
medium-low confidence); every uncertain detail is an option, and the defaults are the most
plausible reading.

Per layer, with per-example ``Λ_n = Σ_t ā_{n,t} ā_{n,t}ᵀ`` and ``Γ_n = Σ_t g_{n,t} g_{n,t}ᵀ``
(one location ``T = 1`` for a Linear layer; conv locations summed per example), the Fisher
block is approximated as ``δ·Φ⊗Ψ`` (row-major ``torch.kron(Ψ, Φ)``) with unit-trace factors and
the trace matched:

* ``trace_form="weighted"`` (default, the [2nd] formulas of §3.1)::

      δ = E[trΛ_n trΓ_n] / T,  Φ = E[trΓ_n Λ_n] / E[trΛ_n trΓ_n],  Ψ = E[trΛ_n Γ_n] / E[trΛ_n trΓ_n]

* ``trace_form="normalized"`` (the "simple" reading): ``Φ = A/trA``, ``Ψ = G/trG`` with K-FAC's
  ``A``, ``G`` and the same ``δ`` — K-FAC rescaled so that the trace matches.

For a Linear layer ``tr(δΦ⊗Ψ) = E[‖ā_n‖²‖g_n‖²] = tr F_EF`` exactly (both readings).  For a conv
layer ``δ`` is the trace of the per-example KFC approximation ``Λ_n⊗Γ_n / T`` (locations summed
per example, §3.1 [I]); if ``Λ`` and ``Γ`` are independent both readings reduce to KFC's
``T·A⊗G``.  The three moments are EMA'd (``stat_decay``) as *un-normalised* sums, so the trace
identity also holds for the running estimates; batch sums are accumulated in float64 on CPU, as
in :class:`optimizers._kronecker.KroneckerBlock` (a 2-process DDP run reproduces a 1-process
one).

Damping (§3.2): ``Φ̂ = √δ Φ + √λ I``, ``Ψ̂ = √δ Ψ + √λ I``, ``P = Ψ̂⁻¹ V Φ̂⁻¹`` (inverses refreshed
every ``inv_every`` steps), then KL clip and SGD with momentum as for K-FAC.  The paper's "new
damping technique for CNNs" is unknown; ``conv_damping="trace"`` is the [I] placeholder of §3.2
(``λ_l = λ·δ_l`` on conv layers, so the damping shrinks with the layer's Fisher trace);
the default ``"standard"`` uses the same λ for every layer (the paper's ``TKFAC_nor``).

Defaults: ``damping=1e-2`` (√λ = 0.1 added to each unit-trace factor scaled by √δ),
``kl_clip=1e-2``, ``stat_every=10``, ``inv_every=100``, ``stat_decay=0.95`` — the K-FAC preset,
since the paper's hyper-parameters are unknown (§3.4).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum, auto

import torch
from torch import Tensor

from ._config import option
from ._kronecker import bias_bordered
from ._layers import LayerHelper
from ._linalg import columns, safe_inv
from ._linalg import gram as _gram
from .base import CurvatureBlock, CurvatureConfig, CurvatureOptimizer

__all__ = ["ConvDamping", "TKFAC", "TKFACBlock", "TKFACConfig", "TraceForm"]


class TraceForm(StrEnum):
    """``weighted``: trace-weighted factors (the paper); ``normalized``: plain A and G."""

    weighted = auto()
    normalized = auto()


class ConvDamping(StrEnum):
    """``standard``: damping λ on every layer; ``trace``: λ·δ_l on conv layers ([I])."""

    standard = auto()
    trace = auto()


@dataclass(kw_only=True)
class TKFACConfig(CurvatureConfig):
    """TKFAC's options: the shared curvature options plus the factor and conv-damping forms."""

    trace_form: TraceForm = option(TraceForm.weighted, "weighted | normalized factors")
    conv_damping: ConvDamping = option(ConvDamping.standard, "standard | trace (conv layers)")


def _homog_gram(xt: Tensor, w: Tensor | None, *, has_bias: bool) -> Tensor:
    """``Σ_r w_r ā_r ā_rᵀ`` from columns ``xt`` (``k × R``, no bias row) and row weights ``w``
    (``None``: all ones); the bias row/column of ``ā = [x; 1]`` is built from weighted sums."""
    total: Tensor | float
    if w is None:
        a0 = _gram(xt)
        s, total = xt.sum(1), float(xt.shape[1])
    else:
        a0 = _gram(xt * w.sqrt())
        s, total = xt @ w, w.sum()
    return bias_bordered(a0, s, total) if has_bias else a0


class TKFACBlock(CurvatureBlock):
    """Trace-restricted ``δ·Φ⊗Ψ`` block (see the module docstring).

    ``tensors``: ``Phi`` (``E[trΓ Λ]``, or ``A`` under ``normalized``), ``Psi`` (``E[trΛ Γ]``, or
    ``G``), ``trace`` (``E[trΛ trΓ]``), ``T``; after a refresh ``PhiInv``, ``PsiInv``.  For an
    embedding ``Phi`` and ``PhiInv`` are vectors (diagonal).
    """

    homogeneous_input = False
    #: the raw input is captured; ``update_stats`` builds input rows a few examples at a time
    #: (per-example traces and weights are exact per chunk; the sums add up)
    raw_input = True
    statistic_keys = frozenset({"Phi", "Psi", "trace", "T"})

    def __init__(
        self,
        layer: LayerHelper,
        *,
        trace_form: str = "weighted",
        conv_damping: str = "standard",
    ) -> None:
        super().__init__(layer)
        self.trace_form = str(TraceForm(trace_form))
        self.conv_damping = str(ConvDamping(conv_damping))
        self.diagonal = layer.diagonal_input
        self.m = layer.out_dim
        self.n = layer.in_dim

    # -- statistics ---------------------------------------------------------------------
    def update_factor_stats(self, a: Tensor, g: Tensor) -> None:
        N, T, _ = g.shape
        sd = self.stat_dtype
        g3 = g.permute(2, 0, 1)  # (m, N, T) view of the output rows
        tr_g = g3.square().sum((0, 2), dtype=sd)  # trΓ_n = Σ_t ‖g_{n,t}‖²
        if self.diagonal:
            tr_a = torch.full_like(tr_g, float(T))  # one-hot inputs: ‖ā‖² = 1 per token
            xt = None
        else:
            xt = columns(a, sd)  # (k, N·T): a view of a conv's patch columns
            # per-example ‖ā_n‖² (exact per example; the batch sums below are in stat_dtype)
            tr_a = xt.reshape(-1, N, T).square().sum((0, 2)) + (
                float(T) if self.layer.has_bias else 0.0
            )
        self.accumulate("trace", (tr_a * tr_g).sum(), rows=N * T, examples=N)
        weighted = self.trace_form == "weighted"
        # Ψ: one pass builds the (optionally √trΛ_n-scaled) contiguous columns
        cols = torch.empty(g3.shape, dtype=sd, device=g.device)
        if weighted:
            torch.mul(g3, tr_a.sqrt().view(1, N, 1), out=cols)
        else:
            cols.copy_(g3)
        self.accumulate("Psi", _gram(cols.view(g3.shape[0], -1)))
        wa = tr_g.repeat_interleave(T) if weighted else None
        if xt is None:
            ids = a.reshape(-1)
            counts = torch.bincount(ids, weights=wa, minlength=self.n)
            self.accumulate("Phi", counts.to(sd))
        else:
            self.accumulate("Phi", _homog_gram(xt, wa, has_bias=self.layer.has_bias))

    def update_stats(self, a: Tensor, g: Tensor) -> None:
        for rows, gi in self.row_chunks(a, g):
            self.update_factor_stats(rows, gi)

    def commit_factor_sums(
        self, sums: dict[str, Tensor], rows: int, examples: int, decay: float
    ) -> None:
        # weighted: per-example means E[·]; normalized: K-FAC's per-row means A, G
        div = examples if self.trace_form == "weighted" else rows
        self.ema("Phi", sums["Phi"] / div, decay)
        self.ema("Psi", sums["Psi"] / div, decay)
        self.ema("trace", sums["trace"] / max(examples, 1), decay)
        t = torch.tensor(rows / max(examples, 1), dtype=self.dtype, device=self.device)
        self.ema("T", t, decay)

    def commit_stats(self, decay: float) -> None:
        sums, rows, examples = self.take_pending()
        self.commit_factor_sums(sums, rows, examples, decay)

    # -- factors ---------------------------------------------------------------------------
    def factors(self) -> tuple[Tensor, Tensor, float]:
        """``(Φ, Ψ, δ)``: unit-trace factors and the trace coefficient (``Φ`` is a vector for an
        embedding).  A zero factor (no signal yet) becomes the uniform ``I / dim``."""
        t = self.tensors
        phi, psi = t["Phi"], t["Psi"]
        tr_phi = float(phi.sum() if self.diagonal else phi.diagonal().sum())
        tr_psi = float(psi.diagonal().sum())
        if tr_phi > 0 and math.isfinite(tr_phi):
            phi = phi / tr_phi
        else:
            phi = torch.full_like(phi, 1.0 / self.n) if self.diagonal else _eye_like(phi) / self.n
        if tr_psi > 0 and math.isfinite(tr_psi):
            psi = psi / tr_psi
        else:
            psi = _eye_like(psi) / self.m
        delta = max(float(t["trace"]) / float(t["T"]), 0.0)
        return phi, psi, delta

    def layer_damping(self, damping: float, delta: float) -> float:
        """λ of this layer: ``damping``, or ``damping·δ`` on conv layers with
        ``conv_damping="trace"`` (kept above 1e-12·damping)."""
        if self.conv_damping == "trace" and self.layer.kind == "conv2d":
            return max(damping * delta, 1e-12 * damping)
        return damping

    def dense(self) -> Tensor:
        """Undamped ``δ·Φ⊗Ψ`` in the row-major layout, ``(m·n)²`` (tests only)."""
        phi, psi, delta = self.factors()
        if self.diagonal:
            phi = torch.diag(phi)
        return delta * torch.kron(psi, phi)

    # -- refresh / precondition ----------------------------------------------------------------
    def refresh(self, damping: float) -> bool:
        if "Phi" not in self.tensors:
            return True
        phi, psi, delta = self.factors()
        sd, sl = math.sqrt(delta), math.sqrt(self.layer_damping(damping, delta))
        psi_inv = safe_inv(sd * psi + sl * _eye_like(psi))
        if psi_inv is None:
            return False
        phi_inv: Tensor | None
        if self.diagonal:
            phi_inv = 1.0 / (sd * phi + sl)
        else:
            phi_inv = safe_inv(sd * phi + sl * _eye_like(phi))
            if phi_inv is None:
                return False
        self.tensors.update(PhiInv=phi_inv, PsiInv=psi_inv)
        self.ready = True
        return True

    def precondition(self, grad: Tensor) -> Tensor:
        t = self.tensors
        if self.diagonal:
            return (t["PsiInv"] @ grad) * t["PhiInv"]
        return t["PsiInv"] @ grad @ t["PhiInv"]


def _eye_like(m: Tensor) -> Tensor:
    return torch.eye(m.shape[0], dtype=m.dtype, device=m.device)


class TKFAC(CurvatureOptimizer):
    """TKFAC (see the module docstring)."""

    Config = TKFACConfig
    config: TKFACConfig

    def make_block(self, layer: LayerHelper) -> TKFACBlock:
        c = self.config
        return TKFACBlock(layer, trace_form=c.trace_form, conv_damping=c.conv_damping)
