"""NG+: the multi-step matrix-product natural gradient.

Yang, Xu, Cui, Wen & Xu, "NG+: A Multi-Step Matrix-Product Natural Gradient Method for Deep
Learning", arXiv 2106.07454; journal version "An Efficient Fisher Matrix Approximation Method for
Large-Scale Neural Network Optimization", IEEE TPAMI 2022
(reference code ``yangorwell/NGPlus``).  See ALGORITHMS.md §4.

Per layer with gradient matrix ``W`` (``m × n``, bias column last) the generalized Fisher
information matrix (GFIM) is the ``m × m`` matrix ``F = (1/N) Σ_n G_n G_nᵀ`` of the per-example
gradient matrices ``G_n`` (empirical Fisher: training labels; ``fisher="mc"`` uses sampled
labels).  The direction is ``D = (F + δ I)⁻¹ ∇W`` (left preconditioning only, i.e. ``I ⊗ F``),
followed by SGD with momentum and decoupled weight decay on the preconditioned direction (§0.6).

How the statistics are formed:

* Linear (one location per example): ``G_n G_nᵀ = ‖ā_n‖² g_n g_nᵀ``, so ``F = UᵀU`` with rows
  ``u_n = ‖ā_n‖ g_n / √N`` (``O(N m²)``, no per-example matrices).
* Conv2d / Linear on sequences: per-example ``G_n = Σ_t g_{n,t} ā_{n,t}ᵀ`` via ``bmm`` (chunked
  over examples), or via the location kernel ``Σ_n g_nᵀ (ā_n ā_nᵀ) g_n`` when that is cheaper.
  Conv layers are further scaled by ``conv_scale``: ``"sqrt_t"`` (default) divides by ``√T`` as
  the reference code does (unexplained there), ``"t"`` by ``T``, ``"none"`` not at all.
* Embedding: ``G_n G_nᵀ = g_nᵀ K_n g_n`` with ``K_n[t, t'] = [id_t = id_t']``.

Choices (uncertain details of ALGORITHMS.md §4 are options; the default is named):

* ``curvature_momentum`` α **weights the new statistic**, as in the reference:
  ``F ← (1-α) F + α F_batch`` (first value: the batch GFIM).  Default 0.9 (the ImageNet command;
  the reference's argparse default is 0.1).
* ``sqrt_damping=True`` (default, as the reference): the diagonal shift is ``δ = √μ`` for
  ``damping = μ``; ``False`` adds ``μ`` itself.
* Multi-step: statistics and inverse every ``stat_every = inv_every = 100`` steps by default
  (small problems); the preconditioner is frozen in between.  ``configs/optimizer/
  ngplus_resnet50.yaml`` holds the ImageNet preset of §4.4 (1000/1000).
* Damping schedule ``μ_k = μ · r^(k / damping_decay_every)`` (``r = damping_decay_rate``, k = step,
  fractional exponent as the reference's per-iteration ``adjust_param``); ``r = 1`` (default)
  disables it.  The scale multiplies the param-group ``damping`` (so an external schedule of
  ``group["damping"]`` still works); it takes effect at the next refresh.
* ``smw`` (§4.5): ``"auto"`` (default) uses the Sherman–Morrison–Woodbury path for a Linear
  layer whose GFIM factor ``U`` (``m × k``, k = N for one location per example, else N·n) is
  thinner than ``m`` on its first statistic batch; ``"always"`` for every Linear layer;
  ``"never"`` for none.  SMW layers use a **snapshot** GFIM of the latest statistic batch (no EMA:
  an EMA would raise the rank) and ``(UUᵀ + δI)⁻¹V = (V − U (δI + UᵀU)⁻¹ UᵀV) / δ``.  Conv and
  embedding layers always use the dense ``m × m`` inverse.  Under ``torch.distributed`` with
  more than one rank SMW is disabled (the snapshot ``U`` is rank-local and cannot be averaged).
* ``kl_clip=None`` by default: the reference has no KL clip.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum, auto

import torch
from torch import Tensor, nn

from ._config import option, redefault
from ._layers import LayerHelper
from ._linalg import safe_inv
from .base import CurvatureBlock, CurvatureConfig, CurvatureOptimizer

__all__ = ["ConvScale", "NGPlus", "NGPlusBlock", "NGPlusConfig", "SMWMode"]


class SMWMode(StrEnum):
    """When a Linear layer uses the Sherman–Morrison–Woodbury path (module docstring)."""

    auto = "auto"
    never = "never"
    always = "always"


class ConvScale(StrEnum):
    """Conv statistics divided by ``√T`` (the reference), ``T``, or not at all."""

    sqrt_t = auto()
    t = auto()
    none = auto()


@dataclass(kw_only=True)
class NGPlusConfig(CurvatureConfig):
    """NG+'s options (module docstring); ``stat_decay`` is derived: ``1 - curvature_momentum``."""

    damping: float = redefault(CurvatureConfig, "damping", 0.35)
    stat_every: int = redefault(CurvatureConfig, "stat_every", 100)
    kl_clip: float | None = redefault(CurvatureConfig, "kl_clip", None)
    stat_decay: float = option(
        0.1, "NG+ takes curvature_momentum (the weight of the NEW statistic); "
        "stat_decay = 1 - curvature_momentum", init=False,
    )
    curvature_momentum: float = option(0.9, "EMA weight of the NEW statistic", gt=0, le=1)
    sqrt_damping: bool = option(True, "diagonal shift √damping (the reference) instead of damping")
    conv_scale: ConvScale = option(ConvScale.sqrt_t, "conv statistics: sqrt_t | t | none")
    smw: SMWMode = option(SMWMode.auto, "Sherman–Morrison–Woodbury: auto | never | always")
    damping_decay_rate: float = option(1.0, "damping × rate^(step / every) (1: off)", gt=0, le=1)
    damping_decay_every: int = option(1000, "steps per damping decay factor", ge=1)

    def check(self) -> None:
        super().check()
        self.stat_decay = 1.0 - self.curvature_momentum

#: elements of per-example gradient matrices formed at once (bounds the statistics' memory)
_CHUNK_ELEMS = 1 << 22


def _distributed_world() -> int:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


class NGPlusBlock(CurvatureBlock):
    """GFIM ``F`` (``m × m``) of one layer; dense inverse or snapshot SMW (module docstring)."""

    statistic_keys = frozenset({"F", "U"})

    def __init__(
        self,
        layer: LayerHelper,
        *,
        sqrt_damping: bool = True,
        conv_scale: str = "sqrt_t",
        smw: str = "auto",
        damping_scale: Callable[[], float] | None = None,
    ) -> None:
        super().__init__(layer)
        self.m, self.n = layer.out_dim, layer.in_dim
        self.sqrt_damping = bool(sqrt_damping)
        self.conv_scale = str(ConvScale(conv_scale))
        self.smw_mode = str(SMWMode(smw))
        self.damping_scale = damping_scale or (lambda: 1.0)
        self._pending_u: list[Tensor] = []

    # -- statistics ---------------------------------------------------------------
    @property
    def uses_smw(self) -> bool:
        return bool(self.meta.get("smw", False))

    def _decide_smw(self, k: int) -> bool:
        if "smw" not in self.meta:
            ok = self.layer.kind == "linear" and self.smw_mode != "never"
            if ok and _distributed_world() > 1:
                ok = False
                if self.smw_mode == "always":
                    warnings.warn(
                        "optimizer.smw='always' is ignored under torch.distributed (the snapshot "
                        "U is rank-local); using the dense GFIM inverse",
                        RuntimeWarning,
                        stacklevel=4,
                    )
            if ok and self.smw_mode == "auto":
                ok = k < self.m
            self.meta["smw"] = ok
        return self.uses_smw

    def _location_scale(self, T: int) -> float:
        if self.layer.kind != "conv2d" or self.conv_scale == "none":
            return 1.0
        return 1.0 / (math.sqrt(T) if self.conv_scale == "sqrt_t" else T)

    def update_stats(self, a: Tensor, g: Tensor) -> None:
        N, T = g.shape[0], g.shape[1]
        g = g.to(self.dtype)
        if self.layer.diagonal_input:
            self.accumulate("F", _embedding_gram(a, g), rows=N * T, examples=N)
            return
        a = a.to(self.dtype)
        k = N if T == 1 else N * self.n
        if self._decide_smw(k):
            if T == 1:
                u = (g[:, 0, :] * a[:, 0, :].norm(dim=1, keepdim=True)).t()  # (m, N)
            else:
                u = torch.bmm(g.transpose(1, 2), a).permute(1, 0, 2).reshape(self.m, -1)
            self._pending_u.append(u)
            self.accumulate("N", g.new_tensor(float(N)), rows=N * T, examples=N)
            return
        if T == 1:
            u = g[:, 0, :] * a[:, 0, :].norm(dim=1, keepdim=True)
            gram = u.t() @ u
        else:
            gram = _per_example_gram(a, g) * self._location_scale(T)
        self.accumulate("F", gram, rows=N * T, examples=N)

    def commit_stats(self, decay: float) -> None:
        sums, _, examples = self.take_pending()
        if self.uses_smw:
            u = torch.cat(self._pending_u, dim=1) / math.sqrt(max(examples, 1))
            self._pending_u = []
            self.tensors["U"] = u
            return
        self.ema("F", sums["F"] / max(examples, 1), decay)

    def discard_pending(self) -> None:
        super().discard_pending()
        self._pending_u = []

    # -- refresh ------------------------------------------------------------------------
    def refresh_cost(self) -> float:
        u = self.tensors.get("U")
        return float(u.shape[1] ** 3 if self.uses_smw and u is not None else self.m**3)

    def shift(self, damping: float) -> float:
        """The diagonal shift δ added to the GFIM for param-group ``damping`` (schedule incl.)."""
        mu = damping * float(self.damping_scale())
        return math.sqrt(mu) if self.sqrt_damping else mu

    def refresh(self, damping: float) -> bool:
        delta = self.shift(damping)
        if self.uses_smw:
            if "U" not in self.tensors:
                return True
            u = self.tensors["U"]
            eye = torch.eye(u.shape[1], dtype=u.dtype, device=u.device)
            k = safe_inv(u.t() @ u + delta * eye)
            if k is None:
                return False
            self.tensors["K"] = k
        else:
            if "F" not in self.tensors:
                return True
            f = self.tensors["F"]
            inv = safe_inv(f + delta * torch.eye(self.m, dtype=f.dtype, device=f.device))
            if inv is None:
                return False
            self.tensors["inv"] = inv
        self.tensors["shift"] = torch.tensor(delta, dtype=self.dtype, device=self.device)
        self.ready = True
        return True

    def precondition(self, grad: Tensor) -> Tensor:
        t = self.tensors
        if self.uses_smw:
            u = t["U"]
            return (grad - u @ (t["K"] @ (u.t() @ grad))) / t["shift"]
        return t["inv"] @ grad

    def damped_dense(self) -> Tensor:
        """``F + δI`` (``m × m``) that the current preconditioner inverts (tests only)."""
        delta = float(self.tensors["shift"])
        f = self.tensors["U"] @ self.tensors["U"].t() if self.uses_smw else self.tensors["F"]
        return f + delta * torch.eye(self.m, dtype=f.dtype, device=f.device)


def direct_gram_is_cheaper(T: int, m: int, n: int) -> bool:
    """Whether :func:`_per_example_gram` forms each ``G_n`` (``T·m·n + m²·n`` per example)
    rather than the location kernel ``g_nᵀ (ā_n ā_nᵀ) g_n`` (``T²·n + T²·m + T·m²``)."""
    return T * m * n + m * m * n <= T * T * n + T * T * m + T * m * m


def _per_example_gram(a: Tensor, g: Tensor) -> Tensor:
    """``Σ_n G_n G_nᵀ`` with ``G_n = g_nᵀ a_n`` for ``a (N,T,n)``, ``g (N,T,m)``."""
    N, T, n = a.shape
    m = g.shape[-1]
    out = g.new_zeros(m, m)
    if direct_gram_is_cheaper(T, m, n):
        step = max(1, _CHUNK_ELEMS // max(1, m * n))
        for s in range(0, N, step):
            gn = torch.bmm(g[s : s + step].transpose(1, 2), a[s : s + step])  # (c, m, n)
            dw = gn.permute(1, 0, 2).reshape(m, -1)
            out += dw @ dw.t()
    else:
        step = max(1, _CHUNK_ELEMS // max(1, T * max(T, m)))
        for s in range(0, N, step):
            ac, gc = a[s : s + step], g[s : s + step]
            kg = torch.bmm(torch.bmm(ac, ac.transpose(1, 2)), gc)  # (c, T, m)
            out += torch.einsum("ntm,ntk->mk", gc, kg)
    return out


def _embedding_gram(idx: Tensor, g: Tensor) -> Tensor:
    """``Σ_n G_n G_nᵀ`` for an embedding: ``G_n = Σ_t g_{n,t} e_{id_{n,t}}ᵀ``."""
    N, T, m = g.shape
    if T == 1:
        return g[:, 0, :].t() @ g[:, 0, :]
    out = g.new_zeros(m, m)
    step = max(1, _CHUNK_ELEMS // max(1, T * max(T, m)))
    for s in range(0, N, step):
        ic, gc = idx[s : s + step], g[s : s + step]
        same = (ic.unsqueeze(2) == ic.unsqueeze(1)).to(g.dtype)  # (c, T, T)
        out += torch.einsum("ntm,ntk->mk", gc, torch.bmm(same, gc))
    return out


class NGPlus(CurvatureOptimizer):
    """NG+ (see the module docstring); ``stat_decay`` is derived from ``curvature_momentum``."""

    Config = NGPlusConfig
    config: NGPlusConfig

    def __init__(
        self, model: nn.Module, config: NGPlusConfig | None = None, /, **hparams: object
    ) -> None:
        c = NGPlusConfig.build(config, hparams)
        self.damping_decay_rate = float(c.damping_decay_rate)
        self.damping_decay_every = c.damping_decay_every
        super().__init__(model, c)

    def damping_scale(self) -> float:
        """``r^(k / damping_decay_every)`` at the current step ``k``."""
        if self.damping_decay_rate == 1.0:
            return 1.0
        return float(self.damping_decay_rate ** (self.steps_taken / self.damping_decay_every))

    def make_block(self, layer: LayerHelper) -> NGPlusBlock:
        return NGPlusBlock(
            layer,
            sqrt_damping=self.config.sqrt_damping,
            conv_scale=self.config.conv_scale,
            smw=self.config.smw,
            damping_scale=self.damping_scale,
        )
