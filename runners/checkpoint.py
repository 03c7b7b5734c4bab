"""Checkpoints of a run folder: everything a bit-exact resume needs, two generations deep.

``checkpoint.pt`` holds the model, the optimizer (curvature factors included), the scheduler,
the RNG states, the loop's :class:`~runners.state.RunState` (data position, clocks) and the world
size. Each save is atomic and first moves the previous file to ``checkpoint.prev.pt``, so a torn
or unreadable latest checkpoint (a full disk, a copy cut short) falls back to the one before
with a warning. A resume with another number of processes is refused: the data order and the
curvature work assignment depend on it.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import distributed, records
from .state import RunState

_KEYS = frozenset({"model", "optimizer", "scheduler", "loop", "rng", "world_size"})


class CheckpointError(ValueError):
    """No usable checkpoint: the message says which files to delete or how to resume."""


def rng_state() -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Checkpointer:
    """Saves, finds and restores the checkpoints of ``run_dir`` (only rank 0 writes)."""

    def __init__(
        self,
        run_dir: Path,
        env: distributed.DistEnv,
        *,
        model: torch.nn.Module,
        optimizer: Any,
        scheduler: Any,
        state: RunState,
        consolidate: bool = False,
        config_hash: str | None = None,
    ) -> None:
        self.latest = Path(run_dir) / records.CHECKPOINT
        self.previous = Path(run_dir) / records.CHECKPOINT_PREV
        self.env, self.model, self.optimizer, self.scheduler = env, model, optimizer, scheduler
        self.state, self.consolidate, self.config_hash = state, consolidate, config_hash

    def save(self) -> None:
        """Collective under DDP: an optimizer whose state is split over ranks gathers it."""
        if self.consolidate and self.env.enabled:
            self.optimizer.consolidate_state_dict(to=0)
        if not self.env.is_main:
            return
        payload = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "loop": self.state.state_dict(),
            "rng": rng_state(),
            "world_size": self.env.world_size,
            "config_hash": self.config_hash,
        }
        write = lambda f: torch.save(payload, f)  # noqa: E731
        records.atomic_write(self.latest, write, keep_previous=self.previous)

    def resume(self, device: torch.device) -> bool:
        """Restore the newest readable checkpoint; False when there is none (a fresh run)."""
        found = [p for p in (self.latest, self.previous) if p.exists()]
        problems: list[str] = []
        for path in found:
            try:
                ck = torch.load(path, map_location=device, weights_only=False)
                if not isinstance(ck, dict) or not _KEYS <= ck.keys():
                    raise ValueError("not a checkpoint of this harness")
            except Exception as exc:  # torn, truncated, foreign: every reader error means unusable
                problems.append(f"{path.name} is unreadable ({type(exc).__name__}: {_first(exc)})")
                continue
            if problems and self.env.is_main:
                print(
                    f"ngbench: warning: {problems[0]}; falling back to {path.name} "
                    f"(step {ck['loop']['step']})",
                    file=sys.stderr,
                )
            self._restore(ck, path)
            return True
        if problems:
            files, them = " ".join(str(p) for p in found), "them" if len(found) > 1 else "it"
            raise CheckpointError(
                f"no readable checkpoint in {self.latest.parent}: {'; '.join(problems)}. "
                f"Delete {them} to start this run over from step 0: rm {files}"
            )
        return False

    def discard(self) -> None:
        """A finished run needs no checkpoint."""
        if self.env.is_main:
            self.latest.unlink(missing_ok=True)
            self.previous.unlink(missing_ok=True)

    def _restore(self, ck: dict[str, Any], path: Path) -> None:
        if ck["world_size"] != self.env.world_size:
            raise CheckpointError(
                f"{path} was written with world size {ck['world_size']} but this run "
                f"has {self.env.world_size}; resume with the same number of processes (the data "
                "order and curvature assignment depend on it)"
            )
        self.model.load_state_dict(ck["model"])
        self.optimizer.load_state_dict(ck["optimizer"])
        self.scheduler.load_state_dict(ck["scheduler"])
        self.state.load_state_dict(ck["loop"])
        set_rng_state(ck["rng"])


def _first(exc: BaseException) -> str:
    """The first sentence of an error message (torch's run on for lines)."""
    text = str(exc).strip() or "no message"
    return text.splitlines()[0].split(". ")[0][:160]
