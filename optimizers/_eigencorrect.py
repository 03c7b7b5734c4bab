"""Eigenvalue correction in a Kronecker-factored eigenbasis, shared by EKFAC and TEKFAC.

EKFAC: George, Laurent, Bouthillier, Ballas & Vincent, "Fast Approximate Natural Gradient Descent
in a Kronecker-factored Eigenbasis", NeurIPS 2018 (ALGORITHMS.md §2).  TEKFAC: Gao et al.,
arXiv 2011.13609 (§3.3).  Both keep the eigenbasis ``Q = Q_A ⊗ Q_G`` of two Kronecker factors
and replace the Kronecker eigenvalues by *scalings* ``s`` (an ``m × n`` matrix), the second
moment of the per-example gradients projected onto the basis::

    s* = E_n[(Q_Gᵀ ∇_W ℓ_n Q_A)^{⊙2}]   (= diag(Qᵀ F Q), the Frobenius-optimal diagonal)
    P  = Q_G [(Q_Gᵀ V Q_A) ⊘ (s + D)] Q_Aᵀ

``D`` is the damping term (a scalar ε for EKFAC, TKFAC's cross terms for TEKFAC).

What is here:

* :func:`projected_second_moment` — ``Σ_n (Q_Gᵀ ∇_W ℓ_n Q_A)^{⊙2}`` for Linear, Conv2d (per-example
  gradients ``Σ_t g_{n,t} ā_{n,t}ᵀ`` by batched matrix products over chunks of examples, no
  Python loop over examples; the cheaper of "project rows, then multiply" and "multiply, then
  project" is picked from the shapes) and Embedding (identity input basis, token ids).
* :class:`EigenCorrection` — a block mixin: accumulates the per-example statistic on scaling
  steps, folds it into ``s`` and keeps ``scale = 1/(s + D)`` for :meth:`precondition`; the
  ``ra`` mode (Thrandis/EKFAC-pytorch's cheap running average) uses ``N·(Q_Gᵀ V Q_A)^{⊙2}`` of the
  mini-batch gradient instead.
* :class:`EigenCorrectedOptimizer` — an optimizer mixin: the ``scalings`` / ``scale_every`` /
  ``scale_decay`` options and the per-step flags (factor step, scaling step, refresh step) its
  blocks read.

Averaging of the scalings (a design choice, see the EKFAC module docstring): at every basis
recompute ``s`` is reset to the Kronecker eigenvalues (K-FAC's ``T·d_G⊗d_A``, TKFAC's
``δ·d_Ψ⊗d_Φ``); the ``k``-th scaling update after a reset is ``s ← β_k s + (1-β_k) ŝ``.  In
``exact`` mode ``β_k = min(1 - 1/k, scale_decay)`` (the bias-free schedule of Martens & Grosse,
§0.4): the first per-example estimate replaces the reset values, later ones are averaged.  In
``ra`` mode ``β_k = scale_decay`` (Thrandis/EKFAC-pytorch): the rank-one surrogate
``N·(Q_Gᵀ V Q_A)²`` is far too small in most directions to stand alone, so the reset values
stay in the average as a prior.  Scalings are not updated on
a step that recomputes the basis (the estimate would belong to the old basis), so right after a
recompute the direction equals the Kronecker method's.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from enum import StrEnum, auto
from typing import Any

import torch
from torch import Tensor

from .base import Schedule, _check_schedule, _freq_at

__all__ = [
    "PROJECTION_DTYPES",
    "SCALING_MODES",
    "EigenCorrectedOptimizer",
    "ProjectionDtype",
    "Scalings",
    "EigenCorrection",
    "StepFlags",
    "projected_second_moment",
    "resolve_projection_dtype",
]

#: ``exact``: per-example projected gradients (the paper); ``ra``: running average of
#: ``N·(Q_Gᵀ V Q_A)²`` of the mini-batch gradient (Thrandis/EKFAC-pytorch ``ra=True``)
class Scalings(StrEnum):
    """How the eigenbasis scalings are estimated (see the comment above)."""

    exact = auto()
    ra = auto()


class ProjectionDtype(StrEnum):
    """dtype the exact scalings' projections are multiplied in (``auto``: see below)."""

    auto = "auto"
    float32 = "float32"
    float64 = "float64"
    bfloat16 = "bfloat16"


SCALING_MODES = tuple(Scalings)

#: elements of one chunk of per-example ``m × n`` matrices (bounds the conv path's memory; 2 MB
#: in float32 measured 5-20 % faster than 16 MB on the small CNN's conv layers, 2-core CPU)
CHUNK_ELEMENTS = 1 << 19

#: ``projection_dtype`` choices: the dtype the exact scalings' projections are multiplied in
#: (they are always summed in the factor dtype)
PROJECTION_DTYPES = {
    "auto": None,
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
}


@functools.cache
def native_bf16_matmul(device: torch.device) -> bool:
    """Whether ``device`` multiplies bfloat16 matrices in hardware (CPU: AVX512-BF16 or AMX;
    CUDA: compute capability 8.0 or newer)."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device)[0] >= 8
    if device.type == "cpu":
        cpu = torch.cpu
        checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        return any(bool(getattr(cpu, c, lambda: False)()) for c in checks)
    return False


def resolve_projection_dtype(
    choice: str, factor_dtype: torch.dtype, device: torch.device
) -> torch.dtype:
    """The multiply dtype of the exact scalings' projections.

    ``auto``: bfloat16 when the factors are float32 and ``device`` multiplies bfloat16 natively
    (on an AVX512-BF16 CPU a 8192×577 by 577×577 product takes 18 ms in bfloat16, 57 ms in
    float32; the scalings stay float32 sums of the products), otherwise the factor dtype
    (float64 factors, as in the dense-reference tests, stay exact).
    """
    _check_projection_dtype(choice)
    dtype = PROJECTION_DTYPES[choice]
    if dtype is not None:
        return dtype
    if factor_dtype == torch.float32 and native_bf16_matmul(device):
        return torch.bfloat16
    return factor_dtype


class StepFlags:
    """What the current step does; written by the optimizer, read by its blocks."""

    __slots__ = ("step", "factors", "scalings", "refresh", "stepping")

    def __init__(self) -> None:
        self.step = 0
        self.factors = True  # factor statistics are collected on this step
        self.scalings = True  # scalings are updated on this step
        self.refresh = False  # the basis is recomputed on this step
        self.stepping = False  # inside optimizer.step() (the ``ra`` update runs only there)


# ----------------------------------------------------------------------------- statistics
def project_rows(a: Tensor, qa: Tensor, *, has_bias: bool) -> Tensor:
    """``ā Q_A`` for rows ``a`` (``(..., n-1)`` without the bias column when ``has_bias``)."""
    if has_bias and a.shape[-1] == qa.shape[0] - 1:
        return torch.addmm(qa[-1], a.reshape(-1, a.shape[-1]), qa[:-1]).reshape(
            *a.shape[:-1], qa.shape[1]
        )
    return a @ qa


def _per_example_grads(a: Tensor, g: Tensor, *, has_bias: bool) -> Tensor:
    """``(N, m, n)`` per-example gradients ``Σ_t g_{n,t} ā_{n,t}ᵀ`` (``a`` without bias column)."""
    pe = torch.bmm(g.transpose(1, 2), a)
    if has_bias:
        pe = torch.cat([pe, g.sum(1).unsqueeze(2)], dim=2)
    return pe


def projected_second_moment(
    a: Tensor,
    g: Tensor,
    qa: Tensor | None,
    qg: Tensor,
    *,
    n: int,
    has_bias: bool,
    path: str = "auto",
    chunk_elements: int = CHUNK_ELEMENTS,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """``Σ_n (Q_Gᵀ ∇_W ℓ_n Q_A)^{⊙2}`` as an ``m × n`` matrix (a sum over examples).

    ``a``: ``(N, T, n-1)`` inputs without the bias column (``(N, T, n)`` also accepted), or
    ``(N, T)`` token ids when ``qa is None`` (embedding: the input basis is the identity);
    ``g``: ``(N, T, m)`` per-example output gradients; ``path``: ``rows`` (project the rows,
    then one batched product), ``grads`` (per-example gradients, then project them) or ``auto``
    (the cheaper for these shapes); ``dtype``: the dtype of the row projections ``ā Q_A``,
    ``g Q_G`` and their products on the ``rows`` path and for ``T = 1`` (default ``qg``'s).  The
    ``grads`` path and embeddings stay in ``qg``'s dtype: their products do little work per
    input element, so casting the inputs costs about what a cheaper product saves (measured
    on the small CNN's conv layers).  The result is in ``qg``'s dtype; squares are summed there.
    """
    if path not in ("auto", "rows", "grads"):
        raise ValueError(f"path must be auto, rows or grads, got {path!r}")
    N, T, m = g.shape
    out_dtype = qg.dtype
    if qa is None:  # embedding: columns are tokens, Q_A = I
        gg = (g.to(out_dtype) @ qg).reshape(N * T, m)
        ids = a.reshape(N, T)
        keys = (ids + n * torch.arange(N, device=ids.device).unsqueeze(1)).reshape(-1)
        uniq, inv = torch.unique(keys, return_inverse=True)
        per = gg.new_zeros(uniq.numel(), m).index_add_(0, inv, gg)  # per (example, token)
        out = gg.new_zeros(n, m).index_add_(0, uniq % n, per.square())
        return out.t()
    if path == "auto":
        rows_cost = T * (n * n + m * m + m * n)
        grads_cost = T * m * n + m * n * (m + n)
        path = "rows" if rows_cost <= grads_cost else "grads"
    work = (dtype or out_dtype) if T == 1 or path == "rows" else out_dtype
    a, g, qa, qg = a.to(work), g.to(work), qa.to(work), qg.to(work)
    if T == 1:  # rank-one per-example gradients: (gᵀQ_G)² ⊗ (āᵀQ_A)²
        ga = project_rows(a[:, 0], qa, has_bias=has_bias).to(out_dtype)
        return (g[:, 0] @ qg).to(out_dtype).square().t() @ ga.square()
    chunk = max(1, chunk_elements // (m * n))
    out = g.new_zeros(m, n, dtype=out_dtype)
    if path == "rows":
        ga = project_rows(a, qa, has_bias=has_bias)
        gg = g @ qg
        for s in range(0, N, chunk):
            pe = torch.bmm(gg[s : s + chunk].transpose(1, 2), ga[s : s + chunk])
            out += pe.square().sum(0, dtype=out_dtype)
        return out
    for s in range(0, N, chunk):
        pe = _per_example_grads(a[s : s + chunk], g[s : s + chunk], has_bias=has_bias)
        out += (qg.t() @ pe @ qa).square().sum(0, dtype=out_dtype)
    return out


# ----------------------------------------------------------------------------- block mixin
class EigenCorrection:
    """Mixin for a :class:`~optimizers.base.CurvatureBlock` with a Kronecker eigenbasis.

    The host block captures the raw layer input (``raw_input = True``), stores its basis in
    ``tensors["QA"]`` (absent for an embedding) and ``tensors["QG"]``, implements
    ``update_factor_stats(rows, g)`` (factor statistics from input rows ``(N, T, n-1)`` and
    output rows), ``commit_factor_sums(sums, rows, examples, decay)`` and calls
    :meth:`reset_scalings` at the end of its ``refresh``.  Tensors added here: ``s`` (scalings),
    ``damp`` (the damping term ``D``, scalar or ``m × n``) and ``scale = 1/(s + D)``.
    """

    #: the scalings are updated by ``commit_stats`` and the basis is read by ``update_stats``,
    #: so under DDP every rank keeps the decomposition (``QA``, ``QG``, ``s``, ``damp``, ``scale``
    #: are decompositions: reset by ``refresh`` on the inverse worker and broadcast; the
    #: per-example sums ``S`` are all-reduced with the factor sums, so every rank then applies
    #: the same scaling updates)
    decomposition_on_every_rank = True

    tensors: dict[str, Tensor]
    meta: dict[str, Any]
    layer: Any
    dtype: torch.dtype
    n: int

    def init_correction(
        self,
        *,
        scalings: str = "exact",
        scale_decay: float = 0.95,
        projection_dtype: str = "auto",
        flags: StepFlags | None = None,
    ) -> None:
        _check_scaling_options(scalings, scale_decay, projection_dtype)
        self.scalings = scalings
        self.scale_decay = float(scale_decay)
        self.projection_dtype = projection_dtype
        self.flags = flags if flags is not None else StepFlags()

    # -- statistics -----------------------------------------------------------------
    @property
    def has_basis(self) -> bool:
        return "QG" in self.tensors and "s" in self.tensors

    def update_stats(self, a: Tensor, g: Tensor) -> None:
        """``a``: the raw layer input.  Input rows are built a few examples at a time
        (``layer.example_chunks``; a conv's whole patch matrix never exists) and feed both the
        factor statistics and the exact scalings' projections."""
        f = self.flags
        exact = self.scalings == "exact" and f.scalings and self.has_basis
        if not (f.factors or exact):
            return
        for rows, gi in self.row_chunks(a, g):  # type: ignore[attr-defined]
            if f.factors:
                self.update_factor_stats(rows, gi)  # type: ignore[attr-defined]
            if exact:
                self.update_stats_from_rows(rows, gi, counted=f.factors)

    def update_stats_from_rows(self, a: Tensor, g: Tensor, *, counted: bool) -> None:
        """Accumulate the exact scalings' ``S`` from input rows ``a`` and output gradients
        ``g``; ``counted``: the factor statistics already counted these rows/examples."""
        qg = self.tensors["QG"]
        dtype = resolve_projection_dtype(self.projection_dtype, qg.dtype, qg.device)
        s = projected_second_moment(
            a, g, self.tensors.get("QA"), qg, n=self.n, has_bias=self.layer.has_bias, dtype=dtype
        )
        if counted:
            self.accumulate("S", s)  # type: ignore[attr-defined]
        else:
            self.accumulate(  # type: ignore[attr-defined]
                "S", s, rows=g.shape[0] * g.shape[1], examples=g.shape[0]
            )

    def commit_stats(self, decay: float) -> None:
        sums, rows, examples = self.take_pending()  # type: ignore[attr-defined]
        if any(k != "S" for k in sums):
            self.commit_factor_sums(sums, rows, examples, decay)  # type: ignore[attr-defined]
            self.meta["examples"] = examples  # the batch size N used by the ``ra`` mode
        if "S" in sums and self.has_basis:
            self._update_scalings(sums["S"] / max(examples, 1))

    # -- scalings ---------------------------------------------------------------------
    def reset_scalings(self, s0: Tensor, damp: Tensor | float) -> None:
        """Start the scalings of a new basis at ``s0`` with damping term ``damp``."""
        damp_t = torch.as_tensor(damp, dtype=self.dtype, device=s0.device)
        self.tensors["s"] = s0.to(self.dtype).clone()
        self.tensors["damp"] = damp_t.clone()
        self.tensors["scale"] = 1.0 / (self.tensors["s"] + damp_t)
        self.meta["scale_updates"] = 0

    def _update_scalings(self, batch: Tensor) -> None:
        k = int(self.meta.get("scale_updates", 0)) + 1
        beta = self.scale_decay  # ``ra``: the reset values stay in the average
        if self.scalings == "exact":
            beta = min(1.0 - 1.0 / k, beta)
        s = self.tensors["s"]
        s.mul_(beta).add_(batch.to(s.dtype), alpha=1.0 - beta)
        self.tensors["scale"] = 1.0 / (s + self.tensors["damp"])
        self.meta["scale_updates"] = k

    # -- precondition ------------------------------------------------------------------
    def precondition(self, grad: Tensor) -> Tensor:
        t = self.tensors
        qg, qa = t["QG"], t.get("QA")
        proj = qg.t() @ grad if qa is None else qg.t() @ grad @ qa
        f = self.flags
        if (
            self.scalings == "ra"
            and f.stepping
            and f.scalings
            and self.meta.get("ra_step") != f.step
            and "s" in t
        ):
            self.meta["ra_step"] = f.step
            n_ex = float(self.meta.get("examples", 1))
            self._update_scalings(proj.square() * n_ex)
        proj = proj * t["scale"]
        return qg @ proj if qa is None else qg @ proj @ qa.t()


# ----------------------------------------------------------------------------- optimizer mixin
class EigenCorrectedOptimizer:
    """Mixin for a :class:`~optimizers.base.CurvatureOptimizer` whose blocks use
    :class:`EigenCorrection`: scaling schedule and per-step flags.

    Call :meth:`init_scalings` *before* ``CurvatureOptimizer.__init__``; pass ``self.step_flags``
    to every block.
    """

    def init_scalings(
        self,
        scalings: str,
        scale_every: Schedule | None,
        scale_decay: float,
        projection_dtype: str = "auto",
    ) -> None:
        _check_scaling_options(scalings, scale_decay, projection_dtype)
        self.projection_dtype = projection_dtype
        self.scalings = scalings
        self.scale_every: Schedule | None = (
            None if scale_every is None else _check_schedule("scale_every", scale_every)
        )
        self.scale_decay = float(scale_decay)
        self.step_flags = StepFlags()

    def correction_options(self) -> dict[str, Any]:
        """Keyword arguments of :meth:`EigenCorrection.init_correction` for a new block."""
        return {
            "scalings": self.scalings,
            "scale_decay": self.scale_decay,
            "projection_dtype": self.projection_dtype,
            "flags": self.step_flags,
        }

    def is_scale_step(self, step: int) -> bool:
        """Scaling update on ``step`` (default ``scale_every=None``: the statistic steps)."""
        if self.scale_every is None:
            return self.is_stat_step(step)  # type: ignore[attr-defined]
        return step % _freq_at("scale_every", self.scale_every, step) == 0

    def capture_step(self, step: int) -> bool:
        f = self.step_flags
        f.step = step
        f.factors = self.is_stat_step(step)  # type: ignore[attr-defined]
        f.refresh = self.is_inv_step(step)  # type: ignore[attr-defined]
        f.scalings = self.is_scale_step(step) and not f.refresh
        return f.factors or (f.scalings and self.scalings == "exact")

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        self.step_flags.stepping = True
        try:
            return super().step(closure)  # type: ignore[misc]
        finally:
            self.step_flags.stepping = False


def _check_scaling_options(scalings: str, scale_decay: float, projection_dtype: str) -> None:
    if scalings not in SCALING_MODES:
        raise ValueError(
            f"optimizer.scalings must be one of {', '.join(SCALING_MODES)}, got {scalings!r}"
        )
    _check_decay("scale_decay", scale_decay)
    _check_projection_dtype(projection_dtype)


def _check_projection_dtype(choice: str) -> None:
    if choice not in PROJECTION_DTYPES:
        raise ValueError(
            f"optimizer.projection_dtype must be one of {', '.join(PROJECTION_DTYPES)}, "
            f"got {choice!r}"
        )


def _check_decay(key: str, value: Any) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or math.isnan(value) or not 0 <= value < 1:
        raise ValueError(f"optimizer.{key} must be in [0, 1), got {value!r}")
