"""SOAP: Adam in the eigenbasis of Shampoo's factors.

Vyas, Morwani, Zhao, Kwun, Shapira, Brandfonbrener, Janson & Kakade, "SOAP: Improving and
Stabilizing Shampoo using Adam", arXiv 2409.11321 (2024).  See ALGORITHMS.md section 7.4.

Per parameter with gradient ``G`` (one factor per dim ``d <= max_precond_dim``; larger dims, and
1-D parameters unless ``precondition_1d``, keep the identity basis):

* first call: factors ``GG_i <- lerp(GG_i, G_(i) G_(i)^T, 1 - shampoo_beta)`` and the basis
  ``Q_i`` from ``eigh`` (eigenvalues descending); no parameter update;
* later calls: ``m <- lerp(m, G, 1 - beta1)`` (kept in the original space, which is the same as
  rotating it with the old basis and re-projecting with the new one), ``v <- beta2 v +
  (1 - beta2) (Q^T G)^2`` (rotated space), direction ``Q [(Q^T m) / (sqrt(v_hat) + eps)]``
  with Adam's bias correction, decoupled weight decay, then the factor update with ``G`` and,
  every ``precondition_frequency`` steps, one power iteration + QR per basis
  (``Q_i <- qr(GG_i Q_i[:, sorted])``), re-ordering ``v`` consistently.

Differences from the reference code, chosen so that SOAP with ``Q = I`` is exactly
``torch.optim.AdamW``: ``eps`` is added after the bias correction of ``sqrt(v)`` and the decoupled
decay is applied before the step (the reference adds eps before, and decays after).

Dimension merging (``merge_dims=True``; off by default, as in the reference).  ``merge_from``
chooses the rule:

* ``"front"`` (default) — the reference's rule [C ``nikhilvyas/SOAP``, ``soap.py::merge_dims``]:
  walk the dims from the first, multiply them into a running product while it stays
  ``<= max_precond_dim``, and start a new merged dim when it would not (a dim that alone exceeds
  the bound stays on its own).  A ``(64, 32, 3, 3)`` conv weight at ``max_precond_dim=10000``
  becomes ``(6144, 3)``;
* ``"back"`` — Distributed Shampoo's rule (:func:`optimizers.shampoo.merge_dims`: squeeze size-1
  dims, merge from the last dim) [C ``facebookresearch/optimizers``], which this module used
  before ``merge_from`` existed [I]: the same weight becomes ``(64, 288)``.

The two give different factors (and so different bases) for every tensor of order 3 or more that
has mergeable dims; ``"back"`` keeps the output-channel mode of a conv weight on its own.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from enum import StrEnum, auto
from typing import Any

import torch
from torch import nn

from ._config import OptimizerConfig, option
from .param_groups import split_decay_groups
from .shampoo import merge_dims as _merge

__all__ = ["MERGE_FROM", "SOAP", "MergeFrom", "SOAPConfig", "build_soap", "merge_dims_front"]


class MergeFrom(StrEnum):
    """``merge_dims``: ``front`` merges greedily from the first dim (the SOAP reference),
    ``back`` from the last (Distributed Shampoo's rule; this project's former behaviour)."""

    front = auto()
    back = auto()


MERGE_FROM = tuple(MergeFrom)


@dataclass(kw_only=True)
class SOAPConfig(OptimizerConfig):
    """SOAP's options (the reference code's defaults)."""

    lr: float = option(3e-3, "learning rate", ge=0)
    beta1: float = option(0.95, "first-moment EMA weight", ge=0, lt=1)
    beta2: float = option(0.95, "second-moment EMA weight (in the eigenbasis)", ge=0, lt=1)
    shampoo_beta: float | None = option(None, "factor EMA weight (null: beta2)", ge=0, lt=1)
    eps: float = option(1e-8, "added to the root of the second moment", gt=0)
    weight_decay: float = option(0.01, "decoupled weight decay (not on biases and norms)", ge=0)
    precondition_frequency: int = option(10, "eigenbasis refreshed every f steps", ge=1)
    max_precond_dim: int = option(10000, "dims above this size get no factor", ge=1)
    merge_dims: bool = option(False, "merge adjacent dims up to max_precond_dim")
    merge_from: MergeFrom = option(MergeFrom.front, "merge_dims order: front | back")
    precondition_1d: bool = option(False, "1-D params get a factor too")
    correct_bias: bool = option(True, "Adam bias correction")


_NONE = torch.empty(0)


def merge_dims_front(shape: tuple[int, ...] | torch.Size, max_dim: int) -> tuple[int, ...]:
    """The reference SOAP's merge: greedy from the first dim (see the module docstring).

    ``(64, 32, 3, 3)`` at ``max_dim=10000`` gives ``(6144, 3)``; size-1 dims vanish into a
    neighbour; an all-ones or empty shape gives ``(1,)``.
    """
    merged: list[int] = []
    run = 1
    for d in (int(x) for x in shape):
        if run * d <= max_dim:
            run *= d
        elif run > 1:  # close the running product; d starts the next one
            merged.append(run)
            run = d
        else:  # nothing accumulated and d alone is too large: d stays on its own
            merged.append(d)
    if run > 1 or not merged:
        merged.append(run)
    return tuple(merged)


def _eigenbasis(gg: torch.Tensor) -> torch.Tensor:
    """Eigenvectors of the symmetric ``gg``, by descending eigenvalue (float64 retry)."""
    try:
        eye = torch.eye(gg.shape[0], dtype=gg.dtype, device=gg.device)
        _, q = torch.linalg.eigh(gg + 1e-30 * eye)
    except (RuntimeError, torch.linalg.LinAlgError):
        _, q = torch.linalg.eigh(gg.double())
        q = q.to(gg.dtype)
    flipped: torch.Tensor = q.flip(-1)
    return flipped


def _refresh_basis(
    gg: torch.Tensor, q: torch.Tensor, exp_avg_sq: torch.Tensor, dim: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """One power iteration + QR from the current basis; ``exp_avg_sq`` re-sorted along ``dim``."""
    est = torch.diagonal(q.T @ gg @ q)
    order = torch.argsort(est, descending=True)
    q_new, _ = torch.linalg.qr(gg @ q[:, order])
    return q_new, exp_avg_sq.index_select(dim, order)


def _project(x: torch.Tensor, bases: list[torch.Tensor], back: bool = False) -> torch.Tensor:
    """``Q^T x`` (or ``Q x`` when ``back``) along every mode; empty bases are identities."""
    for q in bases:
        if q.numel():
            x = torch.tensordot(x, q, dims=([0], [1 if back else 0]))
        else:
            x = x.movedim(0, -1)
    return x


class SOAP(torch.optim.Optimizer):
    """Adam run in Shampoo's eigenbasis (shape-based; no hooks)."""

    def __init__(self, params: Any, config: SOAPConfig | None = None, /, **hparams: Any) -> None:
        self.config = SOAPConfig.build(config, hparams)
        super().__init__(params, self.config.to_dict())
        self._times = {"statistics": 0.0, "inverse": 0.0, "precondition": 0.0}

    def phase_times(self) -> dict[str, float]:
        """Cumulative seconds: statistics (factors), inverse (eigh/QR), precondition (rest)."""
        return dict(self._times)

    def refresh_period(self) -> int:
        """Steps between eigenbasis refreshes (the largest ``precondition_frequency``)."""
        return max(int(g["precondition_frequency"]) for g in self.param_groups)

    def memory_usage(self) -> dict[str, int]:
        """Bytes of factors, bases and Adam moments, and their ``total``."""
        out = {"factors": 0, "roots": 0, "moments": 0}
        for st in self.state.values():
            out["factors"] += sum(t.numel() * t.element_size() for t in st.get("GG", []))
            out["roots"] += sum(t.numel() * t.element_size() for t in st.get("Q", []))
            for key in ("exp_avg", "exp_avg_sq"):
                if key in st:
                    out["moments"] += st[key].numel() * st[key].element_size()
        out["total"] = sum(out.values())
        return out

    @staticmethod
    def _shape(p: torch.Tensor, group: dict[str, Any]) -> tuple[int, ...]:
        if group["merge_dims"]:
            if group.get("merge_from", "front") == "back":
                return _merge(p.shape, group["max_precond_dim"])
            return merge_dims_front(p.shape, group["max_precond_dim"])
        return tuple(p.shape) or (1,)

    def _update_factors(self, st: dict[str, Any], g: torch.Tensor, beta: float) -> None:
        for i, gg in enumerate(st["GG"]):
            if gg.numel():
                others = [j for j in range(g.ndim) if j != i]
                gg.lerp_(torch.tensordot(g, g, dims=(others, others)), 1.0 - beta)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # noqa: D102
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            sbeta = group["shampoo_beta"] if group["shampoo_beta"] is not None else group["beta2"]
            b1, b2, freq = group["beta1"], group["beta2"], group["precondition_frequency"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                shape = self._shape(p, group)
                g = p.grad.reshape(shape)
                st = self.state[p]
                t0 = time.perf_counter()
                if "Q" not in st:  # first call: statistics and basis only
                    rotate = p.ndim > 1 or group["precondition_1d"]
                    st["step"] = 0
                    st["exp_avg"] = torch.zeros_like(g)
                    st["exp_avg_sq"] = torch.zeros_like(g)
                    st["GG"] = [
                        torch.zeros(d, d, dtype=p.dtype, device=p.device)
                        if rotate and d <= group["max_precond_dim"]
                        else _NONE.to(p)
                        for d in shape
                    ]
                    self._update_factors(st, g, sbeta)
                    t1 = time.perf_counter()
                    st["Q"] = [_eigenbasis(gg) if gg.numel() else _NONE.to(p) for gg in st["GG"]]
                    self._times["statistics"] += t1 - t0
                    self._times["inverse"] += time.perf_counter() - t1
                    continue
                st["step"] += 1
                t = st["step"]
                gp = _project(g, st["Q"])
                st["exp_avg"].lerp_(g, 1.0 - b1)
                st["exp_avg_sq"].mul_(b2).addcmul_(gp, gp, value=1.0 - b2)
                step_size, denom = group["lr"], st["exp_avg_sq"].sqrt()
                if group["correct_bias"]:
                    step_size /= 1.0 - b1**t
                    denom.div_(math.sqrt(1.0 - b2**t))
                direction = _project(
                    _project(st["exp_avg"], st["Q"]) / denom.add_(group["eps"]), st["Q"], back=True
                )
                if group["weight_decay"] > 0:
                    p.mul_(1.0 - group["lr"] * group["weight_decay"])
                p.add_(direction.reshape(p.shape), alpha=-step_size)
                t1 = time.perf_counter()
                self._update_factors(st, g, sbeta)
                t2 = time.perf_counter()
                if t % freq == 0:
                    for i, gg in enumerate(st["GG"]):
                        if gg.numel():
                            st["Q"][i], st["exp_avg_sq"] = _refresh_basis(
                                gg, st["Q"][i], st["exp_avg_sq"], i
                            )
                t3 = time.perf_counter()
                self._times["precondition"] += t1 - t0
                self._times["statistics"] += t2 - t1
                self._times["inverse"] += t3 - t2
        return loss


def build_soap(model: nn.Module, config: SOAPConfig | None = None) -> SOAP:
    """SOAP over ``model``'s parameters (no weight decay on biases and norms)."""
    c = config or SOAPConfig()
    return SOAP(split_decay_groups(model, c.weight_decay), c)
