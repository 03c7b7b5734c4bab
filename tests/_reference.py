"""Dense references from ``torch.func`` shared by the optimizer tests (imported as
``_reference``: pytest puts ``tests/`` on ``sys.path``)."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

Loss = Callable[[Tensor, Tensor], Tensor]


def per_example_grads(
    model: nn.Module, x: Tensor, y: Tensor, loss: Loss = F.cross_entropy
) -> dict[str, Tensor]:
    """``{parameter name: (N, *shape)}`` gradients of ``loss`` of each example alone; runs on
    a copy without forward hooks, so an optimizer's capture hooks never see these calls."""
    model = copy.deepcopy(model)
    for mod in model.modules():
        mod._forward_hooks.clear()
    params = {k: v.detach() for k, v in model.named_parameters()}

    def one(p: dict[str, Tensor], xi: Tensor, yi: Tensor) -> Tensor:
        return loss(functional_call(model, p, (xi.unsqueeze(0),)), yi.unsqueeze(0))

    return vmap(grad(one), in_dims=(None, 0, 0))(params, x, y)


def per_example_matrices(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    loss: Loss = F.cross_entropy,
    layers: Sequence[str] | None = None,
) -> dict[str, Tensor]:
    """``{layer: (N, m, n)}`` per-example gradients in the homogeneous ``[W | b]`` layout of the
    named ``layers`` (default: every Linear and Conv2d)."""
    if layers is None:
        layers = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    g = per_example_grads(model, x, y, loss)
    out = {}
    for name in layers:
        pre = f"{name}." if name else ""
        w = g[pre + "weight"].reshape(x.shape[0], g[pre + "weight"].shape[1], -1)
        if pre + "bias" in g:
            w = torch.cat([w, g[pre + "bias"].unsqueeze(-1)], dim=-1)
        out[name] = w
    return out


def dense_ef(pe: Tensor) -> Tensor:
    """Empirical Fisher ``E_n[vec(G_n) vec(G_n)ᵀ]`` (row-major) of ``(N, m, n)`` matrices."""
    v = pe.reshape(pe.shape[0], -1)
    return v.T @ v / pe.shape[0]
