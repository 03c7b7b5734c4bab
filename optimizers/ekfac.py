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

import torch
from torch import Tensor, nn

from ._config import option
from ._eigencorrect import (
    EigenCorrectedOptimizer,
    EigenCorrection,
    ProjectionDtype,
    Scalings,
    StepFlags,
)
from ._kronecker import KroneckerBlock
from ._layers import LayerHelper
from .base import CurvatureConfig, CurvatureOptimizer

__all__ = ["EKFAC", "EKFACBlock", "EKFACConfig"]


@dataclass(kw_only=True)
class EKFACConfig(CurvatureConfig):
    """EKFAC's options: the shared curvature options plus the scaling estimate (module doc)."""

    scalings: Scalings = option(Scalings.exact, "exact (per-example, the paper) | ra")
    scale_every: int | None = option(
        None, "scalings every k steps (null: on the statistic steps)", schedule=True
    )
    scale_decay: float = option(0.95, "cap of the scalings' EMA old-value weight", ge=0, lt=1)
    projection_dtype: ProjectionDtype = option(
        ProjectionDtype.auto, "projection multiply dtype: auto | float32 | float64 | bfloat16"
    )


class EKFACBlock(EigenCorrection, KroneckerBlock):
    """K-FAC factors + eigenvalue-corrected scalings in their eigenbasis."""

    def __init__(
        self,
        layer: LayerHelper,
        *,
        scalings: str = "exact",
        scale_decay: float = 0.95,
        projection_dtype: str = "auto",
        flags: StepFlags | None = None,
    ) -> None:
        KroneckerBlock.__init__(self, layer, damping_form="eigen")
        self.init_correction(
            scalings=scalings,
            scale_decay=scale_decay,
            projection_dtype=projection_dtype,
            flags=flags,
        )

    #: raw input captured (as K-FAC); :meth:`EigenCorrection.update_stats` builds the rows
    raw_input = True
    raw_output = False  # the scalings' projections need the per-example output rows

    def update_factor_stats(self, rows: Tensor, g: Tensor) -> None:
        self.add_factor_stats(rows, g, raw_a=False, raw_g=False)

    def commit_factor_sums(
        self, sums: dict[str, Tensor], rows: int, examples: int, decay: float
    ) -> None:
        self.ema("A", sums["A"] / rows, decay)
        self.ema("G", sums["G"] / rows, decay)
        t = torch.tensor(rows / max(examples, 1), dtype=self.dtype, device=self.device)
        self.ema("T", t, decay)

    def refresh(self, damping: float) -> bool:
        if "A" not in self.tensors:
            return True
        if not KroneckerBlock.refresh(self, damping):
            return False
        t = self.tensors
        _, _, T = self.factors()
        self.reset_scalings(T * torch.outer(t["dG"], t["dA"]), damping)
        return True

    def kfac_eigenvalues(self) -> Tensor:
        """``T·d_G⊗d_A`` of the current basis (the values the scalings were reset to)."""
        t = self.tensors
        return float(t["T"]) * torch.outer(t["dG"], t["dA"])


class EKFAC(EigenCorrectedOptimizer, CurvatureOptimizer):
    """EKFAC (see the module docstring)."""

    Config = EKFACConfig
    config: EKFACConfig

    def __init__(
        self, model: nn.Module, config: EKFACConfig | None = None, /, **hparams: object
    ) -> None:
        c = EKFACConfig.build(config, hparams)
        self.init_scalings(c.scalings, c.scale_every, c.scale_decay, c.projection_dtype)
        super().__init__(model, c)

    def make_block(self, layer: LayerHelper) -> EKFACBlock:
        return EKFACBlock(layer, **self.correction_options())
