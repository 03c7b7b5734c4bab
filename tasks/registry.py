"""Task registry: the stable name is also the config file name under ``configs/task/``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .base import Task, TaskConfigError

TASKS: dict[str, type[Task]] = {}


def register_task(cls: type[Task]) -> type[Task]:
    if cls.name in TASKS:
        raise ValueError(f"task {cls.name!r} is registered twice")
    TASKS[cls.name] = cls
    return cls


def list_tasks() -> list[str]:
    from . import _register_all

    _register_all()
    return sorted(TASKS)


def build_task(cfg: Mapping[str, Any]) -> Task:
    """Build the task named by ``cfg['name']`` from its (Hydra) config node."""
    from . import _register_all

    _register_all()
    name = cfg.get("name")
    if name not in TASKS:
        raise TaskConfigError(
            f"task={name!r} is not a registered task; valid choices: " + ", ".join(sorted(TASKS))
        )
    return TASKS[name](cfg)
