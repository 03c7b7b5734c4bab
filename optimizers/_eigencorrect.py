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
* :class:`EigenCorrectedBlock` — the one eigen-corrected block, built from its *factor
  structure* (a :class:`FactorStructure`: K-FAC's :class:`~optimizers._kronecker.KroneckerBlock`
  for EKFAC, TKFAC's :class:`~optimizers.tkfac.TKFACBlock` for TEKFAC, which keeps the factor
  statistics) and its *damping rule* (``D`` from the eigenpairs of a new basis).  It
  accumulates the per-example statistic on scaling steps, folds it into ``s`` and keeps
  ``scale = 1/(s + D)`` for :meth:`~EigenCorrectedBlock.precondition`; the ``ra`` mode
  (Thrandis/EKFAC-pytorch's cheap running average) uses ``N·(Q_Gᵀ V Q_A)^{⊙2}`` of the
  mini-batch gradient instead.
* :class:`EigenCorrectedOptimizer` — the optimizer base of EKFAC and TEKFAC: the ``scalings`` /
  ``scale_every`` / ``scale_decay`` / ``projection_dtype`` options and the per-step flags
  (factor step, scaling step, refresh step) its blocks read.

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
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import StrEnum, auto
from typing import Any, Protocol

import torch
from torch import Tensor

from ._config import option
from ._distributed import PendingStats
from ._layers import LayerHelper
from ._linalg import safe_eigh
from .base import CurvatureBlock, CurvatureConfig, CurvatureOptimizer, Schedule, freq_at

__all__ = [
    "PROJECTION_DTYPES",
    "DampingRule",
    "EigenCorrectedBlock",
    "EigenCorrectedOptimizer",
    "EigenCorrectedConfig",
    "FactorStructure",
    "KroneckerEigen",
    "ProjectionDtype",
    "Scalings",
    "StepFlags",
    "constant_damping",
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


@dataclass(kw_only=True)
class EigenCorrectedConfig(CurvatureConfig):
    """The eigen-corrected methods' options: the shared curvature options plus the scalings'
    estimate (EKFAC and TEKFAC extend it)."""

    scalings: Scalings = option(Scalings.exact, "exact (per-example, the paper) | ra")
    scale_every: int | None = option(
        None, "scalings every k steps (null: on the statistic steps)", schedule=True
    )
    scale_decay: float = option(0.95, "cap of the scalings' EMA old-value weight", ge=0, lt=1)
    projection_dtype: ProjectionDtype = option(
        ProjectionDtype.auto, "projection multiply dtype: auto | float32 | float64 | bfloat16"
    )

#: elements of one chunk of per-example ``m × n`` matrices (bounds the conv path's memory; 2 MB
#: in float32 measured 5-20 % faster than 16 MB on the small CNN's conv layers, 2-core CPU)
CHUNK_ELEMENTS = 1 << 19

#: ``projection_dtype`` choices: the dtype the exact scalings' projections are multiplied in
#: (they are always summed in the factor dtype)
PROJECTION_DTYPES: dict[ProjectionDtype, torch.dtype | None] = {
    ProjectionDtype.auto: None,
    ProjectionDtype.float32: torch.float32,
    ProjectionDtype.float64: torch.float64,
    ProjectionDtype.bfloat16: torch.bfloat16,
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
    try:
        dtype = PROJECTION_DTYPES[ProjectionDtype(choice)]
    except ValueError:
        raise ValueError(
            f"optimizer.projection_dtype must be one of {', '.join(ProjectionDtype)}, "
            f"got {choice!r}"
        ) from None
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


def rows_path_is_cheaper(T: int, m: int, n: int) -> bool:
    """Whether :func:`projected_second_moment` projects the rows (``T·(n² + m² + m·n)``
    multiplies) rather than forming per-example gradients (``T·m·n + m·n·(m + n)``)."""
    return T * (n * n + m * m + m * n) <= T * m * n + m * n * (m + n)


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
        path = "rows" if rows_path_is_cheaper(T, m, n) else "grads"
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


# ----------------------------------------------------------------------------- the block
class FactorStructure(Protocol):
    """The Kronecker-factored statistics ``c · X_A ⊗ X_G`` that an :class:`EigenCorrectedBlock`
    corrects (:class:`~optimizers._kronecker.KroneckerBlock`: ``T·A⊗G``;
    :class:`~optimizers.tkfac.TKFACBlock`: ``δ·Φ⊗Ψ``).  It is a curvature block used for its
    statistics only: it owns the state (``tensors``, ``meta``, ``pending``) that the
    eigen-corrected block adds its basis and scalings to."""

    layer: LayerHelper
    diagonal: bool
    tensors: dict[str, Tensor]
    meta: dict[str, Any]
    pending: PendingStats
    stat_dtype: torch.dtype

    def row_chunks(self, a: Tensor, g: Tensor) -> Iterator[tuple[Tensor, Tensor]]: ...

    def update_factor_stats(self, rows: Tensor, g: Tensor) -> None:
        """Accumulate the factor statistics from input rows ``(N, T, n-1)`` and output rows."""
        ...

    def commit_factor_sums(
        self, sums: dict[str, Tensor], rows: int, examples: int, decay: float
    ) -> None:
        """Fold the batch sums of the factor statistics into the running ones."""
        ...

    def factors(self) -> tuple[Tensor, Tensor, float]:
        """``(X_A, X_G, c)``: input factor (a vector when ``diagonal``), output factor and the
        scalar coefficient."""
        ...

    def stat_keys(self) -> frozenset[str] | None: ...


@dataclass(frozen=True)
class KroneckerEigen:
    """Eigenpairs of a new basis: ``X_G = Q_G diag(d_G) Q_Gᵀ``, ``X_A = Q_A diag(d_A) Q_Aᵀ``
    (``q_a`` is ``None`` for a diagonal input factor) and the coefficient ``c``."""

    d_g: Tensor
    q_g: Tensor
    d_a: Tensor
    q_a: Tensor | None
    coeff: float


#: the damping term ``D`` of a new basis from the damping λ and its eigenpairs (a scalar or an
#: ``m × n`` matrix)
DampingRule = Callable[[float, KroneckerEigen], Tensor | float]


def constant_damping(damping: float, eig: KroneckerEigen) -> Tensor | float:
    """EKFAC's ``D = λ``."""
    return damping


class EigenCorrectedBlock(CurvatureBlock):
    """Eigenvalue-corrected scalings in the eigenbasis of a :class:`FactorStructure`.

    The raw layer input is captured; input rows are built a few examples at a time and feed
    both the factor statistics and the exact scalings' projections.  ``tensors`` adds ``dA``,
    ``QA`` (eigen-pairs of the input factor; no ``QA`` for an embedding), ``dG``, ``QG``, the
    scalings ``s``, the damping term ``damp`` (``D``, scalar or ``m × n``) and
    ``scale = 1/(s + D)`` to the structure's statistics; all state lives in the structure.
    """

    homogeneous_input = False
    raw_input = True
    raw_output = False  # the scalings' projections need the per-example output rows
    #: the scalings are updated by ``commit_stats`` and the basis is read by ``update_stats``,
    #: so under DDP every rank keeps the decomposition (``QA``, ``QG``, ``s``, ``damp``, ``scale``
    #: are decompositions: reset by ``refresh`` on the inverse worker and broadcast; the
    #: per-example sums ``S`` are all-reduced with the factor sums, so every rank then applies
    #: the same scaling updates)
    decomposition_on_every_rank = True

    def __init__(
        self,
        structure: FactorStructure,
        *,
        damping_rule: DampingRule = constant_damping,
        scalings: Scalings | str = Scalings.exact,
        scale_decay: float = 0.95,
        projection_dtype: ProjectionDtype | str = ProjectionDtype.auto,
        flags: StepFlags | None = None,
    ) -> None:
        #: owns the state (see the properties below), so it exists before the base class
        #: initialises that state
        self.structure = structure
        super().__init__(structure.layer)
        self.damping_rule = damping_rule
        # the config classes validate the options for users; the block takes enums or values
        self.scalings = Scalings(scalings)
        self.scale_decay = float(scale_decay)
        self.projection_dtype = ProjectionDtype(projection_dtype)
        self.flags = flags if flags is not None else StepFlags()
        self.m = self.layer.out_dim
        self.n = self.layer.in_dim

    # -- one state, kept by the structure ------------------------------------------------
    @property
    def tensors(self) -> dict[str, Tensor]:
        return self.structure.tensors

    @tensors.setter
    def tensors(self, value: dict[str, Tensor]) -> None:
        self.structure.tensors = value

    @property
    def meta(self) -> dict[str, Any]:
        return self.structure.meta

    @meta.setter
    def meta(self, value: dict[str, Any]) -> None:
        self.structure.meta = value

    @property
    def pending(self) -> PendingStats:
        return self.structure.pending

    @pending.setter
    def pending(self, value: PendingStats) -> None:
        self.structure.pending = value

    @property
    def stat_dtype(self) -> torch.dtype:
        return self.structure.stat_dtype

    @stat_dtype.setter
    def stat_dtype(self, value: torch.dtype) -> None:
        self.structure.stat_dtype = value

    def stat_keys(self) -> frozenset[str] | None:
        return self.structure.stat_keys()

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
        for rows, gi in self.structure.row_chunks(a, g):
            if f.factors:
                self.structure.update_factor_stats(rows, gi)
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
            self.accumulate("S", s)
        else:
            self.accumulate("S", s, rows=g.shape[0] * g.shape[1], examples=g.shape[0])

    def commit_stats(self, decay: float) -> None:
        sums, rows, examples = self.take_pending()
        if any(k != "S" for k in sums):
            self.structure.commit_factor_sums(sums, rows, examples, decay)
            self.meta["examples"] = examples  # the batch size N used by the ``ra`` mode
        if "S" in sums and self.has_basis:
            self.update_scalings(sums["S"] / max(examples, 1))

    # -- basis and scalings -------------------------------------------------------------
    def refresh(self, damping: float) -> bool:
        """Recompute the eigenbasis of the structure's factors, reset the scalings to its
        Kronecker eigenvalues ``c·d_G⊗d_A`` and the damping term by the damping rule."""
        if not all(k in self.tensors for k in self.stat_keys() or ()):
            return True
        xa, xg, coeff = self.structure.factors()
        eg = safe_eigh(xg)
        if eg is None:
            return False
        new = {"dG": eg[0], "QG": eg[1]}
        if self.structure.diagonal:
            d_a, q_a = xa.clamp_min(0), None
        else:
            ea = safe_eigh(xa)
            if ea is None:
                return False
            d_a, q_a = ea
            new["QA"] = q_a
        new["dA"] = d_a
        for k in ("dA", "QA", "dG", "QG"):
            self.tensors.pop(k, None)
        self.tensors.update(new)
        eig = KroneckerEigen(d_g=eg[0], q_g=eg[1], d_a=d_a, q_a=q_a, coeff=coeff)
        self.reset_scalings(coeff * torch.outer(eig.d_g, eig.d_a), self.damping_rule(damping, eig))
        self.ready = True
        return True

    def kronecker_eigenvalues(self) -> Tensor:
        """``c·d_G⊗d_A`` of the current basis (the values the scalings were reset to)."""
        t = self.tensors
        return self.structure.factors()[2] * torch.outer(t["dG"], t["dA"])

    def reset_scalings(self, s0: Tensor, damp: Tensor | float) -> None:
        """Start the scalings of a new basis at ``s0`` with damping term ``damp``."""
        damp_t = torch.as_tensor(damp, dtype=self.dtype, device=s0.device)
        self.tensors["s"] = s0.to(self.dtype).clone()
        self.tensors["damp"] = damp_t.clone()
        self.tensors["scale"] = 1.0 / (self.tensors["s"] + damp_t)
        self.meta["scale_updates"] = 0

    def update_scalings(self, batch: Tensor) -> None:
        """One averaging step ``s ← β_k s + (1-β_k)·batch`` (see the module docstring)."""
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
            self.update_scalings(proj.square() * n_ex)
        proj = proj * t["scale"]
        return qg @ proj if qa is None else qg @ proj @ qa.t()


# ----------------------------------------------------------------------------- the optimizer
class EigenCorrectedOptimizer(CurvatureOptimizer):
    """Base of the eigen-corrected methods: scaling options (:class:`EigenCorrectedConfig`)
    and schedule, per-step flags.

    A method's :meth:`make_block` returns :meth:`corrected` of its factor structure (and its
    damping rule).
    """

    Config: type[CurvatureConfig] = EigenCorrectedConfig
    config: EigenCorrectedConfig

    @property
    def scalings(self) -> Scalings:
        return self.config.scalings

    @property
    def scale_every(self) -> Schedule | None:
        return self.config.scale_every

    @property
    def scale_decay(self) -> float:
        return float(self.config.scale_decay)

    @property
    def projection_dtype(self) -> ProjectionDtype:
        return self.config.projection_dtype

    @functools.cached_property
    def step_flags(self) -> StepFlags:
        """What the current step does (shared by every block)."""
        return StepFlags()

    def corrected(
        self, structure: FactorStructure, damping_rule: DampingRule = constant_damping
    ) -> EigenCorrectedBlock:
        """The eigen-corrected block of ``structure`` with this optimizer's scaling options."""
        return EigenCorrectedBlock(
            structure,
            damping_rule=damping_rule,
            scalings=self.scalings,
            scale_decay=self.scale_decay,
            projection_dtype=self.projection_dtype,
            flags=self.step_flags,
        )

    def is_scale_step(self, step: int) -> bool:
        """Scaling update on ``step`` (default ``scale_every=None``: the statistic steps)."""
        if self.scale_every is None:
            return self.is_stat_step(step)
        return step % freq_at("scale_every", self.scale_every, step) == 0

    def capture_step(self, step: int) -> bool:
        f = self.step_flags
        f.step = step
        f.factors = self.is_stat_step(step)
        f.refresh = self.is_inv_step(step)
        f.scalings = self.is_scale_step(step) and not f.refresh
        return f.factors or (f.scalings and self.scalings == "exact")

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        self.step_flags.stepping = True
        try:
            return super().step(closure)
        finally:
            self.step_flags.stepping = False
