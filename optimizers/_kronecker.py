"""The reusable ``A ⊗ G`` block (Martens & Grosse 2015; KFC, Grosse & Martens 2016).

Statistics (canonical normalisation, ALGORITHMS.md §1.2), per layer and statistic step::

    A = 1/(N·T) Σ ā āᵀ   (n × n; a vector of token frequencies for an embedding)
    G = 1/(N·T) Σ g gᵀ   (m × m; g = per-example output gradient)
    T = locations per example (conv output pixels; 1 for a plain Linear)

so that ``F ≈ T · A ⊗ G`` (row-major: ``torch.kron(G, A)``).  Damping forms (§0.5, chosen
explicitly with ``damping_form``):

* ``eigen`` — exact Tikhonov on the product, ``(T·A⊗G + λI)⁻¹``:
  ``P = Q_G [(Q_Gᵀ V Q_A) ⊘ (T·d_G d_Aᵀ + λ)] Q_Aᵀ``;
* ``factored_tikhonov`` — ``(1/T)(G + γ/π I)⁻¹ V (A + πγ I)⁻¹``, ``γ = sqrt(λ/T)``,
  ``π = sqrt((tr A / n) / (tr G / m))`` (``pi_correction=False``: π = 1, the
  ``A + √λ I``, ``G + √λ I`` form of the Goldfarb-group baseline);
* ``inverse`` — the same damping added to both factors, in the style of kfac-pytorch's INVERSE
  method (ALGORITHMS.md §0.5 #3): ``(1/T)(G + λ/T I)⁻¹ V (A + λ/T I)⁻¹``.  It is *not*
  numerically kfac-pytorch's: that library's factors are ``A/T²`` and ``G/(N²T²)`` in this
  normalisation (§1.7), so its damping ``λ'`` on both of its factors amounts to ``T²λ'`` on our
  ``A`` but ``N²T²λ'`` on our ``G`` [I]; no kfac-pytorch damping reproduces this form (same
  number on both) once a batch has more than one example.

Everything needed per step is precomputed at refresh time, so :meth:`precondition` is two
(inverse forms) or four (eigen) matrix products.  ``tensors`` holds ``A``, ``G``, ``T`` and, after a
refresh, ``dA, QA, dG, QG, scale`` (eigen) or ``Ainv, Ginv`` (inverse forms); for an embedding
``A``/``dA``/``Ainv`` are vectors and there is no ``QA``.

Batch sums of outer products are accumulated in the compute dtype by default (``stat_dtype``
of the optimizer: ``None``).  A float32 sum over N·T rows is good to ~1e-7 relative and depends
on the summation order; the ``1/λ`` amplification of a small damping turns that into a ~2e-4
relative difference in the loss after a dozen steps (measured at the K-FAC preset), so a
2-process DDP run (two half sums) matches a 1-process run only to that level.
``stat_dtype="float64"`` makes the two agree within the DDP test's 1e-4 tolerance, at about
twice the statistics cost on CPU (the GEMM on ``N·T × n`` rows dominates a statistics step).
The running factors are kept in the compute dtype.
"""

from __future__ import annotations

import math
from enum import StrEnum, auto

import torch
from torch import Tensor

from ._layers import LayerHelper
from ._linalg import columns as _columns
from ._linalg import gram as _gram
from ._linalg import safe_eigh, safe_inv
from .base import CurvatureBlock

__all__ = ["Approx", "DampingForm", "KroneckerBlock"]


class DampingForm(StrEnum):
    """How the damping enters ``A ⊗ G`` (ALGORITHMS.md §0.5)."""

    eigen = auto()
    factored_tikhonov = auto()
    inverse = auto()


class Approx(StrEnum):
    """How a layer that shares its weight over locations (conv pixels, sequence tokens) is
    factored: ``expand`` (locations as extra samples, KFC) or ``reduce`` (Eschenhagen et al.,
    NeurIPS 2023: locations summed before the outer products)."""

    expand = auto()
    reduce = auto()



_DERIVED = ("dA", "QA", "dG", "QG", "scale", "Ainv", "Ginv")


class KroneckerBlock(CurvatureBlock):
    """K-FAC block ``T · A ⊗ G`` with the damping form of ALGORITHMS.md §0.5."""

    def __init__(
        self,
        layer: LayerHelper,
        *,
        damping_form: DampingForm | str = DampingForm.eigen,
        pi_correction: bool = True,
        approx: Approx | str = Approx.expand,
    ) -> None:
        super().__init__(layer)
        # the config classes validate these for users; the block takes the enums or their values
        self.approx = Approx(approx)
        self.damping_form = DampingForm(damping_form)
        self.pi_correction = bool(pi_correction)
        self.diagonal = layer.diagonal_input
        self.m = layer.out_dim
        self.n = layer.in_dim

    # -- statistics ---------------------------------------------------------------
    homogeneous_input = False  # the bias column of A is built from row sums (no copy)
    raw_input = True  # A from ``layer.input_gram`` (conv: chunked unfold, no full patch copy)
    raw_output = True  # G from ``layer.output_gram`` (conv: chunked, from g's own layout)
    #: running statistics; the rest (``_DERIVED``) is broadcast under DDP (KAISA)
    statistic_keys = frozenset({"A", "G", "T"})

    def update_stats(self, a: Tensor, g: Tensor) -> None:
        if self.approx == "reduce" and not self.diagonal:
            self.add_reduced_stats(a, g)
        else:
            self.add_factor_stats(a, g, raw_a=self.raw_input, raw_g=self.raw_output)

    def add_reduced_stats(self, a: Tensor, g: Tensor) -> None:
        """K-FAC-reduce (Eschenhagen et al., NeurIPS 2023, "Kronecker-Factored Approximate
        Curvature for Modern Neural Network Architectures"): the weight-sharing dimension is
        summed *before* the outer products, per example ``n`` with ``R`` locations::

            â_n = (1/R) Σ_r ā_{n,r},   ĝ_n = Σ_r g_{n,r},
            A = 1/N Σ_n â_n â_nᵀ,       G = 1/N Σ_n ĝ_n ĝ_nᵀ,   F ≈ T · A ⊗ G,

        ``T = 1`` (``loss_average="batch"``) or ``1/R`` (``"tokens"``: the loss is a mean over
        ``N·R`` terms).  Exact where the inputs do not vary over the locations (then the
        per-example gradient ``Σ_r g_{n,r} āᵀ = ĝ_n âᵀ``); the Gram products run over ``N``
        rows instead of expand's ``N·R``, so the statistics cost ~1/R of expand's (the patch
        means are sums over a strided view).  An embedding keeps expand (diagonal ``A``)."""
        self._accumulate_reduced(*self.layer.reduced_rows(a, g))

    def _accumulate_reduced(self, x: Tensor, gs: Tensor, locations: int) -> None:
        """Batch sums of K-FAC-reduce from the per-example mean inputs ``x`` (``(N, n-1)``)
        and summed output gradients ``gs`` (``(N, m)``) over ``locations`` positions."""
        n = gs.shape[0]
        tokens = self.layer.loss_average == "tokens" and locations > 1
        gt = gs.t().to(self.stat_dtype)
        self.accumulate("G", _gram(gt), rows=n, examples=n * locations if tokens else n)
        xt = x.t().to(self.stat_dtype)
        a0 = _gram(xt)
        self.accumulate("A", bias_bordered(a0, xt.sum(1), n) if self.layer.has_bias else a0)

    def add_factor_stats(self, a: Tensor, g: Tensor, *, raw_a: bool, raw_g: bool) -> None:
        """Accumulate the batch sums of ``A`` and ``G`` from the raw hook values (``raw_*``:
        the helper's ``input_gram`` / ``output_gram``, chunked for convs) or from input rows
        ``(N, T, n-1)`` and output rows ``(N, T, m)``."""
        if self.approx == "reduce" and not self.diagonal and not (raw_a or raw_g):
            # rows (N, T, n-1) and scaled output rows (N, T, m), e.g. from EKFAC's chunks
            self._accumulate_reduced(a.mean(1), g.sum(1), a.shape[1])
            return
        if raw_g:  # the hook's value: the helper scales and sums it (conv: chunked)
            g_sum, rows, examples = self.layer.output_gram(g, dtype=self.stat_dtype)
            self.accumulate("G", g_sum, rows=rows, examples=examples)
        else:
            gt = _columns(g, self.stat_dtype)
            rows = gt.shape[1]
            self.accumulate("G", _gram(gt), rows=rows, examples=g.shape[0])
        if self.diagonal:
            if raw_a:
                a = self.layer.input_rows(a)
            counts = torch.bincount(a.reshape(-1), minlength=self.n)
            self.accumulate("A", counts.to(self.stat_dtype))
            return
        if raw_a:
            a0, s, rows_a = self.layer.input_gram(a, dtype=self.stat_dtype)
        else:
            xt = _columns(a, self.stat_dtype)
            a0, s, rows_a = _gram(xt), xt.sum(1), xt.shape[1]
        self.accumulate("A", bias_bordered(a0, s, rows_a) if self.layer.has_bias else a0)

    def update_factor_stats(self, rows: Tensor, g: Tensor) -> None:
        """The factor statistics from input rows ``(N, T, n-1)`` and output rows ``(N, T, m)``
        (as a factor structure of :class:`optimizers._eigencorrect.EigenCorrectedBlock`)."""
        self.add_factor_stats(rows, g, raw_a=False, raw_g=False)

    def commit_stats(self, decay: float) -> None:
        sums, rows, examples = self.take_pending()
        self.commit_factor_sums(sums, rows, examples, decay)

    def commit_factor_sums(
        self, sums: dict[str, Tensor], rows: int, examples: int, decay: float
    ) -> None:
        """Fold the batch sums into the running ``A``, ``G``, ``T``."""
        self.ema("A", (sums["A"] / rows).to(self.dtype), decay)
        self.ema("G", (sums["G"] / rows).to(self.dtype), decay)
        t = torch.tensor(rows / max(examples, 1), dtype=self.dtype, device=self.device)
        self.ema("T", t, decay)

    # -- refresh --------------------------------------------------------------------
    def factors(self) -> tuple[Tensor, Tensor, float]:
        """Running ``(A, G, T)``."""
        return self.tensors["A"], self.tensors["G"], float(self.tensors["T"])

    def refresh(self, damping: float) -> bool:
        if "A" not in self.tensors:
            return True
        A, G, T = self.factors()
        if self.damping_form == "eigen":
            new = self._refresh_eigen(A, G, T, damping)
        else:
            new = self._refresh_inverse(A, G, T, damping)
        if new is None:
            return False
        for k in _DERIVED:
            self.tensors.pop(k, None)
        self.tensors.update(new)
        self.ready = True
        return True

    def _refresh_eigen(
        self, A: Tensor, G: Tensor, T: float, damping: float
    ) -> dict[str, Tensor] | None:
        eg = safe_eigh(G)
        if eg is None:
            return None
        dG, QG = eg
        out = {"dG": dG, "QG": QG}
        if self.diagonal:
            dA = A.clamp_min(0)
        else:
            ea = safe_eigh(A)
            if ea is None:
                return None
            dA, out["QA"] = ea
        out["dA"] = dA
        out["scale"] = 1.0 / (T * torch.outer(dG, dA) + damping)
        return out

    def _refresh_inverse(
        self, A: Tensor, G: Tensor, T: float, damping: float
    ) -> dict[str, Tensor] | None:
        lam = damping / T
        if self.damping_form == "factored_tikhonov":
            gamma = math.sqrt(lam)
            pi = 1.0
            if self.pi_correction:
                tr_a = float(A.sum() if self.diagonal else A.diagonal().sum()) / self.n
                tr_g = float(G.diagonal().sum()) / self.m
                if tr_a > 0 and tr_g > 0 and math.isfinite(tr_a / tr_g):
                    pi = math.sqrt(tr_a / tr_g)
            a_shift, g_shift = pi * gamma, gamma / pi
        else:
            a_shift = g_shift = lam
        eye_m = torch.eye(self.m, dtype=G.dtype, device=G.device)
        g_inv = safe_inv(G + g_shift * eye_m)
        if g_inv is None:
            return None
        a_inv: Tensor | None
        if self.diagonal:
            a_inv = 1.0 / (A + a_shift)
        else:
            eye_n = torch.eye(self.n, dtype=A.dtype, device=A.device)
            a_inv = safe_inv(A + a_shift * eye_n)
            if a_inv is None:
                return None
        return {"Ainv": a_inv, "Ginv": g_inv / T}

    # -- precondition -----------------------------------------------------------------
    def precondition(self, grad: Tensor) -> Tensor:
        t = self.tensors
        if self.damping_form == "eigen":
            qg = t["QG"]
            if self.diagonal:
                return qg @ ((qg.t() @ grad) * t["scale"])
            qa = t["QA"]
            return qg @ ((qg.t() @ grad @ qa) * t["scale"]) @ qa.t()
        if self.diagonal:
            return (t["Ginv"] @ grad) * t["Ainv"]
        return t["Ginv"] @ grad @ t["Ainv"]

    def damped_dense(self, damping: float) -> Tensor:
        """The damped curvature matrix this block inverts, row-major ``(m·n)²`` (tests only)."""
        A, G, T = self.factors()
        if self.diagonal:
            A = torch.diag(A)
        eye = torch.eye(self.m * self.n, dtype=A.dtype, device=A.device)
        if self.damping_form == "eigen":
            return T * torch.kron(G, A) + damping * eye
        inv_g = self.tensors["Ginv"] * T
        inv_a = self.tensors["Ainv"]
        if self.diagonal:
            inv_a = torch.diag(inv_a)
        return T * torch.kron(torch.linalg.inv(inv_g), torch.linalg.inv(inv_a))


def bias_bordered(a0: Tensor, s: Tensor, total: Tensor | float) -> Tensor:
    """``Σ ā āᵀ`` for homogeneous rows ``ā = [x; 1]`` from ``a0 = Σ x xᵀ``, ``s = Σ x`` and
    ``total = Σ 1`` (all optionally weighted alike)."""
    k = a0.shape[0]
    full = a0.new_empty(k + 1, k + 1)
    full[:-1, :-1] = a0
    full[:-1, -1] = s
    full[-1, :-1] = s
    full[-1, -1] = total
    return full
