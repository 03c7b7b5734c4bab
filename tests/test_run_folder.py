"""A run folder under stress, through the real ``ngbench`` CLI: a second launch, a dead lock
holder, Ctrl-C, torn checkpoints, a missing data set, file modes; and the lock's rules in-process.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from conftest import _env
from ngbench.runners.lock import Holder, RunLock, RunLocked
from ngbench.runners.records import read_json, read_metrics


def _launch(cwd: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "ngbench.runners.cli", *args],
        cwd=cwd,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for(find: Callable[[], Path | None], proc: subprocess.Popen[str]) -> Path:
    deadline = time.time() + 120
    while time.time() < deadline:
        found = find()
        if found is not None:
            return found
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.01)
    raise AssertionError("timed out")


def _first(root: Path, name: str) -> Path | None:
    hits = [p for p in root.rglob(name) if p.stat().st_size > 0] if root.exists() else []
    return hits[0] if hits else None


@contextmanager
def _umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def _modes(run: Path, *names: str) -> dict[str, int]:
    return {n: stat.S_IMODE((run / n).stat().st_mode) for n in names}


@pytest.mark.slow
def test_second_launch_refused_then_ctrl_c_checkpoints_and_resumes(ngbench, tmp_path):
    args = ("train", "debug=smoke", "train.steps=600", "train.eval_every=10")
    args += ("train.checkpoint_every=0",)  # Ctrl-C alone writes the checkpoint
    with _umask(0o022):
        first = _launch(tmp_path, *args)
        run = _wait_for(lambda: _first(tmp_path / "runs", "metrics.jsonl"), first).parent
        first.send_signal(signal.SIGSTOP)  # frozen mid-run, still holding the folder
        try:
            second = ngbench(*args)
        finally:
            first.send_signal(signal.SIGINT)  # delivered on SIGCONT, inside the loop
            first.send_signal(signal.SIGCONT)
        _, err = first.communicate(timeout=120)
        # the second launch refused at once, naming the holder
        assert second.returncode == 2, second.stderr[-2000:]
        holder = f"in use by pid {first.pid} on host {socket.gethostname()}"
        assert holder in second.stderr and "Traceback" not in second.stderr
        # Ctrl-C: one line, status interrupted, a checkpoint, files readable by the group
        assert first.returncode == 130, err
        (line,) = err.strip().splitlines()
        assert line.startswith("interrupted: autoencoder/sgd seed 0 at step ")
        rec = read_json(run / "record.json")
        assert rec["status"] == "interrupted" and 10 <= rec["steps_done"] < 600, rec
        names = ("config.yaml", "record.json", "metrics.jsonl", "checkpoint.pt")
        assert _modes(run, *names) == dict.fromkeys(names, 0o644)
        # the same command resumes and says so
        third = ngbench(*args)
    assert third.returncode == 0, third.stderr[-3000:]
    assert f"resuming from step {rec['steps_done']} of 600" in third.stderr
    rec = read_json(run / "record.json")
    assert rec["status"] == "completed" and rec["resumed"] and rec["steps_done"] == 600
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == list(range(10, 601, 10))
    assert not (run / "run.lock").exists() and not (run / "checkpoint.pt").exists()


@pytest.mark.slow
def test_dead_holder_taken_over_and_torn_checkpoint_falls_back(ngbench, tmp_path):
    args = ("train", "debug=smoke", "train.steps=300", "train.eval_every=10")
    args += ("train.checkpoint_every=20",)
    first = _launch(tmp_path, *args)
    prev = _wait_for(lambda: _first(tmp_path / "runs", "checkpoint.prev.pt"), first)
    run = prev.parent
    while True:  # stop it between two saves (both generations on disk)
        first.send_signal(signal.SIGSTOP)
        if (run / "checkpoint.pt").exists():
            break
        first.send_signal(signal.SIGCONT)
        time.sleep(0.005)
    first.kill()  # SIGKILL: no clean-up, the lock file names a dead process
    first.communicate()
    prev_step = torch.load(prev, weights_only=False)["loop"]["step"]
    data = (run / "checkpoint.pt").read_bytes()
    (run / "checkpoint.pt").write_bytes(data[: len(data) // 2])  # torn
    assert json.loads((run / "run.lock").read_text())["pid"] == first.pid
    with _umask(0o027):
        p = ngbench(*args)
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"its lock was left by pid {first.pid}" in p.stderr and "no longer running" in p.stderr
    assert "warning: checkpoint.pt is unreadable" in p.stderr
    assert f"falling back to checkpoint.prev.pt (step {prev_step})" in p.stderr
    assert f"resuming from step {prev_step} of 300" in p.stderr
    rec = read_json(run / "record.json")
    assert rec["status"] == "completed" and rec["resumed"] and rec["steps_done"] == 300
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == list(range(10, 301, 10))
    names = ("config.yaml", "record.json", "metrics.jsonl")
    assert _modes(run, *names) == dict.fromkeys(names, 0o640)  # the umask decides
    assert not list(run.glob("checkpoint*"))


@pytest.mark.slow
def test_no_readable_checkpoint_says_what_to_delete(ngbench, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    for name in ("checkpoint.pt", "checkpoint.prev.pt"):
        (run / name).write_bytes(b"PK\x03\x04 cut short")
    p = ngbench("train", "debug=smoke", f"hydra.run.dir={run}")
    assert p.returncode == 2
    (line,) = p.stderr.strip().splitlines()
    assert "no readable checkpoint" in line and "checkpoint.prev.pt is unreadable" in line
    assert line.endswith(f"rm {run / 'checkpoint.pt'} {run / 'checkpoint.prev.pt'}")
    rec = read_json(run / "record.json")
    assert rec["status"] == "failed" and "no readable checkpoint" in rec["error"]


@pytest.mark.slow
def test_missing_data_set_fails_with_the_reason_recorded(ngbench, tmp_path):
    nodata = tmp_path / "nodata"
    p = ngbench(
        "train",
        "task.flavor=full",
        f"task.data_root={nodata}",
        "train.steps=2",
        "train.device=cpu",
        "train.progress=false",
    )
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-3000:]
    (rec_path,) = (tmp_path / "runs").rglob("record.json")
    rec = read_json(rec_path)
    assert rec["status"] == "failed" and rec["finished"], rec
    assert (
        rec["error"].startswith("DataNotFoundError: MNIST not found")
        and str(nodata) in rec["error"]
    )


# -- the lock's rules, in-process (two open files conflict under flock even in one process) --


def test_lock_refuses_a_second_owner_and_names_the_first(tmp_path):
    first = RunLock(tmp_path, slurm_job="4242_3")
    assert first.acquire() is None
    try:
        with pytest.raises(
            RunLocked, match=rf"in use by pid {os.getpid()} on host .*SLURM job 4242_3"
        ):
            RunLock(tmp_path, slurm_job="99").acquire()
    finally:
        first.release()
    assert not (tmp_path / "run.lock").exists()
    second = RunLock(tmp_path)
    assert second.acquire() is None  # released cleanly: nothing to take over
    second.release()


def test_lock_left_by_a_dead_process_is_taken_over(tmp_path):
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True
    )
    pid = int(dead.stdout)
    (tmp_path / "run.lock").write_text(json.dumps(Holder("elsewhere", pid, None, "then").__dict__))
    lock = RunLock(tmp_path)
    assert lock.acquire() == Holder("elsewhere", pid, None, "then")
    assert json.loads((tmp_path / "run.lock").read_text())["pid"] == os.getpid()
    lock.release()


def test_a_requeued_slurm_job_waits_for_its_previous_incarnation(tmp_path):
    old = RunLock(tmp_path, slurm_job="777")
    old.acquire()
    threading.Timer(0.5, old.release).start()  # the previous incarnation exits a moment later
    new = RunLock(tmp_path, slurm_job="777")
    t0 = time.monotonic()
    assert new.acquire() is None
    assert 0.3 < time.monotonic() - t0 < 30
    new.release()


def test_atomic_writes_follow_the_umask(tmp_path):
    from ngbench.runners.records import atomic_write_text, write_metrics

    for mask, mode in ((0o022, 0o644), (0o077, 0o600)):
        with _umask(mask):
            atomic_write_text(tmp_path / f"a{mask}", "x")
            write_metrics(tmp_path / f"m{mask}", [{"step": 1}])
        assert _modes(tmp_path, f"a{mask}", f"m{mask}") == {f"a{mask}": mode, f"m{mask}": mode}


def test_live_holder_tells_a_live_run_from_a_dead_one(tmp_path):
    from ngbench.runners.lock import live_holder

    assert live_holder(tmp_path) is None
    lock = RunLock(tmp_path, slurm_job="5")
    lock.acquire()
    held = live_holder(tmp_path)
    assert held is not None and held.pid == os.getpid() and held.slurm_job == "5"
    assert lock._fd is not None
    os.close(lock._fd)  # the holder dies without cleaning up: the kernel drops its flock
    lock._fd = None
    assert (tmp_path / "run.lock").exists() and live_holder(tmp_path) is None
