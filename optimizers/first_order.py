"""First-order baselines: SGD (momentum, Nesterov, weight decay) and AdamW.

SGD with momentum: Polyak (1964), Nesterov (1983); AdamW: Loshchilov & Hutter,
"Decoupled Weight Decay Regularization", ICLR 2019.  Both are the ``torch.optim``
implementations with the shared parameter groups (no decay on biases and norms).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ._config import OptimizerConfig, OptimizerConfigError, option
from .param_groups import split_decay_groups

__all__ = ["AdamWConfig", "SGDConfig", "build_adamw", "build_sgd"]


@dataclass(kw_only=True)
class SGDConfig(OptimizerConfig):
    """``torch.optim.SGD``'s options."""

    lr: float = option(0.1, "learning rate", ge=0)
    momentum: float = option(0.9, "heavy-ball momentum", ge=0, lt=1)
    nesterov: bool = option(False, "Nesterov momentum (needs momentum > 0 and dampening = 0)")
    weight_decay: float = option(0.0, "L2 weight decay (not on biases and norms)", ge=0)
    dampening: float = option(0.0, "dampening of the momentum buffer", ge=0)

    def check(self) -> None:
        if self.nesterov and (self.momentum <= 0 or self.dampening != 0):
            raise OptimizerConfigError(
                "optimizer.nesterov=true needs momentum > 0 and dampening = 0"
            )


@dataclass(kw_only=True)
class AdamWConfig(OptimizerConfig):
    """``torch.optim.AdamW``'s options."""

    lr: float = option(1e-3, "learning rate", ge=0)
    beta1: float = option(0.9, "first-moment EMA weight", ge=0, lt=1)
    beta2: float = option(0.999, "second-moment EMA weight", ge=0, lt=1)
    eps: float = option(1e-8, "added to the root of the second moment", gt=0)
    weight_decay: float = option(0.01, "decoupled weight decay (not on biases and norms)", ge=0)


def build_sgd(model: nn.Module, config: SGDConfig | None = None) -> torch.optim.SGD:
    c = config or SGDConfig()
    return torch.optim.SGD(
        split_decay_groups(model, c.weight_decay),
        lr=c.lr,
        momentum=c.momentum,
        nesterov=c.nesterov,
        dampening=c.dampening,
    )


def build_adamw(model: nn.Module, config: AdamWConfig | None = None) -> torch.optim.AdamW:
    c = config or AdamWConfig()
    return torch.optim.AdamW(
        split_decay_groups(model, c.weight_decay), lr=c.lr, betas=(c.beta1, c.beta2), eps=c.eps
    )
