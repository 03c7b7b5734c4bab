"""Learning-rate schedules as multipliers of the base LR, for ``torch.optim.lr_scheduler.LambdaLR``
(which works on every registered optimizer, curvature ones included)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where a scheduler is built (cheap `ngbench --help`)
    import torch

SCHEDULES = ("constant", "cosine", "linear", "warmup_cosine", "inv_sqrt")


def lr_multiplier(
    name: str, *, total_steps: int, warmup_steps: int = 0, min_ratio: float = 0.0
) -> Callable[[int], float]:
    if name not in SCHEDULES:
        raise ValueError(
            f"train.schedule={name!r} is not valid; valid choices: " + ", ".join(SCHEDULES)
        )
    total = max(1, total_steps)
    warm = max(0, warmup_steps)

    def f(step: int) -> float:
        if warm and step < warm and name != "constant":
            return (step + 1) / warm
        if name == "constant":
            return 1.0
        if name == "inv_sqrt":
            return math.sqrt(max(warm, 1) / max(step + 1, 1)) if warm else 1 / math.sqrt(step + 1)
        frac = min(1.0, (step - warm) / max(1, total - warm))
        if name == "linear":
            return min_ratio + (1 - min_ratio) * (1 - frac)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * frac))

    return f


def build_scheduler(
    opt: torch.optim.Optimizer, name: str, *, total_steps: int, warmup_steps: int, min_ratio: float
) -> torch.optim.lr_scheduler.LambdaLR:
    import torch

    return torch.optim.lr_scheduler.LambdaLR(
        opt,
        lr_multiplier(
            name, total_steps=total_steps, warmup_steps=warmup_steps, min_ratio=min_ratio
        ),
    )
