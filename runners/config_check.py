"""Validate a composed config before any work and before any run folder exists: every message
names the full key and the fix (the closest valid key for an unknown one).

Hydra itself refuses, while composing, an unknown key written without ``+`` and a value of the
wrong type for a typed key (``runners.schema``).  What it lets through — keys added with ``+``,
value ranges and choices — is refused here, by :class:`ValidateConfig`, a Hydra callback that
runs before Hydra creates the run folder (``on_run_start``) and, for a multirun, checks every
cell of the sweep before the first one starts (``on_multirun_start``).
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from collections.abc import Mapping
from typing import Any, cast

from hydra.experimental.callback import Callback
from ngbench.tasks.config import TaskConfigError, task_config, unknown_key_message
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .schema import ConfigError, LoggerConfig, NgbenchConfig, TrainConfig

__all__ = ["ConfigError", "ValidateConfig", "check_config", "check_optimizer", "check_train"]


def check_keys(node: Mapping[str, Any], schema: type, prefix: str = "") -> None:
    """Refuse a key of ``node`` that is not a field of the dataclass ``schema`` (recursively
    into dataclass-typed fields), naming the full key and the closest valid one."""
    fields = {f.name: f for f in dataclasses.fields(schema)}
    for key, value in node.items():
        if key not in fields:
            raise ConfigError(unknown_key_message(f"{prefix}{key}", [prefix + n for n in fields]))
        default = fields[key].default_factory  # dataclass-typed fields use a factory
        if (
            isinstance(value, Mapping)
            and callable(default)
            and isinstance(default, type)
            and dataclasses.is_dataclass(default)
        ):
            check_keys(value, default, f"{prefix}{key}.")


def check_train(train: Mapping[str, Any]) -> None:
    check_keys(train, TrainConfig, "train.")
    TrainConfig(**train)


def check_optimizer(opt: Mapping[str, Any]) -> None:
    from ngbench.optimizers import config_class, make_config

    name = str(opt.get("name"))
    cls = config_class(name)  # an unknown name is refused with the valid choices
    valid = [f.name for f in dataclasses.fields(cls)]
    for key in opt:
        if key != "name" and key not in valid:
            raise ConfigError(
                unknown_key_message(f"optimizer.{key}", [f"optimizer.{n}" for n in valid])
                + f"; {name!r} has no such hyperparameter"
            )
    make_config(opt)  # the config dataclass names a bad value


def check_config(cfg: DictConfig | Mapping[str, Any], *, build: bool = True) -> None:
    """Raise :class:`ConfigError` (or the task/optimizer config errors) on a bad config.
    ``build=False`` skips building the task (the one check that imports torch)."""
    c: dict[str, Any] = {}
    for key in cast(Mapping[str, Any], cfg):  # a config's keys are strings
        if key == "hydra":
            continue
        try:
            value = cfg[key]
            c[str(key)] = (
                OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
            )
        except OmegaConfBaseException as exc:
            full = getattr(exc, "full_key", None) or key
            raise ConfigError(f"{full}: {getattr(exc, 'msg', exc)}") from None
    check_keys(c, NgbenchConfig)
    check_train(c.get("train") or {})
    NgbenchConfig(**{k: v for k, v in c.items() if k != "train"})
    check_keys(c.get("logger") or {}, LoggerConfig, "logger.")
    LoggerConfig(**(c.get("logger") or {}))
    task_config(c.get("task") or {})
    check_optimizer(c.get("optimizer") or {})
    if build:
        from ngbench.tasks import build_task

        build_task(c["task"])  # the task's own checks (data is loaded lazily)


@functools.cache
def config_groups() -> list[str]:
    """The groups of the root config's defaults list (configs/train.yaml), its one source."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "configs" / "train.yaml").read_text()
    head = text.split("defaults:", 1)[1]
    return re.findall(r"^\s*-\s*(?:optional\s+)?(\w+)\s*:", head.split("\n\n", 1)[0], re.M)


def check_override_keys(overrides: list[str]) -> None:
    """Refuse, before Hydra composes, a command-line key that no schema has (``train.X``, a
    root key, ``task.X`` for the chosen task), naming the closest valid key: Hydra's own
    message would suggest adding it with ``+``.  Keys it cannot place (optimizer.*, keys an
    experiment may change) are left to Hydra and :func:`check_config`."""
    from ngbench.tasks.config import TASK_CONFIGS

    pairs = [o.split("=", 1) for o in overrides if "=" in o and not o.startswith("-")]
    choice = {k.lstrip("+~"): v for k, v in pairs}
    task = choice.get("task", "autoencoder")
    task_cls = None if "experiment" in choice else TASK_CONFIGS.get(task)
    root = [f.name for f in dataclasses.fields(NgbenchConfig)]
    for key, _ in pairs:
        key = key.lstrip("+~")
        parts = key.split(".")
        if "/" in key or parts[0] in ("hydra", "optimizer", "logger"):
            continue
        if len(parts) == 1 and key not in root and key not in (groups := config_groups()):
            raise ConfigError(unknown_key_message(key, list(dict.fromkeys(root + groups))))
        if parts[0] == "train" and len(parts) >= 2:
            check_keys({parts[1]: None}, TrainConfig, "train.")
        if parts[0] == "task" and len(parts) >= 2 and task_cls is not None:
            check_keys({parts[1]: None}, task_cls, "task.")


def user_errors() -> tuple[type[BaseException], ...]:
    from ngbench.optimizers import OptimizerConfigError

    return (ConfigError, TaskConfigError, OptimizerConfigError)


def refuse(msg: str) -> None:
    print(f"ngbench: error: {msg}", file=sys.stderr)
    sys.exit(2)


def _sweep_cells(config: DictConfig) -> list[list[str]] | None:
    """The override list of every cell of a basic-sweeper multirun (None for other sweepers,
    whose cells are chosen while they run)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    if not str(config.hydra.sweeper.get("_target_", "")).endswith("BasicSweeper"):
        return None
    params = config.hydra.sweeper.get("params") or {}
    lines = [f"{k}={v}" for k, v in params.items()]
    task_overrides = OmegaConf.to_container(config.hydra.overrides.task, resolve=False)
    lines += list(cast(list[str], task_overrides or []))  # hydra's list of override strings
    loader = GlobalHydra.instance().config_loader()
    overrides = OverridesParser.create(config_loader=loader).parse_overrides(lines)
    batches = BasicSweeper.split_arguments(overrides, None)
    return [cell for batch in batches for cell in batch]


class ValidateConfig(Callback):
    """Hydra callback (``hydra.callbacks.validate`` in ``configs/train.yaml``)."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            check_config(config)
        except user_errors() as exc:
            refuse(str(exc))

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from hydra.core.global_hydra import GlobalHydra

        cells = _sweep_cells(config)
        if cells is None:
            return self.on_run_start(config)
        loader = GlobalHydra.instance().config_loader()
        for cell in cells:
            try:
                cfg = loader.load_sweep_config(config, list(cell))
                check_config(cfg)
            except user_errors() as exc:
                refuse(f"sweep cell {' '.join(cell)}: {exc}")
            except Exception as exc:  # a composition error (Hydra's own message)
                if type(exc).__name__ != "ConfigCompositionException":
                    raise
                refuse(f"sweep cell {' '.join(cell)}: {exc}")
        return None
