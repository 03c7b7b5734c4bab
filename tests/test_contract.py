"""Every registered task × every registered optimizer: two real steps on the tiny flavor.

Parametrized over the registries, so whatever is registered is tested because it is
registered.  Also: every config file composes and validates.  The optimizers' own conformance
(configs, state dicts, capabilities) is in ``test_conformance.py``.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from ngbench import optimizers, tasks
from ngbench.runners.config_check import check_config
from ngbench.runners.loop import seed_everything, train_step

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
TASKS = tasks.list_tasks()
OPTS = optimizers.list_optimizers()
_TASK_CACHE: dict[str, object] = {}


def _task(compose, name):
    if name not in _TASK_CACHE:
        cfg = compose(f"task={name}", "debug=smoke")
        _TASK_CACHE[name] = (cfg, tasks.build_task(cfg.task))
    return _TASK_CACHE[name]


@pytest.mark.parametrize("opt_name", OPTS)
@pytest.mark.parametrize("task_name", TASKS)
def test_two_steps_every_task_every_optimizer(compose, task_name, opt_name):
    cfg, task = _task(compose, task_name)
    ocfg = compose(f"task={task_name}", f"optimizer={opt_name}", "debug=smoke").optimizer
    seed_everything(0)
    model = task.build_model()
    opt = optimizers.build_optimizer(dict(ocfg), model)
    spec = optimizers.get_spec(opt_name)
    before = [p.detach().clone() for p in model.parameters()]
    batches = task.train_batches(epoch=0, batch_size=int(cfg.train.batch_size), seed=0)
    for _ in range(2):
        loss = train_step(task, model, opt, next(batches), sampled_fisher=spec.sampled_fisher)
        assert math.isfinite(loss), (task_name, opt_name, loss)
    changed = [
        not torch.equal(a, p.detach()) for a, p in zip(before, model.parameters(), strict=True)
    ]
    assert any(changed), f"{opt_name} did not change any parameter of {task_name}"
    assert all(math.isfinite(float(p.detach().abs().sum())) for p in model.parameters())


@pytest.mark.parametrize("task_name", TASKS)
def test_every_task_config_composes_and_validates(compose, task_name):
    cfg = compose(f"task={task_name}")
    check_config(cfg)
    t = tasks.build_task(cfg.task)
    assert t.target.metric in t.metric_modes, (t.target.metric, dict(t.metric_modes))
    assert t.target.mode == t.metric_modes[t.target.metric]


@pytest.mark.parametrize(
    "group,name",
    sorted(
        (p.parent.name, p.stem)
        for sub in ("tuned", "experiment", "sweep", "logger")
        for p in (CONFIGS / sub).glob("*.yaml")
    ),
)
def test_every_group_config_file_composes(compose, group, name):
    if group == "tuned":
        task, opt = name.split("_", 1)
        cfg = compose(f"task={task}", f"optimizer={opt}")
    else:
        cfg = compose(f"{group}={name}", "debug=smoke")
    check_config(cfg)
