"""Against a real single-node SLURM (``scripts/slurm_local.sh up``; CI starts it in .ci/run).

Skipped when no cluster answers (``SLURM_CONF`` unset or ``sinfo`` failing).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from ngbench.runners.records import read_metrics

REPO = Path(__file__).resolve().parent.parent


def _cluster_up() -> bool:
    if not shutil.which("sinfo") or not os.environ.get("SLURM_CONF"):
        return False
    p = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=20)
    return p.returncode == 0 and p.stdout.strip().startswith(("idle", "mix", "alloc"))


pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not _cluster_up(), reason="no local SLURM (scripts/slurm_local.sh up)"),
]


def _env() -> dict[str, str]:
    env = dict(os.environ, WANDB_MODE="offline", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _launch(tmp_path: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ngbench.runners.cli",
            "train",
            "-m",
            "hydra/launcher=slurm",
            "hydra.launcher.timeout_min=10",
            *args,
        ],
        cwd=tmp_path,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_sweep_runs_as_job_array(tmp_path):
    p = _launch(tmp_path, "debug=smoke", "optimizer=sgd,adamw")
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 0, out
    for opt in ("sgd", "adamw"):
        rec = json.loads(
            (
                tmp_path
                / "runs"
                / "debug"
                / "smoke"
                / "autoencoder_mnist_5k_tiny"
                / opt
                / "default"
                / "seed0"
                / "record.json"
            ).read_text()
        )
        assert rec["status"] == "completed" and rec["slurm_job_id"], rec
    subs = list((tmp_path / "runs" / ".submitit").rglob("*_submission.sh"))
    assert subs and "#SBATCH --array=0-1" in subs[0].read_text()


def test_interrupted_job_requeues_and_resumes(tmp_path):
    steps = 1500
    p = _launch(
        tmp_path,
        "debug=smoke",
        f"train.steps={steps}",
        "train.eval_every=250",
        "train.checkpoint_every=50",
    )
    run = next_run = None
    deadline = time.time() + 240
    while time.time() < deadline:
        found = list((tmp_path / "runs").rglob("checkpoint.pt"))
        if found:
            run = found[0].parent
            break
        time.sleep(0.5)
    assert run is not None, "the job never wrote a checkpoint"
    job = json.loads((run / "record.json").read_text())["slurm_job_id"]
    # what SLURM sends before a time limit or on preemption (submitit's signal)
    subprocess.run(["scancel", "--signal=USR2", str(job)], check=True, timeout=30)
    deadline = time.time() + 120
    while time.time() < deadline:
        rec = json.loads((run / "record.json").read_text())
        if rec["status"] == "preempted" or rec.get("resumed"):
            break
        time.sleep(0.5)
    assert rec["status"] == "preempted" or rec.get("resumed"), rec
    out, _ = p.communicate(timeout=400)
    assert p.returncode == 0, out
    rec = json.loads((run / "record.json").read_text())
    assert rec["status"] == "completed" and rec["resumed"] and rec["steps_done"] == steps, rec
    steps_logged = [r["step"] for r in read_metrics(run / "metrics.jsonl")]
    assert steps_logged == list(range(250, steps + 1, 250))  # no duplicated or lost rows
    logs = "".join(f.read_text() for f in (tmp_path / "runs" / ".submitit").rglob("*_log.err"))
    assert "preempted" in logs or "Requeued" in logs or "requeue" in logs.lower()
    del next_run
