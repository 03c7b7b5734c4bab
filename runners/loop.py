"""The training loop: one function, read top to bottom.

``train(cfg, run_dir)`` builds the task, model and optimizer from a resolved config,
trains for ``train.steps`` optimizer steps with periodic evaluation, and writes the run
folder (``config.yaml``, ``metrics.jsonl``, ``record.json``, ``checkpoint.pt``).

* One process at a time owns a run folder (:mod:`runners.lock`); a finished run is never
  redone or overwritten (:func:`runners.state.check_existing`).
* The training clock (``train_time_s``) counts only training steps, never evaluation,
  and synchronizes CUDA before reading the time.
* A NaN/Inf loss ends the run cleanly with status ``diverged``.
* The first evaluation at which the task's target is met gives ``steps_to_target`` and
  ``time_to_target_s``.
* A checkpoint every ``train.checkpoint_every`` steps holds everything needed to resume
  bit-for-bit (:mod:`runners.checkpoint`). SIGTERM/SIGUSR1/SIGUSR2 checkpoint and stop with
  status ``preempted``, Ctrl-C with status ``interrupted`` (a second Ctrl-C aborts at once).
* Whatever goes wrong after the folder is owned, set-up included, ends in ``record.json`` as
  ``failed`` with the reason (:class:`runners.state.RunRecord`).
"""

from __future__ import annotations

import contextlib
import math
import random
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, cast

import numpy as np
import torch
from ngbench.optimizers import build_optimizer, get_spec
from ngbench.optimizers.capabilities import Instrumented, SampledFisher, SplitState
from ngbench.tasks import build_task
from omegaconf import DictConfig, OmegaConf

from . import distributed, lock, records
from .checkpoint import Checkpointer
from .schedules import build_scheduler
from .state import RunAlreadyDone, RunConflict, RunRecord, RunState, check_existing
from .wandb_log import make_logger

__all__ = ["RunAlreadyDone", "RunConflict", "check_existing", "evaluate", "stop_reason", "train"]


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


class _StopSignal:
    """Turns SIGINT (Ctrl-C), SIGTERM, SIGUSR1 and SIGUSR2 into a flag the loop reads between
    steps; a second Ctrl-C raises KeyboardInterrupt at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _StopSignal:
        for s in self.SIGNALS:
            try:
                self._old[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT == self.signum:
            raise KeyboardInterrupt("second Ctrl-C")
        self.signum = signum

    def __exit__(self, *exc: Any) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)

    def received(self, env: distributed.DistEnv) -> int | None:
        """The signal received, agreed by every rank (collective under DDP: all stop together)."""
        if env.enabled and distributed.any_true(self.signum is not None, env):
            self.signum = self.signum or signal.SIGTERM
        return self.signum

    def forward(self) -> None:
        """After the checkpoint is safe, hand the signal to whoever handled it before us
        (submitit's handler requeues the SLURM job and exits)."""
        old = self._old.get(self.signum) if self.signum is not None else None
        if callable(old) and self.signum != signal.SIGINT:
            old(self.signum, None)


@dataclass(frozen=True)
class Capabilities:
    """What the loop may ask of an optimizer beyond ``torch.optim.Optimizer``."""

    sampled_fisher: bool  # an extra backward against labels sampled from the model (MC Fisher)
    phase_times: Callable[[], dict[str, float]] | None  # cumulative seconds per phase
    split_state: bool  # state split over ranks: gathered on rank 0 before a checkpoint


def capabilities(spec: Any, optimizer: Any) -> Capabilities:
    """The one place that asks: the registry's flags and the optimizer's protocols
    (:mod:`optimizers.capabilities`), never its name."""
    return Capabilities(
        sampled_fisher=bool(spec.sampled_fisher) and isinstance(optimizer, SampledFisher),
        phase_times=optimizer.phase_times if isinstance(optimizer, Instrumented) else None,
        split_state=isinstance(optimizer, SplitState),
    )


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
    wants = isinstance(optimizer, SampledFisher) and optimizer.needs_sampled_backward()
    if sampled_fisher and wants:
        sampled = task.sampled_loss(outputs)
        if sampled is not None:
            # under DDP the sampled-label gradients must not be all-reduced: they are discarded
            no_sync = getattr(model, "no_sync", contextlib.nullcontext)
            # `wants` holds only for a SampledFisher; the bool loses that narrowing
            with no_sync(), cast(SampledFisher, optimizer).sampled_backward():
                sampled.backward(retain_graph=True)
    loss.backward()
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), float(grad_clip))
    optimizer.step()
    return float(loss.detach())


def optimizer_config(cfg: DictConfig) -> dict[str, Any]:
    """The optimizer's effective hyperparameters (``optimizer.lr`` times ``train.lr_mult``)."""
    # a config's keys are strings
    opt_cfg = cast(dict[str, Any], OmegaConf.to_container(cfg.optimizer, resolve=True))
    assert isinstance(opt_cfg, dict)
    lr_mult = float(cfg.train.get("lr_mult", 1.0))
    if "lr" in opt_cfg and lr_mult != 1.0:
        opt_cfg["lr"] = float(opt_cfg["lr"]) * lr_mult
    return opt_cfg


@dataclass(frozen=True)
class Parts:
    """What set-up builds once."""

    task: Any
    model: torch.nn.Module  # the bare model: the optimizer hooks its modules
    net: torch.nn.Module  # what forward/backward run through (DDP when world_size > 1)
    optimizer: Any
    scheduler: Any
    spec: Any  # the optimizer's registry entry
    caps: Capabilities


def build(
    cfg: DictConfig, opt_cfg: dict[str, Any], env: distributed.DistEnv, device: torch.device
) -> Parts:
    """Task, model, optimizer and schedule from the config (seeded before: same on every rank)."""
    task = build_task(cfg.task)
    model = task.build_model().to(device)
    net = distributed.wrap_model(model, env, device)
    optimizer = build_optimizer(opt_cfg, model)
    scheduler = build_scheduler(
        optimizer,
        str(cfg.train.schedule),
        total_steps=int(cfg.train.steps),
        warmup_steps=int(cfg.train.warmup_steps),
        min_ratio=float(cfg.train.min_lr_ratio),
    )
    spec = get_spec(str(opt_cfg["name"]))
    return Parts(task, model, net, optimizer, scheduler, spec, capabilities(spec, optimizer))


def batches_from(
    task: Any,
    state: RunState,
    *,
    batch_size: int,
    seed: int,
    env: distributed.DistEnv,
    device: torch.device,
) -> Iterator[Any]:
    """Training batches from where ``state`` stands, epoch after epoch (a resumed run skips
    what it consumed before its checkpoint); ``state.epoch``/``batch_in_epoch`` follow along."""
    while True:
        epoch = task.train_batches(
            epoch=state.epoch,
            batch_size=batch_size,
            seed=seed,
            rank=env.rank,
            world_size=env.world_size,
        )
        for i, batch in enumerate(epoch):
            if i >= state.batch_in_epoch:
                state.batch_in_epoch = i + 1
                yield task.to_device(batch, device)
        state.epoch, state.batch_in_epoch = state.epoch + 1, 0


def evaluate(
    run: Parts, state: RunState, *, env: distributed.DistEnv, device: torch.device, batch_size: int
) -> dict[str, Any]:
    """Evaluate (on rank 0; every rank gets the result), fold it into ``state``, return the
    ``metrics.jsonl`` row."""
    task, model = run.task, run.model
    was_training = model.training
    model.eval()
    metrics = task.evaluate(model, device) if env.is_main else {}
    metrics = distributed.broadcast_object(metrics, env)  # all ranks agree on target/stop
    model.train(was_training)
    row: dict[str, Any] = {
        "step": state.step,
        "epoch": state.epochs(task.steps_per_epoch(batch_size)),
        "train_time_s": state.train_time_s,
        "train_loss": state.loss_sum / max(1, state.loss_count),
        "lr": run.optimizer.param_groups[0]["lr"],
        "step_time_s": state.time_since_eval / max(1, state.steps_since_eval),
        **{k: float(v) for k, v in metrics.items()},
    }
    if run.caps.phase_times is not None:
        row.update(state.phase_rates(dict(run.caps.phase_times())))
    state.after_eval(row, metrics, modes=task.metric_modes, target=task.target)
    return row


class Stop(NamedTuple):
    status: str  # completed | diverged | preempted | interrupted
    error: str | None = None


def stop_reason(
    state: RunState,
    *,
    loss: float,
    row: dict[str, Any] | None,
    signum: int | None,
    steps: int,
    max_time_s: float | None,
    stop_at_target: bool,
) -> Stop | None:
    """Why the run ends after this step, or None to go on. Divergence first; a run that has
    just taken its last step is completed even if a signal came during that step."""
    if not math.isfinite(loss):
        return Stop("diverged", f"non-finite training loss {loss} at step {state.step}")
    if row and any(isinstance(v, float) and not math.isfinite(v) for v in row.values()):
        return Stop("diverged", f"non-finite evaluation metric at step {state.step}")
    if state.step >= steps:
        return Stop("completed")
    if signum == signal.SIGINT:
        return Stop("interrupted", f"interrupted by Ctrl-C at step {state.step}; resumable")
    if signum is not None:
        return Stop("preempted", f"stopped by {signal.Signals(signum).name}; resumable")
    if max_time_s and state.train_time_s >= max_time_s:
        return Stop("completed")
    if stop_at_target and state.steps_to_target is not None:
        return Stop("completed")
    return None


class _Progress:
    """A tqdm bar on stderr (rank 0, ``train.progress``), or nothing."""

    def __init__(self, enabled: bool, *, total: int, initial: int, desc: str) -> None:
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, leave=False)

    def update(self, loss: float) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.4g}", refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _set_up_torch(cfg: DictConfig) -> None:
    if cfg.train.get("threads"):
        torch.set_num_threads(int(cfg.train.threads))
    if cfg.train.get("deterministic"):
        torch.use_deterministic_algorithms(True)
    seed_everything(int(cfg.seed))


def _say(env: distributed.DistEnv, message: str) -> None:
    if env.is_main:
        print(f"ngbench: {message}", file=sys.stderr)


def train(cfg: DictConfig, run_dir: Path, *, preset: str | None = None) -> dict[str, Any]:
    """Run one training job into ``run_dir`` and return its record.

    ``preset`` is the optimizer config file chosen (``optimizer=<preset>``) when it differs
    from the registry name (e.g. ``ngplus_resnet50`` for ``ngplus``); it labels the run."""
    run_dir, tcfg = Path(run_dir), cfg.train
    steps, batch_size, eval_every = int(tcfg.steps), int(tcfg.batch_size), int(tcfg.eval_every)
    ckpt_every = int(tcfg.checkpoint_every or 0)
    device = pick_device(str(tcfg.device))
    env = distributed.init(device.type)
    _set_up_torch(cfg)
    state, opt_cfg, stop = RunState(), optimizer_config(cfg), _StopSignal()
    owned = lock.hold(
        run_dir,
        slurm_job=distributed.slurm_job_label(),
        owner=env.is_main,
        share=lambda x: distributed.broadcast_object(x, env),
    )
    record = RunRecord(cfg, run_dir, env, state, preset=preset, hparams=opt_cfg, device=device)
    with contextlib.ExitStack() as stack:
        stack.enter_context(owned)
        stack.enter_context(record)
        run = build(cfg, opt_cfg, env, device)
        ckpt = Checkpointer(
            run_dir,
            env,
            model=run.model,
            optimizer=run.optimizer,
            scheduler=run.scheduler,
            state=state,
            consolidate=run.caps.split_state,
            config_hash=record.cfg_hash,
        )
        if resumed := ckpt.resume(device):
            _say(env, f"resuming from step {state.step} of {steps} ({run_dir})")
        record.describe(task=run.task, optimizer=run.spec.name, resumed=resumed)
        if env.is_main and (logger := make_logger(cfg, run_dir, resume_id=state.wandb_id)):
            record.logger, state.wandb_id = logger, logger.run_id
        batches = batches_from(
            run.task, state, batch_size=batch_size, seed=int(cfg.seed), env=env, device=device
        )
        desc, show = f"{run.task.name}/{run.spec.name}", bool(tcfg.progress) and env.is_main
        progress = _Progress(show, total=steps, initial=state.step, desc=desc)
        end = Stop("completed") if state.step >= steps else None
        run.model.train()
        stack.enter_context(stop)  # from here on a signal ends the loop after the current step
        stack.callback(progress.close)
        while end is None:
            batch = next(batches)
            _sync(device)
            t0 = time.perf_counter()
            loss = train_step(
                run.task,
                run.net,
                run.optimizer,
                batch,
                sampled_fisher=run.caps.sampled_fisher,
                grad_clip=tcfg.get("grad_clip"),
            )
            run.scheduler.step()
            loss = distributed.mean_scalar(loss, env)  # all ranks: same stop decisions
            _sync(device)
            state.after_step(loss, time.perf_counter() - t0)
            progress.update(loss)
            row = None
            if math.isfinite(loss) and (state.step % eval_every == 0 or state.step == steps):
                row = evaluate(run, state, env=env, device=device, batch_size=batch_size)
                record.log(row)
            end = stop_reason(
                state,
                loss=loss,
                row=row,
                signum=stop.received(env),
                steps=steps,
                max_time_s=tcfg.get("max_time_s"),
                stop_at_target=bool(tcfg.get("stop_at_target")),
            )
            if end is None and ckpt_every and state.step % ckpt_every == 0:
                ckpt.save()
        if end.status in ("preempted", "interrupted"):
            ckpt.save()
        if end.status == "completed" and state.last_eval.get("step") != state.step:
            record.log(evaluate(run, state, env=env, device=device, batch_size=batch_size))
        record.finish(end.status, end.error)
        if end.status in records.TERMINAL:
            ckpt.discard()
    if end.status == "preempted":
        stop.forward()
    return record.data
