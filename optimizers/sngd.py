"""SNGD: structured natural gradient descent on a "reconstructed" network.

Liu, Boumaraf, Li, Lin, Liu, Niu & Werghi, "Reconstructing Deep Neural Networks: Unleashing the
Optimization Potential of Natural Gradient Descent", arXiv 2412.07441 (reference code
``Chaochao-Lin/SNGD``, TensorFlow, MLP only).  See ALGORITHMS.md §5.

Principle (§5.1): with a fixed SPD local metric ``M`` of a layer, plain (momentum) SGD on the
reparametrized weight ``W' = W M^{1/2}`` (a "local Fisher layer" ``x̃ ↦ M^{-1/2} x̃`` in front of the
layer) moves ``W`` exactly by ``-η ∇W M⁻¹``.  So the method is implemented as the equivalent
preconditioner on ``W`` (row-major ``[W | b]``, one row per output unit); :func:`denman_beavers`
gives ``M^{±1/2}`` for the reconstructed-network view.

Metrics (``x̃`` = input with the constant 1 appended, rows = examples × locations):

* shared input metric ``M = E[x̃ x̃ᵀ]``; ``P = ∇W M⁻¹`` — the first and the last registered layer
  (``first_last_shared=True``, as the released code), every layer with ``mode="input"``, and conv
  layers with ``conv_mode="input"`` (default; unfold patches, KFC-style averaged over locations);
* per output unit ``M_j = E[ψ(h_j) x̃ x̃ᵀ]``, ``P_j = M_j⁻¹ ∇W_j`` — hidden Linear layers with
  ``mode="rfim"`` (default) and, with ``conv_mode="unit"``, conv layers per output channel (costly:
  ``O(N·T·C_out·n²)``).  A layer whose per-unit metrics would exceed ``unit_max_elements``
  numbers (default 2^25, 128 MiB in float32, per copy) uses the shared metric instead (warned).
  ``h = x̃ Wᵀ`` is the layer's own pre-activation, recomputed exactly from the captured input;
  ``ψ(h) = σ(h)²`` (``unit_weight="sigmoid"``: the squared softplus derivative, the
  released code's smooth surrogate for ReLU) or ``ψ ≡ 1`` (``"one"``).  The metrics do not use
  labels or back-propagated gradients;
* Embedding layers: the shared input metric of one-hot inputs, ``diag(token frequencies)``.

Start (``init``):

* ``"first_batch"`` (default) [I]: a metric starts as its first batch value (the EMA's first
  commit replaces nothing), after the warm-up below;
* ``"identity"`` — the released code [C ``Chaochao-Lin/SNGD``, ``MLP.py::__metric``]: every metric
  and its inverse start at ``I`` (per unit ``I``; ``diag``: ones) and the EMA mixes the batch
  metrics into it, so the identity still weighs ``0.995^t`` after ``t`` iterations (61 % at step
  100, 13 % at step 400); no warm-up is needed (the metric has full rank from the start).  Two
  differences remain: here the statistics of a step enter before its update (the released code
  steps with ``I`` at iteration 0 and updates the metric after each step, so its refresh at
  iteration 0 serves iterations 1..100; here it serves steps 0..99), and ``stat_every > 1``
  applies ``stat_decay ** stat_every`` per statistic step (see Schedule below); ``stat_every=1``
  gives the released per-iteration average.

The first-batch start changes the early steps that short benchmarks measure: the released run
spends its first hundreds of steps close to SGD, this default does not.

Warm-up (``rank_warmup=True``, default; ``init="first_batch"`` only): a layer keeps the plain
gradient direction until its metric has averaged at least ``n`` rows (its fan-in + 1), then gets
its first inverse at once (the optimizer refreshes blocks that are not ready on every statistic
step); a metric from fewer rows is singular, and its null space would be amplified by
``1/(ε_rel·tr M)`` on the next batches' gradients.

Damping ``M + (ε_rel·tr M + ε_abs) I`` per metric (``damping`` = ε_rel, default 1e-3;
``damping_abs`` = ε_abs, default 0 as released; the released ε_rel is 1e-4).  Inverses by one
batched Cholesky call per layer every ``inv_every=100`` steps; a failed inverse keeps the
previous one (or the plain gradient before the first success, as the released code falls back to
the identity).

Schedule: the released code updates the metric EMA (0.995) every iteration; per-unit statistics
cost ``O(N·d_out·n²)``, so here they are gathered every ``stat_every=10`` steps by default, and
``stat_decay`` (default 0.995) is the decay **per iteration**: each statistic step applies
``stat_decay ** stat_every`` (0.951 by default) so the averaging horizon in iterations is the
released one (a callable ``stat_every`` uses ``stat_decay`` per statistic step).  Statistics come
from the training forward pass (the released code re-runs the batch after the step in inference
mode).  ``momentum=0`` by default: plain GD on the reconstructed network, as the released run
script (momentum in the ``W'`` coordinates is allowed, but the per-unit metrics do not see the
loss scale and a heavy-ball factor of 10 made small runs diverge); decoupled weight decay as the
rest of the family.  ``lr=0.01`` by default: the released MLP setting 0.1 (and 0.03) diverged
on the small CNN of the benchmark within 75 steps (the shared patch metric of a conv layer is
K-FAC's input side alone, with no output-side scaling); tune it.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from enum import StrEnum, auto

import torch
from torch import Tensor, nn

from ._config import option, redefault
from ._layers import LayerHelper
from ._linalg import safe_inv
from .base import CurvatureBlock, CurvatureConfig, CurvatureOptimizer, Fisher
from .mbf import batched_spd_inverse

__all__ = [
    "ConvMode",
    "Init",
    "Mode",
    "SNGD",
    "SNGDBlock",
    "SNGDConfig",
    "UnitWeight",
    "denman_beavers",
]


class Init(StrEnum):
    """Start of the metrics: ``first_batch`` (the first batch metric after the plain-gradient
    warm-up) or ``identity`` (the released code: metric and inverse start at I)."""

    first_batch = auto()
    identity = auto()


class Mode(StrEnum):
    """``rfim``: per-unit metrics where affordable; ``input``: the shared input metric only."""

    rfim = auto()
    input = auto()


class ConvMode(StrEnum):
    """Conv layers: the shared input metric or per-unit metrics."""

    input = auto()
    unit = auto()


class UnitWeight(StrEnum):
    """Per-unit weight of the input rows: σ'(z)-style ``sigmoid`` or ``one``."""

    sigmoid = auto()
    one = auto()


@dataclass(kw_only=True)
class SNGDConfig(CurvatureConfig):
    """SNGD's options (module docstring); the Fisher is always the empirical one."""

    lr: float = redefault(CurvatureConfig, "lr", 0.01)
    momentum: float = redefault(CurvatureConfig, "momentum", 0.0)
    damping: float = redefault(CurvatureConfig, "damping", 1e-3)
    stat_decay: float = option(0.995, "EMA weight of the OLD metric, per iteration", ge=0, lt=1)
    kl_clip: float | None = redefault(CurvatureConfig, "kl_clip", None)
    fisher: Fisher = option(Fisher.ef, "SNGD always uses ef (training labels)", init=False)
    mode: Mode = option(Mode.rfim, "rfim | input")
    conv_mode: ConvMode = option(ConvMode.input, "input | unit (conv layers)")
    unit_weight: UnitWeight = option(UnitWeight.sigmoid, "sigmoid | one")
    first_last_shared: bool = option(True, "first and last layers use the shared input metric")
    unit_max_elements: int = option(1 << 25, "per-unit metrics above this size: input metric", ge=1)
    rank_warmup: bool = option(True, "pseudo-inverse until the metric has full rank")
    init: Init = option(Init.first_batch, "first_batch | identity (the released code's start)")
    damping_abs: float = option(0.0, "absolute damping added to the relative one", ge=0)

#: elements of the per-row outer products formed at once (bounds the statistics' memory)
_CHUNK_ELEMS = 1 << 22


def denman_beavers(m: Tensor, *, iters: int = 100, tol: float = 1e-12) -> tuple[Tensor, Tensor]:
    """``(M^{1/2}, M^{-1/2})`` of an SPD matrix by the Denman–Beavers iteration (§5.1)."""
    y = m.clone()
    z = torch.eye(m.shape[-1], dtype=m.dtype, device=m.device).expand_as(m).clone()
    for _ in range(iters):
        y_next = 0.5 * (y + torch.linalg.inv(z))
        z = 0.5 * (z + torch.linalg.inv(y))
        done = float((y_next - y).abs().max()) <= tol * float(y_next.abs().max())
        y = y_next
        if done:
            break
    return y, z


class SNGDBlock(CurvatureBlock):
    """Local metric of one layer: ``kind`` is ``"input"``, ``"unit"`` or ``"diag"``."""

    statistic_keys = frozenset({"M"})

    def __init__(
        self,
        layer: LayerHelper,
        *,
        kind: str = "input",
        unit_weight: str = "sigmoid",
        damping_abs: float = 0.0,
        rank_warmup: bool = True,
        init: str = "first_batch",
    ) -> None:
        if kind not in ("input", "unit", "diag"):
            raise ValueError(f"SNGDBlock kind must be input, unit or diag, got {kind!r}")
        super().__init__(layer)
        self.kind = "diag" if layer.diagonal_input else kind
        self.unit_weight = str(UnitWeight(unit_weight))
        self.damping_abs = float(damping_abs)
        self.rank_warmup = bool(rank_warmup)
        self.n = layer.in_dim
        # the shared metric builds its bias row from column sums (no copy of the input)
        self.homogeneous_input = self.kind == "unit"
        if Init(init) == Init.identity:  # the released code: metric and inverse start at I
            self.tensors["M"] = self._identity()
            self.tensors["Minv"] = self._identity()
            self.ready = True

    def _identity(self) -> Tensor:
        """``I`` in this block's metric layout (ones for ``diag``, ``(m, n, n)`` for ``unit``)."""
        if self.kind == "diag":
            return torch.ones(self.n, dtype=self.dtype, device=self.device)
        eye = torch.eye(self.n, dtype=self.dtype, device=self.device)
        if self.kind == "unit":
            return eye.expand(self.layer.out_dim, self.n, self.n).clone()
        return eye

    # -- statistics ---------------------------------------------------------------
    def update_stats(self, a: Tensor, g: Tensor) -> None:
        N = a.shape[0]
        if self.kind == "diag":
            counts = torch.bincount(a.reshape(-1), minlength=self.n).to(self.dtype)
            self.accumulate("M", counts, rows=a.numel(), examples=N)
            return
        rows = a.reshape(-1, a.shape[-1]).to(self.dtype)
        if self.kind == "input":
            self.accumulate("M", self._input_gram(rows), rows=rows.shape[0], examples=N)
            return
        w = self.layer.weight_matrix().to(self.dtype)  # the forward's weights (step not taken)
        psi = torch.sigmoid(rows @ w.t()).pow(2) if self.unit_weight == "sigmoid" else None
        self.accumulate("M", self._unit_gram(rows, psi), rows=rows.shape[0], examples=N)

    def _input_gram(self, x: Tensor) -> Tensor:
        g = x.t() @ x
        if not self.layer.has_bias:
            return g
        s = x.sum(0)
        full = g.new_empty(self.n, self.n)
        full[:-1, :-1] = g
        full[:-1, -1] = s
        full[-1, :-1] = s
        full[-1, -1] = x.shape[0]
        return full

    def _unit_gram(self, x: Tensor, psi: Tensor | None) -> Tensor:
        """``Σ_r ψ_{r,j} x̃_r x̃_rᵀ`` for every unit ``j`` -> ``(m, n, n)``."""
        n, m = self.n, self.layer.out_dim
        if psi is None:  # ψ ≡ 1: every unit has the shared metric
            return (x.t() @ x).expand(m, n, n).clone()
        iu, ju = torch.triu_indices(n, n, device=x.device)
        tri = x.new_zeros(m, iu.numel())
        step = max(1, _CHUNK_ELEMS // max(1, iu.numel()))
        for s in range(0, x.shape[0], step):
            xc = x[s : s + step]
            tri += psi[s : s + step].t() @ (xc[:, iu] * xc[:, ju])
        full = x.new_empty(m, n, n)
        full[:, iu, ju] = tri
        full[:, ju, iu] = tri
        return full

    def commit_stats(self, decay: float) -> None:
        sums, rows, _ = self.take_pending()
        self.ema("M", sums["M"] / max(rows, 1), decay)
        self.meta["rows_seen"] = int(self.meta.get("rows_seen", 0)) + rows

    # -- refresh ------------------------------------------------------------------------
    def refresh_cost(self) -> float:
        if self.kind == "diag":
            return float(self.n)
        units = self.layer.out_dim if self.kind == "unit" else 1
        return float(units * self.n**3)

    def shifts(self, damping: float) -> Tensor:
        """``ε_rel·tr M + ε_abs`` per metric (a scalar tensor, or ``(m,)`` per unit)."""
        M = self.tensors["M"]
        tr = M.sum() if self.kind == "diag" else M.diagonal(dim1=-2, dim2=-1).sum(-1)
        return damping * tr + self.damping_abs

    def damped_metric(self, damping: float) -> Tensor:
        """``M + (ε_rel tr M + ε_abs) I`` (vector for ``diag``, ``(m, n, n)`` for ``unit``)."""
        M, shift = self.tensors["M"], self.shifts(damping)
        if self.kind == "diag":
            return M + shift
        eye = torch.eye(self.n, dtype=M.dtype, device=M.device)
        return M + shift[..., None, None] * eye

    def refresh(self, damping: float) -> bool:
        if "M" not in self.tensors:
            return True
        seen = int(self.meta.get("rows_seen", 0))
        if self.rank_warmup and self.kind != "diag" and seen < self.n and not self.ready:
            return True  # warm-up: plain gradient until the metric can have full rank
        damped = self.damped_metric(damping)
        inv: Tensor | None
        if self.kind == "diag":
            if not bool(torch.isfinite(damped).all()) or bool((damped <= 0).any()):
                return False
            inv = 1.0 / damped
        elif self.kind == "unit":
            inv = batched_spd_inverse(damped)
        else:
            inv = safe_inv(damped)
        if inv is None:
            return False
        self.tensors["Minv"] = inv
        self.ready = True
        return True

    def precondition(self, grad: Tensor) -> Tensor:
        inv = self.tensors["Minv"]
        if self.kind == "diag":
            return grad * inv
        if self.kind == "unit":
            return torch.bmm(inv, grad.unsqueeze(-1)).squeeze(-1)
        return grad @ inv


class SNGD(CurvatureOptimizer):
    """SNGD (see the module docstring); ``stat_decay`` is per iteration."""

    Config = SNGDConfig
    config: SNGDConfig

    def __init__(
        self, model: nn.Module, config: SNGDConfig | None = None, /, **hparams: object
    ) -> None:
        super().__init__(model, config, **hparams)
        c = self.config
        self.stat_decay_per_step = float(c.stat_decay)
        if isinstance(c.stat_every, int):  # the EMA runs on statistic steps only
            self.stat_decay = float(c.stat_decay) ** c.stat_every

    def _kind(self, layer: LayerHelper) -> str:
        order = list(self.layers)  # set by the base class before the blocks are made
        ends = {order[0], order[-1]} if order else set()
        c = self.config
        if c.mode == "input" or (c.first_last_shared and layer.name in ends):
            return "input"
        if layer.kind == "conv2d" and c.conv_mode != "unit":
            return "input"
        size = layer.out_dim * layer.in_dim**2
        if size > c.unit_max_elements:
            warnings.warn(
                f"SNGD: layer {layer.name!r} would need {size} numbers per-unit metrics "
                f"(> optimizer.unit_max_elements={c.unit_max_elements}); it uses the "
                "shared input metric",
                stacklevel=4,
            )
            return "input"
        return "unit"

    def make_block(self, layer: LayerHelper) -> SNGDBlock:
        c = self.config
        return SNGDBlock(
            layer,
            kind=self._kind(layer),
            unit_weight=c.unit_weight,
            damping_abs=c.damping_abs,
            rank_warmup=c.rank_warmup,
            init=str(c.init),
        )
