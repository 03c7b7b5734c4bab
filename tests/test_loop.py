"""The training loop in-process: divergence, target detection, resume after a kill."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from ngbench.runners import loop, records
from omegaconf import OmegaConf


def _cfg(compose, *overrides):
    cfg = compose("debug=smoke", *overrides)
    OmegaConf.set_struct(cfg, False)
    return cfg


def test_diverging_run_is_recorded_not_raised(compose, tmp_path):
    cfg = _cfg(
        compose, "optimizer=sgd", "optimizer.lr=50.0", "train.steps=30", "train.eval_every=10"
    )
    rec = loop.train(cfg, tmp_path / "run")
    assert rec["status"] == "diverged"
    assert "non-finite" in rec["error"]
    assert rec["steps_done"] < 30
    on_disk = json.loads((tmp_path / "run" / "record.json").read_text())
    assert on_disk["status"] == "diverged"


def test_target_detection_records_first_eval_reaching_it(compose, tmp_path):
    cfg = _cfg(
        compose,
        "optimizer=adamw",
        "train.steps=40",
        "train.eval_every=5",
        "task.target.value=300.0",
    )
    rec = loop.train(cfg, tmp_path / "run")
    rows = records.read_metrics(tmp_path / "run" / "metrics.jsonl")
    first = next(r for r in rows if r["full_train_loss"] <= 300.0)
    assert rec["steps_to_target"] == first["step"]
    assert rec["time_to_target_s"] == pytest.approx(first["train_time_s"])
    assert all(r["full_train_loss"] > 300.0 for r in rows if r["step"] < first["step"])


def test_killed_run_resumes_to_the_same_result(compose, tmp_path, monkeypatch):
    over = (
        "optimizer=adamw",
        "train.steps=24",
        "train.eval_every=4",
        "train.checkpoint_every=5",
        "train.batch_size=500",
    )  # 8 batches per epoch: the kill lands mid-epoch 1
    ref = loop.train(_cfg(compose, *over), tmp_path / "ref")

    # kill at step 13 (after the checkpoint at step 10, with rows 12 already written)
    real_step = torch.optim.AdamW.step
    calls = {"n": 0}

    def dying_step(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 13:
            raise RuntimeError("simulated crash")
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", dying_step)
    with pytest.raises(RuntimeError, match="simulated crash"):
        loop.train(_cfg(compose, *over), tmp_path / "run")
    monkeypatch.setattr(torch.optim.AdamW, "step", real_step)
    rec = json.loads((tmp_path / "run" / "record.json").read_text())
    assert rec["status"] == "failed" and rec["error"] == "RuntimeError: simulated crash"
    assert (tmp_path / "run" / "checkpoint.pt").exists()
    assert (tmp_path / "run" / "checkpoint.prev.pt").exists()  # the generation before

    rec = loop.train(_cfg(compose, *over), tmp_path / "run")
    assert rec["status"] == "completed" and rec["resumed"]
    rows = records.read_metrics(tmp_path / "run" / "metrics.jsonl")
    ref_rows = records.read_metrics(tmp_path / "ref" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [r["step"] for r in ref_rows]
    for a, b in zip(rows, ref_rows, strict=True):
        assert a["full_train_loss"] == b["full_train_loss"]
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-12)
    assert rec["final_metrics"]["val_loss"] == ref["final_metrics"]["val_loss"]


def test_resume_with_other_world_size_is_refused(compose, tmp_path, monkeypatch):
    over = ("train.steps=10", "train.checkpoint_every=4")
    run = tmp_path / "run"
    real = loop.train
    cfg = _cfg(compose, *over)
    calls = {"n": 0}
    real_step = torch.optim.SGD.step

    def dying_step(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.SGD, "step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        real(cfg, run)
    monkeypatch.setattr(torch.optim.SGD, "step", real_step)
    ck = torch.load(run / "checkpoint.pt", weights_only=False)
    ck["world_size"] = 2
    torch.save(ck, run / "checkpoint.pt")
    with pytest.raises(ValueError, match="world size 2"):
        real(cfg, run)


def test_sigterm_checkpoints_and_marks_preempted(compose, tmp_path, monkeypatch):
    import os
    import signal

    cfg = _cfg(compose, "train.steps=20", "train.checkpoint_every=0")
    real_step = torch.optim.SGD.step
    calls = {"n": 0}

    def step(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 7:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.SGD, "step", step)
    rec = loop.train(cfg, tmp_path / "run")
    assert rec["status"] == "preempted" and rec["steps_done"] == 7
    assert (tmp_path / "run" / "checkpoint.pt").exists()
    monkeypatch.setattr(torch.optim.SGD, "step", real_step)
    rec = loop.train(cfg, tmp_path / "run")
    assert rec["status"] == "completed" and rec["steps_done"] == 20


def test_every_parameter_in_exactly_one_group():
    from ngbench.optimizers.param_groups import assert_partition, split_decay_groups
    from ngbench.tasks.autoencoder import Autoencoder

    model = torch.nn.Sequential(Autoencoder([20, 8, 4]), torch.nn.LayerNorm(20))
    groups = split_decay_groups(model, 0.1)
    decay = {id(p) for p in groups[0]["params"]}
    for name, p in model.named_parameters():
        assert (id(p) in decay) == (name.endswith("weight") and p.ndim == 2), name
    with pytest.raises(AssertionError, match="in none"):
        assert_partition(model, [{"params": groups[0]["params"]}])
    with pytest.raises(AssertionError, match="in two groups"):
        assert_partition(model, groups + [{"params": groups[1]["params"][:1]}])


def test_run_folder_listing_ignores_hydra_and_wandb(tmp_path: Path):
    run = tmp_path / "a" / "seed0"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text("x: 1\n")
    (run / "config.yaml").write_text("x: 1\n")
    assert records.find_run_folders(tmp_path) == [run]


def test_failure_during_set_up_is_recorded_with_the_reason(compose, tmp_path, monkeypatch):
    why = "wandb: no API key; run `wandb login` or set logger.mode=offline"

    def no_login(*a, **k):
        raise RuntimeError(why)

    monkeypatch.setattr(loop, "make_logger", no_login)
    with pytest.raises(RuntimeError, match="no API key"):
        loop.train(_cfg(compose, "train.steps=4"), tmp_path / "run")
    rec = json.loads((tmp_path / "run" / "record.json").read_text())
    assert rec["status"] == "failed" and rec["finished"]
    assert (
        rec["error"]
        == "RuntimeError: wandb: no API key; run `wandb login` or set logger.mode=offline"
    )
    assert not (tmp_path / "run" / "run.lock").exists()  # the folder is free again


def test_second_ctrl_c_aborts_at_once_and_is_recorded(compose, tmp_path, monkeypatch):
    import os
    import signal

    real_step = torch.optim.SGD.step
    calls = {"n": 0}

    def step(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            os.kill(os.getpid(), signal.SIGINT)  # the loop would stop after this step...
            os.kill(os.getpid(), signal.SIGINT)  # ...but a second Ctrl-C aborts inside it
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.SGD, "step", step)
    # Python's default handler, or SIG_IGN when the test process was started in the background
    # by a non-interactive shell (`cmd &` ignores SIGINT): the loop must put back what it found
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        loop.train(_cfg(compose, "train.steps=20", "train.checkpoint_every=0"), tmp_path / "run")
    rec = json.loads((tmp_path / "run" / "record.json").read_text())
    assert rec["status"] == "interrupted" and rec["error"].startswith("aborted by Ctrl-C at step 2")
    assert not (tmp_path / "run" / "checkpoint.pt").exists()  # aborted: no new checkpoint
    assert signal.getsignal(signal.SIGINT) is before  # handler restored
