"""The one module that reads torchrun / SLURM environment variables.

``init()`` returns a :class:`DistEnv`; a plain ``python``/``ngbench`` process is rank 0
of world size 1.  Under ``torchrun`` (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``) it
initialises the default process group (``gloo`` on CPU, ``nccl`` on GPU).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def env_int(name: str, default: int) -> int:
    v = os.environ.get(name)
    return int(v) if v not in (None, "") else default


def _export_slurm_env() -> None:
    """Under SLURM with several tasks (submitit launcher), export the torchrun variables."""
    if "WORLD_SIZE" in os.environ or env_int("SLURM_NTASKS", 1) <= 1:
        return
    if "SUBMITIT_EXECUTOR" not in os.environ and "SUBMITIT_FOLDER" not in os.environ:
        return
    from submitit.helpers import TorchDistributedEnvironment

    TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


def init(device_type: str = "cpu") -> DistEnv:
    _export_slurm_env()
    world = env_int("WORLD_SIZE", 1)
    if world <= 1:
        return DistEnv()
    rank, local = env_int("RANK", 0), env_int("LOCAL_RANK", 0)
    backend = "nccl" if device_type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    if device_type == "cuda":
        torch.cuda.set_device(local)
    return DistEnv(rank=rank, world_size=world, local_rank=local, backend=backend)


def slurm_job_id() -> str | None:
    return os.environ.get("SLURM_ARRAY_JOB_ID") or os.environ.get("SLURM_JOB_ID")


def barrier(env: DistEnv) -> None:
    if env.enabled:
        dist.barrier()


def all_reduce_mean(x: torch.Tensor, env: DistEnv) -> torch.Tensor:
    if env.enabled:
        dist.all_reduce(x)
        x /= env.world_size
    return x


def shutdown(env: DistEnv) -> None:
    if env.enabled and dist.is_initialized():
        dist.destroy_process_group()


def wrap_model(model: torch.nn.Module, env: DistEnv, device: torch.device) -> torch.nn.Module:
    """DDP-wrap ``model`` when running with several processes (else return it unchanged)."""
    if not env.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = (
        [device.index if device.index is not None else env.local_rank]
        if device.type == "cuda"
        else None
    )
    return DistributedDataParallel(model, device_ids=ids)


def mean_scalar(value: float, env: DistEnv) -> float:
    t = torch.tensor([value], dtype=torch.float64)
    return float(all_reduce_mean(t, env)[0])


def broadcast_object[T](obj: T, env: DistEnv, src: int = 0) -> T:
    if not env.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def current_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def any_true(flag: bool, env: DistEnv) -> bool:
    """True on every rank if ``flag`` is true on any rank."""
    if not env.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def slurm_job_label() -> str | None:
    """This SLURM job's own id (``<array job>_<task>`` for an array task); a requeue keeps it."""
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array and task:
        return f"{array}_{task}"
    return os.environ.get("SLURM_JOB_ID") or None
