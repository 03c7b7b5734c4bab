"""Validate a composed config before any work: every message names the key and the fix."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

from optimizers import make_config

from .schedules import SCHEDULES


class ConfigError(ValueError):
    """A bad config value."""


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _need(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def check_train(train: dict[str, Any]) -> None:
    for key, lo in (
        ("steps", 1),
        ("batch_size", 1),
        ("eval_every", 1),
        ("checkpoint_every", 0),
        ("warmup_steps", 0),
    ):
        v = train.get(key)
        _need(_is_int(v) and v >= lo, f"train.{key} must be an integer >= {lo}, got {v!r}")
    _need(
        train.get("schedule") in SCHEDULES,
        f"train.schedule={train.get('schedule')!r} is not valid; valid choices: "
        + ", ".join(SCHEDULES),
    )
    _need(
        train.get("device") in ("auto", "cpu", "cuda"),
        f"train.device={train.get('device')!r} is not valid; valid choices: auto, cpu, cuda",
    )
    for key in ("grad_clip", "max_time_s"):
        v = train.get(key)
        _need(v is None or (_is_num(v) and v > 0), f"train.{key} must be null or > 0, got {v!r}")
    v = train.get("min_lr_ratio")
    _need(_is_num(v) and 0 <= v <= 1, f"train.min_lr_ratio must be in [0, 1], got {v!r}")
    v = train.get("lr_mult")
    _need(_is_num(v) and v > 0, f"train.lr_mult must be a number > 0, got {v!r}")
    v = train.get("threads")
    _need(v is None or (_is_int(v) and v >= 1), f"train.threads must be null or >= 1, got {v!r}")


def check_optimizer(opt: dict[str, Any]) -> None:
    """Build the optimizer's config dataclass (it names a bad key or value)."""
    make_config(opt)


def check_config(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` (or the task/optimizer config errors) on a bad config."""
    c = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(c, dict)
    _need(
        _is_int(c.get("seed")) and c["seed"] >= 0,
        f"seed must be an integer >= 0, got {c.get('seed')!r}",
    )
    check_train(c["train"])
    check_optimizer(c["optimizer"])
    from tasks import build_task

    task = build_task(cfg.task)  # validates task keys (cheap: data load is lazy)
    t = task.target
    if t.mode not in ("min", "max"):
        raise ConfigError(f"task.target.mode must be min or max, got {t.mode!r}")
