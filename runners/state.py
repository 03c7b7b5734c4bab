"""What a run knows about itself: in memory (:class:`RunState`, everything a checkpoint restores)
and in its folder (:class:`RunRecord`: ``config.yaml``, ``record.json``, ``metrics.jsonl`` and the
W&B mirror).

The record is written as soon as the run owns its folder (status ``running``) and finishes
itself exactly once: :meth:`RunRecord.finish` at the end of the loop, or, when an exception
escapes the ``with`` block (missing data, a W&B login, a bug, a second Ctrl-C), as ``failed``
or ``interrupted`` with the reason in ``error``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

from omegaconf import DictConfig, OmegaConf

from . import distributed, records


class RunAlreadyDone(Exception):
    """The run folder already holds a finished run with this config."""


class RunConflict(Exception):
    """The run folder holds a finished run with a *different* config."""


@dataclass
class RunState:
    """The loop's counters and results so far; ``state_dict()`` goes into every checkpoint."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0  # batches of ``epoch`` already consumed
    train_time_s: float = 0.0  # the training clock: steps only, never evaluation
    loss_sum: float = 0.0  # training loss summed since the last evaluation
    loss_count: int = 0
    time_since_eval: float = 0.0
    steps_since_eval: int = 0
    steps_to_target: int | None = None
    time_to_target_s: float | None = None
    epochs_to_target: float | None = None
    best: dict[str, float] = field(default_factory=dict)
    last_eval: dict[str, Any] = field(default_factory=dict)
    wandb_id: str | None = None
    phase_prev: dict[str, float] = field(default_factory=dict)

    def state_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def load_state_dict(self, d: dict[str, Any]) -> None:
        for key, value in d.items():
            if key not in self.__dataclass_fields__:
                raise KeyError(f"unknown loop state key {key!r} in the checkpoint")
            setattr(self, key, value)

    def epochs(self, steps_per_epoch: int) -> float:
        return self.epoch + self.batch_in_epoch / max(1, steps_per_epoch)

    def after_step(self, loss: float, seconds: float) -> None:
        self.train_time_s += seconds
        self.time_since_eval += seconds
        self.steps_since_eval += 1
        self.step += 1
        if math.isfinite(loss):
            self.loss_sum += loss
            self.loss_count += 1

    def phase_rates(self, totals: dict[str, float]) -> dict[str, float]:
        """Seconds per step of each optimizer phase since the last evaluation."""
        n = max(1, self.steps_since_eval)
        rates = {f"phase_{k}_s": (v - self.phase_prev.get(k, 0.0)) / n for k, v in totals.items()}
        self.phase_prev = dict(totals)
        return rates

    def after_eval(
        self, row: dict[str, Any], metrics: dict[str, float], *, modes: dict[str, str], target: Any
    ) -> None:
        """Fold an evaluation row in: best values, the first time the target is met."""
        self.loss_sum, self.loss_count, self.time_since_eval, self.steps_since_eval = 0.0, 0, 0.0, 0
        for k, v in metrics.items():
            b = self.best.get(k)
            if b is None or (v < b if modes.get(k, "min") == "min" else v > b):
                self.best[k] = float(v)
        self.last_eval = row
        if self.steps_to_target is None and target.reached(row.get(target.metric)):
            self.steps_to_target = self.step
            self.time_to_target_s = self.train_time_s
            self.epochs_to_target = row["epoch"]


def check_existing(run_dir: Path, cfg_hash: str) -> dict[str, Any] | None:
    """Refuse to redo or overwrite a finished run; return the previous record if resumable."""
    rec_path = run_dir / records.RECORD
    if not rec_path.exists():
        return None
    rec = records.read_json(rec_path)
    if rec.get("status") in records.TERMINAL:
        if rec.get("config_hash") != cfg_hash:
            raise RunConflict(
                f"{run_dir} already holds a finished run ({rec['status']}) with a different "
                "config; it is not overwritten. Pick another folder (runs_root=... or "
                "hydra.run.dir=...) or delete that one to rerun."
            )
        raise RunAlreadyDone(
            f"{run_dir} already holds a {rec['status']} run with this config; skipped "
            "(delete the folder to rerun)."
        )
    return rec


class RunRecord:
    """``record.json`` and the rows of ``metrics.jsonl`` (mirrored to W&B when ``logger`` is
    set); only rank 0 writes. Use as ``with RunRecord(...) as record:``."""

    def __init__(
        self,
        cfg: DictConfig,
        run_dir: Path,
        env: distributed.DistEnv,
        state: RunState,
        *,
        preset: str | None,
        hparams: dict[str, Any],
        device: Any,
    ) -> None:
        # a config's keys are strings
        resolved = cast(dict[str, Any], OmegaConf.to_container(cfg, resolve=True))
        assert isinstance(resolved, dict)
        self.cfg, self.run_dir, self.env, self.state = cfg, Path(run_dir), env, state
        self.logger: Any = None  # the W&B mirror (rank 0, logger=wandb)
        self.finished = False
        self._steps_per_epoch: int | None = None  # known once the task's data is loaded
        self.cfg_hash = records.config_hash(resolved)  # identity: RESULT_NEUTRAL_KEYS left out
        opt = str(cfg.optimizer.name)
        self.data: dict[str, Any] = {
            "task": str(cfg.task.name),
            "dataset": resolved["task"].get("dataset"),
            "flavor": resolved["task"].get("flavor"),
            "optimizer": opt,
            "preset": preset or opt,
            "debug_preset": cfg.get("debug_preset"),
            "seed": int(cfg.seed),
            "status": "running",
            "target": None,
            "steps_to_target": None,
            "time_to_target_s": None,
            "steps": int(cfg.train.steps),
            "steps_done": 0,
            "epochs_done": None,
            "train_time_s": 0.0,
            "mean_step_s": None,
            "final_metrics": {},
            "best_metrics": {},
            "config_hash": self.cfg_hash,
            "hparams": {k: v for k, v in hparams.items() if k != "name"},  # effective values
            "lr_mult": float(cfg.train.get("lr_mult", 1.0)),
            "batch_size": int(cfg.train.batch_size),
            "git": records.git_commit(),
            "packages": records.package_versions(),
            "hardware": records.hardware(device),
            "world_size": env.world_size,
            "slurm_job_id": distributed.slurm_job_id(),
            "started": _now(),
            "finished": None,
            "resumed": False,
            "error": None,
        }

    def __enter__(self) -> RunRecord:
        check_existing(self.run_dir, self.cfg_hash)
        if self.env.is_main:
            config = OmegaConf.to_yaml(self.cfg, resolve=True)
            records.atomic_write_text(self.run_dir / records.CONFIG, config)
        self._write()
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        if exc is None or self.finished:
            return
        if isinstance(exc, KeyboardInterrupt):
            step = self.state.step
            error = f"aborted by Ctrl-C at step {step}; resumes from the last checkpoint"
            self.finish("interrupted", error, exit_code=1)
        else:
            self.finish("failed", f"{type(exc).__name__}: {exc}", exit_code=1)

    def describe(self, *, task: Any, optimizer: str, resumed: bool) -> None:
        """What set-up learned (the task's target, the registry's optimizer name); a fresh
        ``metrics.jsonl`` or, on resume, its rows up to the checkpoint (later ones are redone)."""
        self.data.update(
            task=task.name,
            dataset=task.cfg.data_name,  # the data really used (tiny: the embedded set)
            flavor=task.flavor,
            optimizer=optimizer,
            target=task.target.as_dict(),
            resumed=resumed,
        )
        self._steps_per_epoch = task.steps_per_epoch(self.data["batch_size"])  # loads the data
        if self.env.is_main:
            path = self.run_dir / records.METRICS
            keep = [r for r in records.read_metrics(path) if r["step"] <= self.state.step]
            records.write_metrics(path, keep if resumed else [])
        self._sync_from_state()
        self._write()

    def log(self, row: dict[str, Any]) -> None:
        if self.env.is_main:
            records.append_metrics(self.run_dir / records.METRICS, row)
        if self.logger is not None:
            self.logger.log(row)

    def finish(self, status: str, error: str | None = None, *, exit_code: int = 0) -> None:
        self.data.update(status=status, error=error, finished=_now())
        self._sync_from_state()
        self._write()
        self.finished = True
        if self.logger is not None:
            self.logger.finish(self.data, exit_code=exit_code)

    def _sync_from_state(self) -> None:
        st, spe = self.state, self._steps_per_epoch
        self.data.update(
            steps_done=st.step,
            epochs_done=None if spe is None else st.epochs(spe),
            train_time_s=st.train_time_s,
            mean_step_s=st.train_time_s / st.step if st.step else None,
            steps_to_target=st.steps_to_target,
            time_to_target_s=st.time_to_target_s,
            epochs_to_target=st.epochs_to_target,
            final_metrics=dict(st.last_eval),
            best_metrics=dict(st.best),
        )

    def _write(self) -> None:
        if self.env.is_main:
            records.write_json(self.run_dir / records.RECORD, self.data)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
