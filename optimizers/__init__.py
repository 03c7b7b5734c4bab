"""ngbench optimizers: first-order baselines and natural-gradient-family methods.

A library that stands alone: it never imports ``tasks`` or ``runners`` (nor Hydra).
``build_optimizer(name_or_cfg, model, **hparams)`` builds any registered one; every optimizer
also takes its config dataclass (``KFAC(model, KFACConfig(damping=1e-3))``).
"""

from ._config import OptimizerConfig, OptimizerConfigError
from .base import CurvatureConfig
from .capabilities import Instrumented
from .ekfac import EKFAC, EKFACConfig
from .first_order import AdamWConfig, SGDConfig
from .kfac import KFAC, KFACConfig
from .mbf import MBF, MBFConfig
from .ngplus import NGPlus, NGPlusConfig
from .registry import (
    OPTIMIZERS,
    OptimizerSpec,
    build_optimizer,
    config_class,
    get_spec,
    list_optimizers,
    make_config,
)
from .shampoo import Shampoo, ShampooConfig
from .sngd import SNGD, SNGDConfig
from .soap import SOAP, SOAPConfig
from .tekfac import TEKFAC, TEKFACConfig
from .tkfac import TKFAC, TKFACConfig

__all__ = [
    "EKFAC",
    "KFAC",
    "MBF",
    "OPTIMIZERS",
    "SNGD",
    "SOAP",
    "TEKFAC",
    "TKFAC",
    "AdamWConfig",
    "CurvatureConfig",
    "EKFACConfig",
    "Instrumented",
    "KFACConfig",
    "MBFConfig",
    "NGPlus",
    "NGPlusConfig",
    "OptimizerConfig",
    "OptimizerConfigError",
    "OptimizerSpec",
    "SGDConfig",
    "SNGDConfig",
    "SOAPConfig",
    "Shampoo",
    "ShampooConfig",
    "TEKFACConfig",
    "TKFACConfig",
    "build_optimizer",
    "config_class",
    "get_spec",
    "list_optimizers",
    "make_config",
]
