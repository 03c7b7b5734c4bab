"""Optimizer registry: stable names mapped to frozen specs with capability flags.

The stable key is also the config file name under ``configs/optimizer/``, the
run-folder component, the W&B tag and the table row label.  The training loop
branches on the capability flags below, never on optimizer names.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = [
    "OptimizerSpec",
    "OptimizerConfigError",
    "register",
    "get_spec",
    "list_optimizers",
    "build_optimizer",
    "REGISTRY",
]


class OptimizerConfigError(ValueError):
    """A bad optimizer name or hyperparameter; the message names the key and the fix."""


@dataclass(frozen=True)
class OptimizerSpec:
    """What the harness needs to know about one optimizer.

    ``factory(model, **hparams)`` returns a ``torch.optim.Optimizer``.
    """

    name: str
    factory: Callable[..., torch.optim.Optimizer]
    description: str
    paper: str = ""
    #: the optimizer registers hooks on the model (curvature methods)
    needs_model: bool = False
    #: curvature method: exposes phase timers and ``memory_usage()``
    curvature: bool = False
    #: can build its statistics from an extra backward with sampled labels (MC Fisher)
    sampled_fisher: bool = False
    #: hyperparameter names accepted by the factory (filled at registration)
    hparams: tuple[str, ...] = field(default=())


REGISTRY: dict[str, OptimizerSpec] = {}


def _factory_hparams(factory: Callable[..., Any]) -> tuple[str, ...]:
    sig = inspect.signature(factory)
    names = [
        p.name
        for p in sig.parameters.values()
        if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and p.name != "model"
    ]
    return tuple(names)


def register(spec: OptimizerSpec) -> OptimizerSpec:
    """Add ``spec`` to the registry (explicit registration; names are unique)."""
    if spec.name in REGISTRY:
        raise ValueError(f"optimizer {spec.name!r} is registered twice")
    if not spec.hparams:
        spec = OptimizerSpec(**{**spec.__dict__, "hparams": _factory_hparams(spec.factory)})
    REGISTRY[spec.name] = spec
    return spec


def _ensure_loaded() -> None:
    # Registration happens on import of the package; importing here keeps
    # ``optimizers.registry`` usable on its own.
    import optimizers  # noqa: F401


def list_optimizers() -> list[str]:
    _ensure_loaded()
    return sorted(REGISTRY)


def get_spec(name: str) -> OptimizerSpec:
    _ensure_loaded()
    if name not in REGISTRY:
        raise OptimizerConfigError(
            f"optimizer={name!r} is not a registered optimizer; valid choices: "
            + ", ".join(sorted(REGISTRY))
        )
    return REGISTRY[name]


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def validate_hparams(spec: OptimizerSpec, hparams: Mapping[str, Any]) -> None:
    """Unknown keys, a value whose type does not match the factory default's, and a
    negative learning rate raise :class:`OptimizerConfigError` naming the key."""
    unknown = sorted(set(hparams) - set(spec.hparams))
    if unknown:
        raise OptimizerConfigError(
            f"optimizer.{unknown[0]} is not a hyperparameter of {spec.name!r}; valid keys: "
            + ", ".join(spec.hparams)
        )
    params = inspect.signature(spec.factory).parameters
    for key, value in hparams.items():
        default = params[key].default
        if default is inspect.Parameter.empty or default is None or value is None:
            continue
        if callable(value):  # e.g. a schedule function for a frequency (Python API)
            continue
        if isinstance(default, bool):
            ok = isinstance(value, bool)
        elif isinstance(default, int):
            ok = _is_num(value) and float(value).is_integer()
        elif isinstance(default, float):
            ok = _is_num(value)
        elif isinstance(default, str):
            ok = isinstance(value, str)
        else:
            ok = True
        if not ok:
            raise OptimizerConfigError(
                f"optimizer.{key} must be of type {type(default).__name__} "
                f"(default {default!r}), got {value!r}"
            )
    lr = hparams.get("lr")
    if lr is not None and not (_is_num(lr) and lr >= 0):
        raise OptimizerConfigError(f"optimizer.lr must be a number >= 0, got {lr!r}")


def build_optimizer(
    name_or_cfg: str | Mapping[str, Any], model: nn.Module, **hparams: Any
) -> torch.optim.Optimizer:
    """Build a registered optimizer for ``model``.

    ``name_or_cfg`` is a registry name or a mapping with a ``name`` key plus
    hyperparameters (e.g. a Hydra ``optimizer`` node); ``hparams`` override it.
    Bad hyperparameters raise :class:`OptimizerConfigError` naming the key and the valid
    choices (see :func:`validate_hparams`).
    """
    if isinstance(name_or_cfg, str):
        name, cfg_hp = name_or_cfg, {}
    else:
        cfg_hp = {k: v for k, v in dict(name_or_cfg).items() if not str(k).startswith("_")}
        if "name" not in cfg_hp:
            raise OptimizerConfigError("optimizer config has no 'name' key")
        name = cfg_hp.pop("name")
    spec = get_spec(name)
    merged = {**cfg_hp, **hparams}
    validate_hparams(spec, merged)
    try:
        return spec.factory(model, **merged)
    except (TypeError, ValueError) as exc:
        if isinstance(exc, OptimizerConfigError):
            raise
        raise OptimizerConfigError(f"optimizer {name!r}: {exc}") from exc
