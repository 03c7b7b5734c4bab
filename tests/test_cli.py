"""The real ``ngbench`` CLI on the tiny flavor: run folders, record schema, errors, reruns."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from ngbench.runners.records import read_metrics
from ngbench.tasks.config import TASK_CONFIGS, TaskConfigError, task_config

RECORD_KEYS = {
    "task",
    "optimizer",
    "seed",
    "status",
    "target",
    "steps_to_target",
    "time_to_target_s",
    "final_metrics",
    "best_metrics",
    "git",
    "packages",
    "hardware",
    "world_size",
}
ROW_KEYS = {"step", "epoch", "train_time_s", "train_loss"}


def _run_dir(tmp: Path, opt: str = "sgd", tag: str = "default", seed: int = 0) -> Path:
    """A debug=smoke run's folder (debug presets live under runs/debug/<preset>/)."""
    return (
        tmp / "runs" / "debug" / "smoke" / "autoencoder_mnist_5k_tiny" / opt / tag / f"seed{seed}"
    )


def test_train_smoke_writes_run_folder(ngbench, tmp_path):
    p = ngbench("train", "task=autoencoder", "optimizer=adamw", "debug=smoke", "seed=3")
    assert p.returncode == 0, p.stderr
    run = _run_dir(tmp_path, "adamw", seed=3)
    assert {"config.yaml", "metrics.jsonl", "record.json"} <= {f.name for f in run.iterdir()}
    rec = json.loads((run / "record.json").read_text())
    assert RECORD_KEYS <= set(rec)
    assert rec["status"] == "completed" and rec["seed"] == 3 and rec["optimizer"] == "adamw"
    assert rec["steps_done"] == 6 and rec["world_size"] == 1
    assert rec["packages"]["torch"] and rec["hardware"]["cpu_count"] >= 1
    assert rec["target"] == {
        "metric": "full_train_loss",
        "value": rec["target"]["value"],
        "mode": "min",
    }
    rows = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == [3, 6]  # debug=smoke: eval every 3 of 6 steps
    for r in rows:
        assert ROW_KEYS | {"full_train_loss", "val_loss"} <= set(r)
    assert rows[1]["train_time_s"] > rows[0]["train_time_s"] > 0
    assert rec["final_metrics"]["full_train_loss"] == rows[-1]["full_train_loss"]
    assert rec["best_metrics"]["val_loss"] == min(r["val_loss"] for r in rows)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["optimizer"]["name"] == "adamw" and cfg["seed"] == 3
    assert cfg["task"]["data_root"] and "${" not in (run / "config.yaml").read_text()
    # checkpoint removed once the run is finished
    assert not (run / "checkpoint.pt").exists()


def test_completed_run_is_not_overwritten(ngbench, tmp_path):
    assert ngbench("train", "debug=smoke").returncode == 0
    rec_path = _run_dir(tmp_path) / "record.json"
    before = rec_path.read_text()
    p = ngbench("train", "debug=smoke")
    assert p.returncode == 0
    assert "already holds a completed run" in p.stderr and "skipped" in p.stderr
    assert rec_path.read_text() == before
    # a result-neutral key is in neither the folder nor the hash: the same run, skipped
    p = ngbench("train", "debug=smoke", "train.eval_every=2", "train.threads=1", "logger=none")
    assert p.returncode == 0 and "skipped" in p.stderr, p.stderr
    # same folder, different config: refused, naming the key and both values
    p = ngbench(
        "train",
        "debug=smoke",
        f"hydra.run.dir={_run_dir(Path('.'))}",
        "optimizer.momentum=0.5",
    )
    assert p.returncode == 2 and "different config" in p.stderr
    assert "optimizer.momentum: 0.9 -> 0.5" in p.stderr, p.stderr
    assert rec_path.read_text() == before


def test_override_goes_into_folder_name_and_sweep(ngbench, tmp_path):
    p = ngbench("train", "-m", "debug=smoke", "optimizer=sgd", "optimizer.lr=0.001,0.002")
    assert p.returncode == 0, p.stderr
    for lr in ("0.001", "0.002"):
        rec = json.loads((_run_dir(tmp_path, tag=f"optimizer.lr={lr}") / "record.json").read_text())
        assert rec["hparams"]["lr"] == float(lr)


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["optimizer=nope"], ["optimizer", "nope", "adamw", "sgd"]),
        (["task=nope"], ["task", "nope", "autoencoder"]),
        (["optimizer.lr=-1"], ["optimizer.lr", ">= 0"]),
        (["train.steps=abc"], ["train.steps", "Integer"]),
        (["optimizer.momentum=fast"], ["optimizer.momentum", "Float"]),
        (["+optimizer.betas=3"], ["optimizer.betas", "valid keys", "momentum"]),
        # unknown keys with or without +, at any level: the full key and the closest valid one
        (["+train.step=10"], ["'train.step' is not a valid key", "did you mean 'train.steps'"]),
        (["+train.stepz=10"], ["'train.stepz'", "did you mean 'train.steps'"]),
        (["train.stepz=10"], ["'train.stepz'", "did you mean 'train.steps'"]),
        (["task.flavour=tiny"], ["'task.flavour'", "did you mean 'task.flavor'"]),
        (["+nosuch=1"], ["'nosuch' is not a valid key", "runs_root"]),
        (["+task.flavour=tiny"], ["'task.flavour'", "did you mean 'task.flavor'"]),
        (["+logger.projet=x"], ["'logger.projet'", "did you mean 'logger.project'"]),
        (["optimizer=sgd", "optimizer.momentum=2"], ["optimizer.momentum", "[0, 1)"]),
        (["seed=-1"], ["seed", ">= 0"]),
        (["train.schedule=zigzag"], ["train.schedule", "cosine"]),
        (["task.dataset=cifar"], ["task.dataset", "mnist", "curves", "faces"]),
    ],
)
def test_bad_config_fails_before_training_with_clear_message(ngbench, tmp_path, args, needles):
    p = ngbench("train", "debug=smoke", *args)
    assert p.returncode != 0
    err = p.stderr
    assert "Traceback" not in err
    for n in needles:
        assert n in err, err
    assert not (tmp_path / "runs").exists()  # refused before any folder is made


def test_multirun_checks_every_cell_before_the_first(ngbench, tmp_path):
    # the second optimizer has no such key: nothing runs, no folder is made
    p = ngbench("train", "-m", "debug=smoke", "optimizer=sgd,adamw", "optimizer.nesterov=true")
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "optimizer=adamw" in p.stderr and "optimizer.nesterov" in p.stderr, p.stderr
    assert not (tmp_path / "runs").exists()


def test_smoke_and_real_runs_live_apart(ngbench, tmp_path):
    p = ngbench("train", "debug=smoke", "--cfg", "job")
    assert p.returncode == 0 and "debug_preset: smoke" in p.stdout
    p = ngbench("train", "--cfg", "job")
    assert p.returncode == 0 and "debug_preset: null" in p.stdout
    p = ngbench("train", "debug=smoke")
    assert p.returncode == 0, p.stderr
    (run,) = (tmp_path / "runs").rglob("record.json")
    assert run.parent == _run_dir(tmp_path)
    # a real run of the same cell would use runs/autoencoder_mnist_5k_tiny/...: a fresh folder
    p = ngbench("train", "train.steps=2", "train.eval_every=2", "train.progress=false")
    assert p.returncode == 0, p.stderr
    real = tmp_path / "runs" / "autoencoder_mnist_5k_tiny" / "sgd" / "train.steps=2" / "seed0"
    assert (real / "record.json").exists()


def test_honest_data_names_in_folders(ngbench, tmp_path):
    for task, data in (("resnet", "mnist_5k"), ("transformer", "numbers_en_de")):
        p = ngbench("train", f"task={task}", "debug=smoke", "train.steps=1", "train.eval_every=1")
        assert p.returncode == 0, p.stderr
        assert (tmp_path / "runs" / "debug" / "smoke" / f"{task}_{data}_tiny").is_dir()


def test_missing_full_dataset_names_path_and_fix(ngbench, tmp_path):
    p = ngbench(
        "train",
        "task.flavor=full",
        "task.dataset=curves",
        "train.steps=2",
        f"task.data_root={tmp_path / 'nodata'}",
    )
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert str(tmp_path / "nodata") in p.stderr and "digs3pts_1.mat" in p.stderr
    assert "ngbench data curves" in p.stderr


def test_list_and_data_and_help(ngbench, tmp_path):
    p = ngbench("list", "optimizers")
    assert p.returncode == 0 and "sgd" in p.stdout and "adamw" in p.stdout
    p = ngbench("list", "tasks")
    assert p.returncode == 0 and "autoencoder" in p.stdout and "full_train_loss" in p.stdout
    p = ngbench("data", "mnist_5k")
    assert p.returncode == 0 and "4000 train" in p.stdout
    # every data set `list tasks` prints is accepted by `ngbench data` and by task.dataset=
    listing = ngbench("list", "tasks").stdout
    choices = ngbench("data", "nonexistent").stderr
    for name, cls in TASK_CONFIGS.items():
        assert f"datasets={','.join(cls.DATASETS)}" in listing, (name, listing)
        for d in cls.DATASETS:
            assert d in choices
            models = ("ncf", "dlrm") if name == "recommender" else (None,)
            ok = []
            for m in models:
                try:
                    task_config(
                        {"name": name, "dataset": d, "flavor": "full"} | ({"model": m} if m else {})
                    )
                    ok.append(m)
                except TaskConfigError:
                    pass
            assert ok, (name, d)
    p = ngbench("data", "nonexistent")
    assert p.returncode == 2 and "valid choices" in p.stderr
    for sub in ("report", "list", "data", "train", "leaderboard", "scaling"):
        p = ngbench(sub, "--help")
        assert p.returncode == 0 and "usage" in p.stdout.lower(), sub
    p = ngbench("leaderboard", "plan", "--workloads", "dlrm", "--optimizers", "adamw",
                "--trials", "2", "--runs-root", str(tmp_path / "lb"), "--out",
                str(tmp_path / "lb_out"))
    assert p.returncode == 0 and "tune          2 runs to do" in p.stdout, p.stdout + p.stderr
    assert ngbench("frobnicate").returncode == 2
    p = ngbench("--version")
    assert p.returncode == 0 and p.stdout.startswith("ngbench ")
    p = ngbench("train", "--help")  # every config group with its choices
    for line in ("task: autoencoder, recommender, resnet", "debug: smoke", "logger: none, wandb"):
        assert line in p.stdout, p.stdout
    assert "optimizer: adamw" in p.stdout and "experiment: mbf_autoencoder_curves" in p.stdout
