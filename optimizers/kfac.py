"""K-FAC: Martens & Grosse, "Optimizing Neural Networks with Kronecker-factored Approximate
Curvature", ICML 2015; convolutions by KFC, Grosse & Martens, "A Kronecker-factored approximate
Fisher matrix for convolution layers", ICML 2016.

The practical variant (ALGORITHMS.md §1.3): per layer ``F ≈ T · A ⊗ G`` with the canonical
normalisation of §1.2 (per-example output gradients, conv locations as extra samples), factors
EMA'd every ``stat_every`` steps, eigendecompositions every ``inv_every`` steps, exact Tikhonov
damping on the Kronecker product (``damping_form="eigen"``) by default, KL clipping (§0.7), then
SGD with momentum and weight decay on the preconditioned direction (§0.6).  ``fisher="mc"``
takes ``G`` from a sampled-label backward (the paper's true Fisher); ``"ef"`` from the training
backward (the empirical Fisher of kfac-pytorch).

Defaults and why:

* ``damping=1e-2`` — with our normalisation ``A ⊗ G`` is on the scale of the per-example Fisher
  of the mean loss (eigenvalues of order 1e-3..1 for cross-entropy), so 1e-2 is a moderate
  Tikhonov term; kfac-pytorch's 1e-3 refers to an ``N²``-smaller ``G`` (§1.7) and is not
  comparable.  Tune it.
* ``kl_clip=1e-2`` — the clip bounds ``η² Σ⟨P, ∇⟩ ≈ η² ∇ᵀF⁻¹∇ ≈ 2·KL`` of one step, so κ = 1e-2
  keeps the predicted per-step KL at or below 0.005 nats.  kfac-pytorch's κ = 1e-3 acts on its
  ``N²``-smaller ``G``, i.e. on much larger ``⟨P, ∇⟩``, so the same number would clip our
  steps far more often than theirs; 1e-2 keeps the clip as a safety net that mostly bites in
  the first steps and after refreshes with a small ``G`` (EF late in training).
* ``approx="expand"`` — conv locations (and the tokens of a Linear applied over a sequence)
  count as extra samples (KFC, Grosse & Martens 2016).  ``"reduce"`` is K-FAC-reduce
  (Eschenhagen et al., NeurIPS 2023): inputs averaged and output gradients summed over the
  locations before the outer products, the same Kronecker structure at ~1/T of the statistics
  cost (see :meth:`KroneckerBlock.add_reduced_stats`).  Embeddings keep expand.
* ``stat_every=10``, ``inv_every=100``, ``stat_decay=0.95`` — the ImageNet preset of
  kfac-pytorch; factors start from the first batch value (no bias towards the identity).
"""

from __future__ import annotations

from dataclasses import dataclass

from ._config import option
from ._kronecker import Approx, DampingForm, KroneckerBlock
from ._layers import LayerHelper
from .base import CurvatureConfig, CurvatureOptimizer

__all__ = ["KFAC", "DampingForm", "KFACConfig"]


@dataclass(kw_only=True)
class KFACConfig(CurvatureConfig):
    """K-FAC's options: the shared curvature options plus the damping form."""

    damping_form: DampingForm = option(
        DampingForm.eigen, "eigen | factored_tikhonov | inverse (ALGORITHMS.md §0.5)"
    )
    pi_correction: bool = option(True, "factored_tikhonov only: π-corrected damping split")
    approx: Approx = option(
        Approx.expand, "expand | reduce: weight-sharing locations as examples or summed first"
    )


class KFAC(CurvatureOptimizer):
    """K-FAC / KFC with a choice of damping form (see the module docstring)."""

    Config = KFACConfig
    config: KFACConfig

    def make_block(self, layer: LayerHelper) -> KroneckerBlock:
        return KroneckerBlock(
            layer,
            damping_form=self.config.damping_form,
            pi_correction=self.config.pi_correction,
            approx=self.config.approx,
        )
