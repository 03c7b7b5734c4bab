"""Shared fixtures: run the real ``ngbench`` CLI in a subprocess, compose real configs."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "configs"


# prepared data (make data) is shared by every test, in-process and in subprocesses
os.environ.setdefault("NGBENCH_DATA", str(REPO / "data"))


@pytest.fixture(autouse=True, scope="session")
def _offline_wandb() -> None:
    os.environ["WANDB_MODE"] = "offline"
    os.environ.setdefault("WANDB_SILENT", "true")


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["WANDB_MODE"] = "offline"
    env["NGBENCH_DATA"] = os.environ["NGBENCH_DATA"]
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


@pytest.fixture
def ngbench(tmp_path: Path) -> Callable[..., subprocess.CompletedProcess[str]]:
    """``ngbench(*args)`` runs the CLI with cwd=tmp_path and returns the finished process."""

    def run(
        *args: str, timeout: float = 600, cwd: Path | None = None
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "ngbench.runners.cli", *args],
            cwd=cwd or tmp_path,
            env=_env(),
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    return run


@pytest.fixture
def compose() -> Callable[..., object]:
    """Compose ``configs/train.yaml`` with overrides through Hydra's compose API."""
    import ngbench.runners.train  # noqa: F401  (registers the ngb_tag resolver)
    from hydra import compose as hcompose
    from hydra import initialize_config_dir

    def run(*overrides: str):
        with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
            return hcompose("train", overrides=list(overrides), return_hydra_config=False)

    return run
