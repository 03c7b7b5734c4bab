"""Optimizer registry: one table of stable names mapped to frozen specs.

The stable key is also the config file name under ``configs/optimizer/``, the run-folder
component, the W&B tag and the table row label.  A spec names the optimizer class, its config
dataclass (the single source of each hyperparameter's name, type, default, range and doc) and
its capability flags; the training loop branches on those flags and on
:class:`optimizers.capabilities.Instrumented`, never on optimizer names.

Adding an optimizer: its module (the class and its ``Config`` dataclass) and one line in
:data:`OPTIMIZERS` below.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn

from . import ekfac, first_order, kfac, mbf, ngplus, shampoo, sngd, soap, tekfac, tkfac
from ._config import OptimizerConfig, OptimizerConfigError
from .capabilities import Instrumented

__all__ = [
    "OPTIMIZERS",
    "OptimizerConfigError",
    "OptimizerSpec",
    "build_optimizer",
    "config_class",
    "get_spec",
    "list_optimizers",
    "make_config",
]


@dataclass(frozen=True)
class OptimizerSpec:
    """What the harness needs to know about one optimizer."""

    name: str
    #: the optimizer class (``torch.optim.Optimizer`` subclass)
    cls: type[torch.optim.Optimizer]
    #: its config dataclass
    config: type[OptimizerConfig]
    description: str
    paper: str = ""
    #: the optimizer registers hooks on the model (curvature methods)
    needs_model: bool = False
    #: can build its statistics from an extra backward with sampled labels (MC Fisher)
    sampled_fisher: bool = False
    #: ``build(model, config)``; default ``cls(model, config)``
    build: Callable[[nn.Module, Any], torch.optim.Optimizer] | None = None

    @property
    def curvature(self) -> bool:
        """Second-order method that reports phase times, memory and its refresh period."""
        return issubclass(self.cls, Instrumented)

    @property
    def hparams(self) -> tuple[str, ...]:
        """The hyperparameter names (the config's user-settable fields)."""
        return self.config.keys()

    def make(self, model: nn.Module, config: OptimizerConfig) -> torch.optim.Optimizer:
        """The optimizer for ``model`` with the validated ``config``."""
        build = self.build or cast(Callable[[nn.Module, Any], torch.optim.Optimizer], self.cls)
        return build(model, config)


# fmt: off
OPTIMIZERS: dict[str, OptimizerSpec] = {s.name: s for s in (
    OptimizerSpec("sgd", torch.optim.SGD, first_order.SGDConfig,
                  "SGD with (Nesterov) momentum and weight decay",
                  "Polyak 1964; Nesterov 1983", build=first_order.build_sgd),
    OptimizerSpec("adamw", torch.optim.AdamW, first_order.AdamWConfig,
                  "Adam with decoupled weight decay",
                  "Loshchilov & Hutter, ICLR 2019", build=first_order.build_adamw),
    OptimizerSpec("kfac", kfac.KFAC, kfac.KFACConfig,
                  "K-FAC/KFC: Kronecker-factored natural gradient (eigen damping, KL clip)",
                  "Martens & Grosse, ICML 2015; Grosse & Martens, ICML 2016",
                  needs_model=True, sampled_fisher=True),
    OptimizerSpec("ekfac", ekfac.EKFAC, ekfac.EKFACConfig,
                  "EKFAC: K-FAC eigenbasis with per-example corrected eigenvalues",
                  "George, Laurent, Bouthillier, Ballas & Vincent, NeurIPS 2018",
                  needs_model=True, sampled_fisher=True),
    OptimizerSpec("tkfac", tkfac.TKFAC, tkfac.TKFACConfig,
                  "TKFAC: trace-restricted Kronecker factorization δ·Φ⊗Ψ (re-implementation)",
                  "Gao et al., AAAI 2021 (arXiv 2011.10741)",
                  needs_model=True, sampled_fisher=True),
    OptimizerSpec("tekfac", tekfac.TEKFAC, tekfac.TEKFACConfig,
                  "TEKFAC: TKFAC eigenbasis with corrected eigenvalues (re-implementation)",
                  "Gao et al., arXiv 2011.13609",
                  needs_model=True, sampled_fisher=True),
    OptimizerSpec("ngplus", ngplus.NGPlus, ngplus.NGPlusConfig,
                  "NG+: per-layer m×m GFIM (matrix-product Fisher), multi-step frozen inverse",
                  "Yang, Xu, Cui, Wen & Xu, arXiv 2106.07454; IEEE TPAMI 2022",
                  needs_model=True, sampled_fisher=True),
    OptimizerSpec("mbf", mbf.MBF, mbf.MBFConfig,
                  "MBF: block-diagonal empirical Fisher of small mini-blocks (batched inverse)",
                  "Bahamou, Goldfarb & Ren, AISTATS 2023 (arXiv 2202.04124)",
                  needs_model=True, sampled_fisher=True),
    OptimizerSpec("sngd", sngd.SNGD, sngd.SNGDConfig,
                  "SNGD: per-unit / shared-input local Fisher (reconstructed-network NGD)",
                  "Liu, Boumaraf, Li, Lin, Liu, Niu & Werghi, arXiv 2412.07441",
                  needs_model=True),
    OptimizerSpec("shampoo", shampoo.Shampoo, shampoo.ShampooConfig,
                  "blocked Shampoo with Adam/AdaGrad/SGD grafting (Distributed Shampoo choices)",
                  "Gupta, Koren & Singer, ICML 2018; Shi et al., arXiv 2309.06497",
                  build=shampoo.build_shampoo),
    OptimizerSpec("soap", soap.SOAP, soap.SOAPConfig,
                  "Adam in the eigenbasis of Shampoo's factors (QR basis refresh)",
                  "Vyas et al., arXiv 2409.11321 (2024)", build=soap.build_soap),
)}
# fmt: on

def list_optimizers() -> list[str]:
    return sorted(OPTIMIZERS)


def get_spec(name: str) -> OptimizerSpec:
    if name not in OPTIMIZERS:
        raise OptimizerConfigError(
            f"optimizer={name!r} is not a registered optimizer; valid choices: "
            + ", ".join(sorted(OPTIMIZERS))
        )
    return OPTIMIZERS[name]


def config_class(name: str) -> type[OptimizerConfig]:
    """The config dataclass of the registered optimizer ``name``."""
    return get_spec(name).config


def _split(name_or_cfg: str | Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    if isinstance(name_or_cfg, str):
        return name_or_cfg, {}
    cfg_hp = {k: v for k, v in dict(name_or_cfg).items() if not str(k).startswith("_")}
    if "name" not in cfg_hp:
        raise OptimizerConfigError("optimizer config has no 'name' key")
    return str(cfg_hp.pop("name")), cfg_hp


def make_config(name_or_cfg: str | Mapping[str, Any], **hparams: Any) -> OptimizerConfig:
    """The validated config of a registry name or ``{"name": ..., **hparams}`` mapping
    (``hparams`` override it); a bad key or value raises :class:`OptimizerConfigError`."""
    name, cfg_hp = _split(name_or_cfg)
    return get_spec(name).config.build(hparams={**cfg_hp, **hparams}, label=repr(name))


def build_optimizer(
    name_or_cfg: str | Mapping[str, Any], model: nn.Module, **hparams: Any
) -> torch.optim.Optimizer:
    """Build a registered optimizer for ``model``.

    ``name_or_cfg`` is a registry name or a mapping with a ``name`` key plus
    hyperparameters (e.g. a Hydra ``optimizer`` node); ``hparams`` override it.
    Bad hyperparameters raise :class:`OptimizerConfigError` naming the key and the valid
    choices.
    """
    config = make_config(name_or_cfg, **hparams)
    spec = get_spec(_split(name_or_cfg)[0])
    try:
        return spec.make(model, config)
    except (TypeError, ValueError) as exc:
        if isinstance(exc, OptimizerConfigError):
            raise
        raise OptimizerConfigError(f"optimizer {spec.name!r}: {exc}") from exc
