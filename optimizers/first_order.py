"""First-order baselines: SGD (momentum, Nesterov, weight decay) and AdamW.

SGD with momentum: Polyak (1964), Nesterov (1983); AdamW: Loshchilov & Hutter,
"Decoupled Weight Decay Regularization", ICLR 2019.  Both are the ``torch.optim``
implementations with the shared parameter groups (no decay on biases and norms).
"""

from __future__ import annotations

import torch
from torch import nn

from .param_groups import split_decay_groups


def build_sgd(
    model: nn.Module,
    *,
    lr: float = 0.1,
    momentum: float = 0.9,
    nesterov: bool = False,
    weight_decay: float = 0.0,
    dampening: float = 0.0,
) -> torch.optim.SGD:
    if momentum < 0:
        raise ValueError(f"optimizer.momentum must be >= 0, got {momentum}")
    if nesterov and (momentum <= 0 or dampening != 0):
        raise ValueError("optimizer.nesterov=true needs momentum > 0 and dampening = 0")
    return torch.optim.SGD(
        split_decay_groups(model, weight_decay),
        lr=lr,
        momentum=momentum,
        nesterov=nesterov,
        dampening=dampening,
    )


def build_adamw(
    model: nn.Module,
    *,
    lr: float = 1e-3,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.01,
) -> torch.optim.AdamW:
    if not (0 <= beta1 < 1 and 0 <= beta2 < 1):
        raise ValueError(f"optimizer.beta1/beta2 must be in [0, 1), got {beta1}, {beta2}")
    if eps <= 0:
        raise ValueError(f"optimizer.eps must be > 0, got {eps}")
    return torch.optim.AdamW(
        split_decay_groups(model, weight_decay), lr=lr, betas=(beta1, beta2), eps=eps
    )
