"""Mirror a run folder to Weights & Biases (``logger=wandb``).

Offline by default (``WANDB_MODE=offline``): the run files land in ``<run>/wandb/`` and
``wandb sync <run>/wandb/offline-run-*`` uploads them later.  Runs are grouped by
task/optimizer and tagged by seed; a resumed run continues the same W&B run id.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf


class WandbLogger:
    def __init__(self, cfg: DictConfig, run_dir: Path, resume_id: str | None):
        os.environ.setdefault("WANDB_SILENT", "true")
        import wandb

        lcfg = cfg.logger
        mode = str(lcfg.get("mode") or "offline")
        self._wandb = wandb
        run_name = "/".join(Path(run_dir).parts[-3:])
        self.run = wandb.init(
            project=str(lcfg.get("project") or "ngbench"),
            entity=lcfg.get("entity") or None,
            group=str(lcfg.get("group") or f"{cfg.task.name}/{cfg.optimizer.name}"),
            name=run_name,
            tags=[f"seed{cfg.seed}", str(cfg.task.name), str(cfg.optimizer.name)],
            config=OmegaConf.to_container(cfg, resolve=True),  # type: ignore[arg-type]
            dir=str(run_dir),
            mode=mode,  # type: ignore[arg-type]
            id=resume_id or secrets.token_hex(4),
            resume="allow",
            settings=wandb.Settings(console="off", x_disable_stats=True),
        )
        self.run_id: str = self.run.id

    def log(self, row: dict[str, Any]) -> None:
        self.run.log({k: v for k, v in row.items() if k != "step"}, step=int(row["step"]))

    def finish(self, record: dict[str, Any], *, exit_code: int) -> None:
        for key in ("status", "steps_to_target", "time_to_target_s", "train_time_s", "mean_step_s"):
            self.run.summary[key] = record.get(key)
        self.run.finish(exit_code=exit_code)


def make_logger(cfg: DictConfig, run_dir: Path, *, resume_id: str | None) -> WandbLogger | None:
    name = str(cfg.logger.get("name", "none"))
    if name == "none":
        return None
    if name != "wandb":
        raise ValueError(f"logger={name!r} is not valid; valid choices: none, wandb")
    return WandbLogger(cfg, run_dir, resume_id)
