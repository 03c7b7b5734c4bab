"""ngbench optimizers: first-order baselines and natural-gradient-family methods.

A library that stands alone: it never imports ``tasks`` or ``runners``.
``build_optimizer(name_or_cfg, model, **hparams)`` builds any registered one.
"""

from .first_order import build_adamw, build_sgd
from .registry import (
    REGISTRY,
    OptimizerConfigError,
    OptimizerSpec,
    build_optimizer,
    get_spec,
    list_optimizers,
    register,
)

register(
    OptimizerSpec(
        name="sgd",
        factory=build_sgd,
        description="SGD with (Nesterov) momentum and weight decay",
        paper="Polyak 1964; Nesterov 1983",
    )
)
register(
    OptimizerSpec(
        name="adamw",
        factory=build_adamw,
        description="Adam with decoupled weight decay",
        paper="Loshchilov & Hutter, ICLR 2019",
    )
)

# Curvature optimizers register themselves on import: one line per module below.
# --- method modules (keep this marker) ---
from . import ekfac
from . import kfac
from . import mbf
from . import ngplus
from . import shampoo
from . import sngd
from . import soap
from . import tekfac
from . import tkfac

__all__ = [
    "REGISTRY",
    "OptimizerConfigError",
    "OptimizerSpec",
    "build_adamw",
    "build_optimizer",
    "build_sgd",
    "get_spec",
    "list_optimizers",
    "register",
]
