"""EKFAC: George, Laurent, Bouthillier, Ballas & Vincent, "Fast Approximate Natural Gradient
Descent in a Kronecker-factored Eigenbasis", NeurIPS 2018 (ALGORITHMS.md §2).

Per layer, the K-FAC factors ``A``, ``G`` (and ``T`` for conv, §1.2) are tracked exactly as in
:mod:`optimizers.kfac`; every ``inv_every`` steps their eigenbasis ``Q_A ⊗ Q_G`` is recomputed and
the *scalings* ``s`` are reset to the K-FAC eigenvalues ``T·d_G⊗d_A``.  The scalings are then
re-estimated in that basis from per-example gradients (``scalings="exact"``, the paper's
``s* = E_n[(Q_Gᵀ ∇_W ℓ_n Q_A)²]``, default) or, as an option, from the cheap running average of
the mini-batch gradient ``N·(Q_Gᵀ V Q_A)²`` (``scalings="ra"``, Thrandis/EKFAC-pytorch).  The
direction is ``P = Q_G[(Q_Gᵀ V Q_A) ⊘ (s + ε)]Q_Aᵀ`` with ``ε = damping``; then KL clip and SGD
with momentum as for K-FAC (§0.6, §0.7).

Choices (explicit options, defaults first):

* ``scale_every=None`` — scalings are updated on the *statistic* steps (every ``stat_every``),
  not on every step as in the paper: the per-example projections cost about as much as the
  factor statistics, so the step time stays close to K-FAC's.  ``scale_every=1`` is the paper's
  schedule (every step then captures activations and output gradients).
* ``projection_dtype="auto"`` — the row projections behind the exact scalings (``ā Q_A``,
  ``g Q_G`` and their per-example products) are multiplied in bfloat16 when the factors are
  float32 and the hardware multiplies bfloat16 natively (AVX512-BF16/AMX CPUs, CUDA ≥ 8.0);
  the squares are summed in float32.  On the small CNN's 577-wide conv layer this halves the
  projection time; the scalings differ from float32 products by bfloat16 rounding (~0.5 %
  relative, far below the sampling noise of a 128-example estimate).  ``"float32"`` (or
  ``"float64"``) gives the exact products; float64 factors are never rounded.
* Scalings are not updated on a basis-recompute step, so immediately after a recompute EKFAC's
  direction equals K-FAC's eigen-damped one (§2.7).  The ``k``-th update after a reset is
  ``s ← β_k s + (1-β_k) ŝ`` with ``β_k = min(1-1/k, scale_decay)``: the first per-example
  estimate replaces the K-FAC values, later ones are averaged (with ``scale_decay=0.95`` and the
  10/100 preset, a plain mean of the 9 estimates made in each basis).  In ``ra`` mode
  ``β_k = scale_decay`` from the K-FAC values on, as in Thrandis/EKFAC-pytorch (whose
  ``alpha=0.75`` is a good ``scale_decay`` there; ``scale_every=1`` is cheap in that mode).
* ``fisher="mc"`` takes both ``G`` and the per-example scalings from the sampled-label
  backward; the ``ra`` mode always uses the training gradient.
* ``damping=1e-2``, ``kl_clip=1e-2``, ``stat_every=10``, ``inv_every=100``,
  ``stat_decay=0.95`` — the K-FAC preset (see :mod:`optimizers.kfac` for why).
"""

from __future__ import annotations

from dataclasses import dataclass

from ._config import option
from ._eigencorrect import EigenCorrectedBlock, EigenCorrectedConfig, EigenCorrectedOptimizer
from ._kronecker import Approx, KroneckerBlock
from ._layers import LayerHelper
from .base import CurvatureConfig

__all__ = ["EKFAC", "EKFACConfig"]


@dataclass(kw_only=True)
class EKFACConfig(EigenCorrectedConfig):
    """EKFAC's options: the shared curvature and scaling options plus K-FAC's ``approx``."""

    approx: Approx = option(
        Approx.expand, "expand | reduce: the factors' weight-sharing treatment (as K-FAC's)"
    )


class EKFAC(EigenCorrectedOptimizer):
    """EKFAC (see the module docstring): eigenvalue-corrected K-FAC factors, ``D = λ``."""

    Config: type[CurvatureConfig] = EKFACConfig
    config: EKFACConfig

    def make_block(self, layer: LayerHelper) -> EigenCorrectedBlock:
        # factors as K-FAC's (optimizers/kfac.py, ``approx``); the scalings stay exact
        return self.corrected(KroneckerBlock(layer, approx=self.config.approx))
