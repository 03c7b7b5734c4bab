"""The training loop: one function, read top to bottom.

``train(cfg, run_dir)`` builds the task, model and optimizer from a resolved config,
trains for ``train.steps`` optimizer steps with periodic evaluation, and writes the run
folder (``config.yaml``, ``metrics.jsonl``, ``record.json``, ``checkpoint.pt``).

* The training clock (``train_time_s``) counts only training steps, never evaluation,
  and synchronizes CUDA before reading the time.
* A NaN/Inf loss ends the run cleanly with status ``diverged``.
* The first evaluation at which the task's target is met gives ``steps_to_target`` and
  ``time_to_target_s``.
* A checkpoint every ``train.checkpoint_every`` steps holds everything needed to resume
  bit-for-bit (model, optimizer incl. curvature factors, scheduler, RNG states, data
  position, clocks); SIGTERM/SIGUSR1/SIGUSR2 checkpoint and stop with status ``preempted``.
"""

from __future__ import annotations

import contextlib
import math
import random
import signal
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from optimizers import build_optimizer, get_spec
from tasks import build_task

from . import distributed, records
from .schedules import build_scheduler
from .wandb_log import make_logger


class RunAlreadyDone(Exception):
    """The run folder already holds a finished run with this config."""


class RunConflict(Exception):
    """The run folder holds a finished run with a *different* config."""


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device=cuda but no CUDA device is available; use auto or cpu")
    if name not in ("cpu", "cuda"):
        raise ValueError(f"train.device={name!r} is not valid; valid choices: auto, cpu, cuda")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rng_state() -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class _StopSignal:
    """Turns SIGTERM/SIGUSR1/SIGUSR2 into a flag the loop checks between steps."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _StopSignal:
        for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2):
            try:
                self._old[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.signum = signum

    def __exit__(self, *exc: Any) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)

    def forward(self) -> None:
        """After the checkpoint is safe, hand the signal to whoever handled it before us
        (submitit's handler requeues the SLURM job and exits)."""
        old = self._old.get(self.signum) if self.signum is not None else None
        if callable(old):
            old(self.signum, None)


def train_step(
    task: Any,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: Any,
    *,
    sampled_fisher: bool = False,
    grad_clip: float | None = None,
) -> float:
    """One optimizer step; returns the (synchronized) training loss.

    With ``sampled_fisher``, an optimizer that asks for it gets an extra backward of the
    loss against labels sampled from the model (MC Fisher) before the real backward.
    """
    optimizer.zero_grad(set_to_none=True)
    loss, outputs = task.loss(model, batch)
    if sampled_fisher and optimizer.needs_sampled_backward():  # type: ignore[attr-defined]
        sampled = task.sampled_loss(outputs)
        if sampled is not None:
            # under DDP the sampled-label gradients must not be all-reduced: they are discarded
            no_sync = getattr(model, "no_sync", contextlib.nullcontext)
            with no_sync(), optimizer.sampled_backward():  # type: ignore[attr-defined]
                sampled.backward(retain_graph=True)
    loss.backward()
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), float(grad_clip))
    optimizer.step()
    return float(loss.detach())


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


def train(cfg: DictConfig, run_dir: Path, *, preset: str | None = None) -> dict[str, Any]:
    """Run one training job into ``run_dir`` and return its record.

    ``preset`` is the optimizer config file chosen (``optimizer=<preset>``) when it differs
    from the registry name (e.g. ``ngplus_resnet50`` for ``ngplus``); it labels the run."""
    run_dir = Path(run_dir)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(resolved, dict)
    tcfg = cfg.train
    cfg_hash = records.config_hash(resolved)
    check_existing(run_dir, cfg_hash)

    device = pick_device(str(tcfg.device))
    env = distributed.init(device.type)
    if tcfg.get("threads"):
        torch.set_num_threads(int(tcfg.threads))
    if tcfg.get("deterministic"):
        torch.use_deterministic_algorithms(True)
    seed_everything(int(cfg.seed))

    # -- build -----------------------------------------------------------------
    task = build_task(cfg.task)
    target = task.target
    model = task.build_model().to(device)
    # the optimizer hooks the bare model's modules; DDP (when world_size > 1) wraps it for the
    # forward/backward so gradients arrive averaged over ranks
    net = distributed.wrap_model(model, env, device)
    opt_cfg = OmegaConf.to_container(cfg.optimizer, resolve=True)
    assert isinstance(opt_cfg, dict)
    spec = get_spec(str(opt_cfg["name"]))
    lr_mult = float(tcfg.get("lr_mult", 1.0))
    if "lr" in opt_cfg and lr_mult != 1.0:
        opt_cfg["lr"] = float(opt_cfg["lr"]) * lr_mult
    optimizer = build_optimizer(opt_cfg, model)
    steps = int(tcfg.steps)
    scheduler = build_scheduler(
        optimizer,
        str(tcfg.schedule),
        total_steps=steps,
        warmup_steps=int(tcfg.warmup_steps),
        min_ratio=float(tcfg.min_lr_ratio),
    )
    batch_size = int(tcfg.batch_size)
    eval_every = max(1, int(tcfg.eval_every))
    ckpt_every = int(tcfg.checkpoint_every or 0)
    use_sampled = spec.sampled_fisher and hasattr(optimizer, "needs_sampled_backward")

    # -- state (everything a checkpoint restores) --------------------------------
    st: dict[str, Any] = {
        "step": 0,
        "epoch": 0,
        "batch_in_epoch": 0,
        "train_time_s": 0.0,
        "loss_sum": 0.0,
        "loss_count": 0,
        "time_since_eval": 0.0,
        "steps_since_eval": 0,
        "steps_to_target": None,
        "time_to_target_s": None,
        "epochs_to_target": None,
        "best": {},
        "last_eval": {},
        "wandb_id": None,
        "phase_prev": {},
    }
    ckpt_path = run_dir / records.CHECKPOINT
    metrics_path = run_dir / records.METRICS
    resumed = False
    if ckpt_path.exists():
        ck = torch.load(ckpt_path, map_location=device, weights_only=False)
        if ck.get("world_size", 1) != env.world_size:
            raise ValueError(
                f"{ckpt_path} was written with world size {ck.get('world_size', 1)} but this run "
                f"has {env.world_size}; resume with the same number of processes (the data "
                "order and curvature assignment depend on it)"
            )
        model.load_state_dict(ck["model"])
        optimizer.load_state_dict(ck["optimizer"])
        scheduler.load_state_dict(ck["scheduler"])
        st.update(ck["loop"])
        _set_rng_state(ck["rng"])
        resumed = True
        # metrics rows written after the checkpoint are redone
        if env.is_main:
            rows = [r for r in records.read_metrics(metrics_path) if r["step"] <= st["step"]]
            records.write_metrics(metrics_path, rows)
    elif env.is_main:
        records.write_metrics(metrics_path, [])

    started = datetime.now(UTC).isoformat(timespec="seconds")
    record: dict[str, Any] = {
        "task": task.name,
        "dataset": task.cfg.data_name,  # the data really used (tiny: the embedded set)
        "flavor": task.flavor,
        "optimizer": spec.name,
        "preset": preset or spec.name,
        "seed": int(cfg.seed),
        "status": "running",
        "target": target.as_dict(),
        "steps_to_target": st["steps_to_target"],
        "time_to_target_s": st["time_to_target_s"],
        "steps": steps,
        "steps_done": st["step"],
        "epochs_done": None,
        "train_time_s": st["train_time_s"],
        "mean_step_s": None,
        "final_metrics": {},
        "best_metrics": {},
        "config_hash": cfg_hash,
        "hparams": {k: v for k, v in opt_cfg.items() if k != "name"},  # effective values
        "lr_mult": lr_mult,
        "batch_size": batch_size,
        "git": records.git_commit(),
        "packages": records.package_versions(),
        "hardware": records.hardware(device),
        "world_size": env.world_size,
        "slurm_job_id": distributed.slurm_job_id(),
        "started": started,
        "finished": None,
        "resumed": resumed,
        "error": None,
    }
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        records.atomic_write_text(run_dir / records.CONFIG, OmegaConf.to_yaml(cfg, resolve=True))
        records.write_json(run_dir / records.RECORD, record)
    logger = make_logger(cfg, run_dir, resume_id=st["wandb_id"]) if env.is_main else None
    if logger is not None:
        st["wandb_id"] = logger.run_id

    def save_checkpoint() -> None:
        if env.enabled and hasattr(optimizer, "consolidate_state_dict"):
            optimizer.consolidate_state_dict(to=0)  # collective: gathers split decompositions
        if not env.is_main:
            return
        ck = {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "loop": dict(st),
            "rng": _rng_state(),
            "world_size": env.world_size,
            "config_hash": cfg_hash,
        }
        tmp = ckpt_path.with_suffix(".pt.tmp")
        torch.save(ck, tmp)
        tmp.replace(ckpt_path)

    def evaluate() -> dict[str, Any]:
        was_training = model.training
        model.eval()
        metrics = task.evaluate(model, device) if env.is_main else {}
        metrics = distributed.broadcast_object(metrics, env)  # all ranks agree on target/stop
        model.train(was_training)
        row: dict[str, Any] = {
            "step": st["step"],
            "epoch": st["epoch"] + st["batch_in_epoch"] / max(1, task.steps_per_epoch(batch_size)),
            "train_time_s": st["train_time_s"],
            "train_loss": st["loss_sum"] / max(1, st["loss_count"]),
            "lr": optimizer.param_groups[0]["lr"],
            "step_time_s": st["time_since_eval"] / max(1, st["steps_since_eval"]),
            **{k: float(v) for k, v in metrics.items()},
        }
        if hasattr(optimizer, "phase_times"):
            now = dict(optimizer.phase_times())
            prev = st["phase_prev"]
            for k, v in now.items():
                row[f"phase_{k}_s"] = (v - prev.get(k, 0.0)) / max(1, st["steps_since_eval"])
            st["phase_prev"] = now
        st.update(loss_sum=0.0, loss_count=0, time_since_eval=0.0, steps_since_eval=0)
        for k, v in metrics.items():
            mode = task.metric_modes.get(k, "min")
            b = st["best"].get(k)
            if b is None or (v < b if mode == "min" else v > b):
                st["best"][k] = float(v)
        st["last_eval"] = row
        if st["steps_to_target"] is None and target.reached(row.get(target.metric)):
            st["steps_to_target"] = st["step"]
            st["time_to_target_s"] = st["train_time_s"]
            st["epochs_to_target"] = row["epoch"]
        if env.is_main:
            records.append_metrics(metrics_path, row)
            if logger is not None:
                logger.log(row)
        return row

    # -- loop ------------------------------------------------------------------
    status = "completed"
    model.train()
    progress = None
    if tcfg.progress and env.is_main:
        from tqdm import tqdm

        progress = tqdm(
            total=steps, initial=st["step"], desc=f"{task.name}/{spec.name}", leave=False
        )
    stopper = _StopSignal()
    max_time = tcfg.get("max_time_s")
    stop_at_target = bool(tcfg.get("stop_at_target"))
    try:
        with stopper as stop:
            stop_now = False
            while st["step"] < steps and not stop_now:
                batches = task.train_batches(
                    epoch=st["epoch"],
                    batch_size=batch_size,
                    seed=int(cfg.seed),
                    rank=env.rank,
                    world_size=env.world_size,
                )
                for i, batch in enumerate(batches):
                    if i < st["batch_in_epoch"]:
                        continue  # consumed before the checkpoint we resumed from
                    batch = task.to_device(batch, device)
                    _sync(device)
                    t0 = time.perf_counter()
                    loss_value = train_step(
                        task,
                        net,
                        optimizer,
                        batch,
                        sampled_fisher=use_sampled,
                        grad_clip=tcfg.get("grad_clip"),
                    )
                    scheduler.step()
                    if env.enabled:  # every rank sees the global mean loss (same stop decisions)
                        loss_value = distributed.mean_scalar(loss_value, env)
                    _sync(device)
                    dt = time.perf_counter() - t0
                    st["train_time_s"] += dt
                    st["time_since_eval"] += dt
                    st["steps_since_eval"] += 1
                    st["step"] += 1
                    st["batch_in_epoch"] = i + 1
                    if progress is not None:
                        progress.update(1)
                        progress.set_postfix(loss=f"{loss_value:.4g}", refresh=False)
                    if not math.isfinite(loss_value):
                        status = "diverged"
                        record["error"] = (
                            f"non-finite training loss {loss_value} at step {st['step']}"
                        )
                        stop_now = True
                        break
                    st["loss_sum"] += loss_value
                    st["loss_count"] += 1
                    if st["step"] % eval_every == 0 or st["step"] == steps:
                        row = evaluate()
                        if any(isinstance(v, float) and not math.isfinite(v) for v in row.values()):
                            status = "diverged"
                            record["error"] = f"non-finite evaluation metric at step {st['step']}"
                            stop_now = True
                            break
                    if ckpt_every and st["step"] % ckpt_every == 0 and st["step"] < steps:
                        save_checkpoint()
                    signalled = stop.signum is not None
                    if env.enabled:  # every rank stops at the same step (collectives inside)
                        signalled = distributed.any_true(signalled, env)
                        if signalled and stop.signum is None:
                            stop.signum = signal.SIGTERM
                    if signalled:
                        save_checkpoint()
                        status = "preempted"
                        record["error"] = f"stopped by signal {stop.signum}; resumable"
                        stop_now = True
                    elif max_time and st["train_time_s"] >= float(max_time):
                        stop_now = True
                    elif stop_at_target and st["steps_to_target"] is not None:
                        stop_now = True
                    if stop_now or st["step"] >= steps:
                        break
                else:
                    st["epoch"] += 1
                    st["batch_in_epoch"] = 0
            if status == "completed" and st["last_eval"].get("step") != st["step"]:
                evaluate()
    except BaseException as exc:
        record["status"] = "failed"
        record["error"] = f"{type(exc).__name__}: {exc}"
        _finish(record, st, task, batch_size, run_dir, env)
        if logger is not None:
            logger.finish(record, exit_code=1)
        raise
    finally:
        if progress is not None:
            progress.close()

    record["status"] = status
    _finish(record, st, task, batch_size, run_dir, env)
    if status in records.TERMINAL and env.is_main:
        ckpt_path.unlink(missing_ok=True)
    if logger is not None:
        logger.finish(record, exit_code=0)
    if status == "preempted":
        stopper.forward()
    return record


def _finish(
    record: dict[str, Any],
    st: dict[str, Any],
    task: Any,
    batch_size: int,
    run_dir: Path,
    env: distributed.DistEnv,
) -> None:
    record.update(
        steps_done=st["step"],
        epochs_done=st["epoch"] + st["batch_in_epoch"] / max(1, task.steps_per_epoch(batch_size)),
        train_time_s=st["train_time_s"],
        mean_step_s=st["train_time_s"] / st["step"] if st["step"] else None,
        steps_to_target=st["steps_to_target"],
        time_to_target_s=st["time_to_target_s"],
        epochs_to_target=st.get("epochs_to_target"),
        final_metrics={k: v for k, v in st["last_eval"].items()},
        best_metrics=dict(st["best"]),
        finished=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    if env.is_main:
        records.write_json(run_dir / records.RECORD, record)
