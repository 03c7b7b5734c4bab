"""ngbench tasks: model + data + loss + evaluation + target, each with a ``tiny`` and a
``full`` flavor.  ``build_task(cfg)`` builds one from its config node."""

from .base import DataNotFoundError, Target, Task, TaskConfigError
from .registry import TASKS, build_task, list_tasks, register_task

# --- task modules (keep this marker): one register_task line per task ---
from .resnet import ResNetTask  # noqa: E402

register_task(ResNetTask)
from .transformer import TransformerTask  # noqa: E402

register_task(TransformerTask)
from .schnet import SchNetTask  # noqa: E402

register_task(SchNetTask)
from .recommender import RecommenderTask  # noqa: E402

register_task(RecommenderTask)
from .autoencoder import AutoencoderTask  # noqa: E402

register_task(AutoencoderTask)

__all__ = [
    "TASKS",
    "DataNotFoundError",
    "Target",
    "Task",
    "TaskConfigError",
    "build_task",
    "list_tasks",
    "register_task",
]
