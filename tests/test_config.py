"""Config schemas, run identity and cheap start-up, in-process (the CLI cases: test_cli.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from ngbench.runners import identity, records
from ngbench.runners.config_check import ConfigError, check_config
from ngbench.tasks.config import TASK_CONFIGS, TaskConfigError, task_config
from omegaconf import OmegaConf


def _resolved(compose, *overrides: str) -> dict:
    c = OmegaConf.to_container(compose(*overrides), resolve=True)
    assert isinstance(c, dict)
    return c


def test_one_neutral_list_feeds_folder_and_hash(compose):
    base = _resolved(compose, "debug=smoke")
    for key, value in (
        ("task.data_root", "/elsewhere"),
        ("train.threads", 3),
        ("train.eval_every", 2),
        ("train.checkpoint_every", 1),
        ("train.progress", True),
        ("runs_root", "/tmp/x"),
        ("objective_metric", "val_loss"),
    ):
        assert identity.is_result_neutral(key)
        assert identity.folder_tag([f"{key}={value}"]) == "default", key
        changed = _resolved(compose, "debug=smoke", f"{key}={value}")
        assert records.config_hash(changed) == records.config_hash(base), key
    for key, value in (("optimizer.lr", 0.5), ("train.steps", 7), ("train.device", "auto")):
        assert identity.folder_tag([f"{key}={value}"]) == f"{key}={value}"
        changed = _resolved(compose, "debug=smoke", f"{key}={value}")
        assert records.config_hash(changed) != records.config_hash(base), key
        assert identity.differences(base, changed) == [
            f"{key}: {OmegaConf.select(OmegaConf.create(base), key)!r} -> {value!r}"
        ]
    # a smoke run is not a real run of the same cell
    real = _resolved(compose)
    assert real["debug_preset"] is None and base["debug_preset"] == "smoke"
    # folder components and Hydra's own keys are not repeated in the tag
    assert identity.folder_tag(["seed=3", "task=resnet", "hydra/launcher=slurm"]) == "default"
    assert identity.folder_tag(["task.flavor=full", "+x=1"]) == "+x=1,task.flavor=full"


def test_task_configs_validate_and_name_their_data():
    assert task_config({"name": "resnet"}).data_name == "mnist_5k"
    assert task_config({"name": "resnet", "flavor": "full"}).data_name == "cifar10"
    assert task_config({"name": "transformer"}).data_name == "numbers_en_de"
    assert task_config({"name": "autoencoder", "dataset": "curves"}).data_name == (
        "mnist_5k_as_curves"
    )
    c = task_config({"name": "autoencoder", "target": {"value": 300.0}})
    assert c.resolved_target is not None and c.resolved_target.as_dict() == {
        "metric": "full_train_loss",
        "value": 300.0,
        "mode": "min",
    }
    with pytest.raises(TaskConfigError, match="did you mean 'task.arch.layers'"):
        task_config({"name": "transformer", "arch": {"layer": 2}})
    with pytest.raises(TaskConfigError, match="did you mean 'task.flavor'"):
        task_config({"name": "resnet", "flavour": "tiny"})
    for cls in TASK_CONFIGS.values():
        assert cls().resolved_target is not None, cls.NAME


def test_check_config_names_full_key_and_closest(compose):
    cfg = _resolved(compose, "debug=smoke")
    check_config(cfg, build=False)
    cfg["train"]["stepz"] = 3
    with pytest.raises(ConfigError, match="did you mean 'train.steps'"):
        check_config(cfg, build=False)
    del cfg["train"]["stepz"]
    cfg["logger"]["projet"] = "x"
    with pytest.raises(ConfigError, match="did you mean 'logger.project'"):
        check_config(cfg, build=False)


def test_cheap_modules_do_not_import_torch():
    code = (
        "import sys, ngbench.runners.cli as c;"
        "import ngbench.tasks.config, ngbench.runners.schema;"
        "import ngbench.runners.identity, ngbench.runners.records;"
        "c.main(['list', 'tasks']); c.main(['--version']);"
        "assert 'torch' not in sys.modules, 'torch imported';"
        "import contextlib;"
        "exec('for h in (\"bench\", \"data\", \"report\"):\\n"
        " with contextlib.suppress(SystemExit): c.main([h, \"--help\"])');"
        "assert 'torch' not in sys.modules, 'torch imported by a --help'"
    )
    repo = Path(__file__).resolve().parent.parent
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=repo)
    assert p.returncode == 0, p.stderr
    assert "mnist_5k" in p.stdout and "ngbench " in p.stdout
    assert "usage: ngbench bench" in p.stdout and "usage: ngbench data" in p.stdout
