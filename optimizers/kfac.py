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

from typing import Any

from torch import nn

from ._kronecker import DAMPING_FORMS, KroneckerBlock, check_approx
from ._layers import LayerHelper
from .base import CurvatureOptimizer, curvature_factory
from .registry import OptimizerSpec, register

__all__ = ["KFAC", "build_kfac"]


class KFAC(CurvatureOptimizer):
    """K-FAC / KFC with a choice of damping form (see the module docstring)."""

    def __init__(
        self,
        model: nn.Module,
        *,
        damping_form: str = "eigen",
        pi_correction: bool = True,
        approx: str = "expand",
        **kwargs: Any,
    ) -> None:
        check_approx(approx)
        self.approx = approx
        if damping_form not in DAMPING_FORMS:
            raise ValueError(
                f"optimizer.damping_form must be one of {', '.join(DAMPING_FORMS)}, "
                f"got {damping_form!r}"
            )
        self.damping_form = damping_form
        self.pi_correction = bool(pi_correction)
        super().__init__(model, **kwargs)

    def make_block(self, layer: LayerHelper) -> KroneckerBlock:
        return KroneckerBlock(
            layer,
            damping_form=self.damping_form,
            pi_correction=self.pi_correction,
            approx=self.approx,
        )


build_kfac = curvature_factory(KFAC, "kfac")


register(
    OptimizerSpec(
        name="kfac",
        factory=build_kfac,
        description="K-FAC/KFC: Kronecker-factored natural gradient (eigen damping, KL clip)",
        paper="Martens & Grosse, ICML 2015; Grosse & Martens, ICML 2016",
        needs_model=True,
        curvature=True,
        sampled_fisher=True,
    )
)
