"""The task contract: model + data + loss + evaluation + target (AlgoPerf's workload idea).

A task is built from its Hydra ``task`` node (or a plain dict, or its config dataclass), which
becomes its validated config dataclass (``tasks.config``).  The training loop only uses the
methods below, so a new task plugs in by subclassing :class:`Task`, adding its config class to
``tasks.config``, a ``configs/task/<name>.yaml`` and an entry in ``tasks/__init__.py``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from .config import Target, TaskConfig, TaskConfigError

Batch = Any


class DataNotFoundError(FileNotFoundError):
    """A data set is missing; the message names the path looked at and how to provide it."""


class Task:
    """Base class.  Subclasses set ``name`` and implement the abstract methods.

    Data order is a pure function of ``(seed, epoch)`` so that a resumed run can
    skip the batches it already consumed and continue bit-for-bit.
    """

    name: str = "task"
    #: the task's config dataclass (``tasks.config``): options, defaults, validation
    config_class: ClassVar[type[TaskConfig]] = TaskConfig
    #: data set names this task understands (``task.dataset``, ``ngbench data <name>``)
    datasets: tuple[str, ...] = ()
    #: which way each reported validation metric is better
    metric_modes: Mapping[str, Literal["min", "max"]] = {}

    def __init__(self, cfg: Mapping[str, Any] | TaskConfig):
        self.cfg = self.config_class.from_mapping(cfg)
        self.flavor: str = self.cfg.flavor
        self.dataset: str = self.cfg.effective_dataset
        self.data_root = Path(self.cfg.data_root or "data").expanduser()

    # -- what a task declares -------------------------------------------------
    @property
    def target(self) -> Target:
        t = self.cfg.resolved_target
        if t is None:
            raise TaskConfigError(f"task {self.name!r} declares no target (task.target)")
        return t

    def describe(self) -> str:
        """One line for ``ngbench list tasks``."""
        return self.cfg.describe()

    @classmethod
    def prepare_data(cls, dataset: str, root: Path) -> str:
        """Check (and, where possible offline, prepare) ``dataset`` under ``root``.

        Returns a human-readable status; raises :class:`DataNotFoundError` naming the
        path looked at and how to provide the data when it is missing.
        """
        return f"{dataset}: nothing to prepare"

    # -- model, data, loss, evaluation -----------------------------------------
    def build_model(self) -> nn.Module:
        raise NotImplementedError

    def num_train_examples(self) -> int:
        raise NotImplementedError

    def train_batches(
        self, *, epoch: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1
    ) -> Iterator[Batch]:
        """The batches of one epoch, in an order fixed by ``(seed, epoch)``.

        ``batch_size`` is the global batch; with ``world_size > 1`` each rank gets
        its contiguous shard of every global batch.
        """
        raise NotImplementedError

    def steps_per_epoch(self, batch_size: int) -> int:
        return max(1, self.num_train_examples() // batch_size)

    def loss(self, model: nn.Module, batch: Batch) -> tuple[Tensor, Tensor]:
        """Mean loss over the batch and the model outputs (for a sampled-Fisher pass)."""
        raise NotImplementedError

    def sampled_loss(self, outputs: Tensor) -> Tensor | None:
        """Loss of ``outputs`` against labels sampled from the model's predictive
        distribution (MC Fisher), with the same reduction as :meth:`loss`; ``None``
        when the task cannot sample."""
        return None

    @torch.no_grad()
    def evaluate(self, model: nn.Module, device: torch.device) -> dict[str, float]:
        """Validation metrics under the names in :attr:`metric_modes`."""
        raise NotImplementedError

    def to_device(self, batch: Batch, device: torch.device) -> Batch:
        if isinstance(batch, Tensor):
            return batch.to(device, non_blocking=True)
        if isinstance(batch, (tuple, list)):
            return type(batch)(self.to_device(b, device) for b in batch)
        if isinstance(batch, dict):
            return {k: self.to_device(v, device) for k, v in batch.items()}
        return batch


def shard_indices(perm: Tensor, *, batch_size: int, rank: int, world_size: int) -> list[Tensor]:
    """Split a permutation into global batches (dropping the ragged tail) and keep
    this rank's contiguous shard of each."""
    if batch_size % world_size:
        raise TaskConfigError(
            f"train.batch_size={batch_size} must be divisible by the world size {world_size}"
        )
    local = batch_size // world_size
    out = []
    for start in range(0, len(perm) - batch_size + 1, batch_size):
        out.append(perm[start + rank * local : start + (rank + 1) * local])
    return out


def epoch_permutation(n: int, *, seed: int, epoch: int) -> Tensor:
    g = torch.Generator().manual_seed(1_000_003 * seed + epoch)
    return torch.randperm(n, generator=g)
