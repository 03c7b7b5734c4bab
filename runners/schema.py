"""Config schemas of ``ngbench train``: keyword-only dataclasses validated in ``__post_init__``,
registered in Hydra's ConfigStore so that the YAML files under ``configs/`` hold only what
differs from these defaults.

* ``ngbench_schema`` (the root: ``seed``, ``runs_root``, ``train``, ...) is the first entry of
  ``configs/train.yaml``'s defaults list;
* ``schema/task/<name>`` (``tasks.config``) is the first entry of ``configs/task/<name>.yaml``;
* ``schema/optimizer/<name>`` is registered when ``optimizers.registry.config_class`` exists.

Hydra refuses an unknown key without ``+`` and a value of the wrong type while composing;
``runners.config_check`` refuses unknown keys added with ``+`` (and every value rule below)
before a run folder is made.  This module imports neither torch nor the optimizers.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ngbench.tasks.config import TASK_CONFIGS
from omegaconf import MISSING

from .schedules import SCHEDULES as SCHEDULE_NAMES

DEVICES = ("auto", "cpu", "cuda")
LOGGERS = ("none", "wandb")


class ConfigError(ValueError):
    """A bad config value; the message names the full key and the fix."""


def _need(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@dataclass(kw_only=True)
class TrainConfig:
    """``train.*``: the training loop's budget, schedule and machine settings."""

    steps: int = 1000  # total optimizer steps
    batch_size: int = 256  # global batch
    eval_every: int = 100  # steps between evaluations (and metrics.jsonl rows)
    checkpoint_every: int = 500  # steps between checkpoints (0 = only at the end)
    schedule: str = "constant"  # constant | cosine | linear | warmup_cosine | inv_sqrt
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    lr_mult: float = 1.0  # multiplies optimizer.lr (sweeps scale every optimizer alike)
    grad_clip: float | None = None  # max global grad norm, None = off
    device: str = "auto"  # auto | cpu | cuda
    threads: int | None = None  # torch CPU threads (None = torch default)
    progress: bool = True  # progress bar on stderr
    max_time_s: float | None = None  # stop (status completed) after this much training time
    stop_at_target: bool = False  # end the run as soon as the target is reached
    deterministic: bool = False

    def __post_init__(self) -> None:
        for key, lo in (
            ("steps", 1),
            ("batch_size", 1),
            ("eval_every", 1),
            ("checkpoint_every", 0),
            ("warmup_steps", 0),
        ):
            v = getattr(self, key)
            _need(_is_int(v) and v >= lo, f"train.{key} must be an integer >= {lo}, got {v!r}")
        _need(
            self.schedule in SCHEDULE_NAMES,
            f"train.schedule={self.schedule!r} is not valid; valid choices: "
            + ", ".join(SCHEDULE_NAMES),
        )
        _need(
            self.device in DEVICES,
            f"train.device={self.device!r} is not valid; valid choices: " + ", ".join(DEVICES),
        )
        for key in ("grad_clip", "max_time_s"):
            v = getattr(self, key)
            _need(
                v is None or (_is_num(v) and v > 0), f"train.{key} must be null or > 0, got {v!r}"
            )
        v = self.min_lr_ratio
        _need(_is_num(v) and 0 <= v <= 1, f"train.min_lr_ratio must be in [0, 1], got {v!r}")
        v = self.lr_mult
        _need(_is_num(v) and v > 0, f"train.lr_mult must be a number > 0, got {v!r}")
        v = self.threads
        _need(
            v is None or (_is_int(v) and v >= 1), f"train.threads must be null or >= 1, got {v!r}"
        )


@dataclass(kw_only=True)
class LoggerConfig:
    """``logger``: none (local files only) | wandb (mirror the run folder to W&B, offline by
    default: ``wandb sync`` uploads later)."""

    name: str = "none"
    project: str = "ngbench"
    entity: str | None = None
    mode: str = "offline"  # offline | online | disabled
    group: str | None = None

    def __post_init__(self) -> None:
        _need(
            self.name in LOGGERS,
            f"logger={self.name!r} is not valid; valid choices: " + ", ".join(LOGGERS),
        )


@dataclass(kw_only=True)
class NgbenchConfig:
    """The root of ``configs/train.yaml``; ``task``, ``optimizer`` and ``logger`` get their
    schemas from their groups."""

    seed: int = 0
    runs_root: str = "runs"  # run folders go under this directory
    #: what a sweeper optimizes: the best value of this validation metric (None = the task's
    #: target metric)
    objective_metric: str | None = None
    #: set by a debug preset (debug=smoke): such runs live under <runs_root>/debug/<preset>/ and
    #: are labelled in records and reports; None for real runs
    debug_preset: str | None = None
    train: TrainConfig = field(default_factory=TrainConfig)
    task: Any = MISSING
    optimizer: Any = MISSING
    logger: Any = MISSING

    def __post_init__(self) -> None:
        _need(
            _is_int(self.seed) and self.seed >= 0,
            f"seed must be an integer >= 0, got {self.seed!r}",
        )


def register_schemas() -> None:
    """Store every schema in Hydra's ConfigStore (idempotent): call it before composing
    ``configs/train.yaml`` (``ngbench train`` does on import of :mod:`runners.train`)."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="ngbench_schema", node=NgbenchConfig)
    for name, cls in TASK_CONFIGS.items():
        cs.store(group="schema/task", name=name, node=cls)
    register_optimizer_schemas()


def register_optimizer_schemas() -> None:
    """Store ``schema/optimizer/<name>``: each optimizer's config dataclass (its keys, types
    and defaults) plus the ``name`` key the YAML presets carry (imports torch: called by
    ``ngbench train`` only).  ``configs/optimizer/*.yaml`` extend it with their differences."""
    from hydra.core.config_store import ConfigStore
    from ngbench.optimizers import OPTIMIZERS

    cs = ConfigStore.instance()
    for name, spec in OPTIMIZERS.items():
        node = dataclasses.make_dataclass(
            f"{spec.config.__name__}Node",
            [("name", str, dataclasses.field(default=name))],
            bases=(spec.config,),
            kw_only=True,
        )
        cs.store(group="schema/optimizer", name=name, node=node)
