"""ngbench tasks: model + data + loss + evaluation + target, each with a ``tiny`` and a
``full`` flavor.  ``build_task(cfg)`` builds one from its config node.

Importing this package is cheap (no torch): the task modules load on first use of
``TASKS``/``build_task``/``list_tasks``/the classes, while ``tasks.config`` (the task config
dataclasses, data set names and targets) never needs torch.
"""

from __future__ import annotations

from typing import Any

from .config import TASK_CONFIGS, Target, TaskConfigError, task_config

_LAZY = (
    "TASKS",
    "DataNotFoundError",
    "Task",
    "build_task",
    "list_tasks",
    "register_task",
)


_loaded = False


def _register_all() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    from . import registry
    # --- task modules (keep this marker): one register_task line per task ---
    from .resnet import ResNetTask

    registry.register_task(ResNetTask)
    from .transformer import TransformerTask

    registry.register_task(TransformerTask)
    from .schnet import SchNetTask

    registry.register_task(SchNetTask)
    from .recommender import RecommenderTask

    registry.register_task(RecommenderTask)
    from .autoencoder import AutoencoderTask

    registry.register_task(AutoencoderTask)


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'tasks' has no attribute {name!r}")
    from . import base, registry

    _register_all()
    return getattr(registry if hasattr(registry, name) else base, name)


__all__ = [
    "TASKS",
    "TASK_CONFIGS",
    "DataNotFoundError",
    "Target",
    "Task",
    "TaskConfigError",
    "build_task",
    "list_tasks",
    "register_task",
    "task_config",
]
