"""Every experiment preset smoke-runs its whole optimizer matrix (debug=smoke, one seed)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from ngbench import optimizers
from ngbench.runners import loop
from ngbench.runners.config_check import check_config
from omegaconf import OmegaConf

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
EXPERIMENTS = sorted(p.stem for p in (CONFIGS / "experiment").glob("*.yaml"))


def _compose(*overrides: str):
    import ngbench.runners.train  # noqa: F401  (resolvers)

    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=True)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_matrix_smoke(name, tmp_path):
    cfg = _compose(f"experiment={name}", "debug=smoke")
    params = cfg.hydra.sweeper.params
    opts = str(params.optimizer).split(",")
    presets = {p.stem for p in (CONFIGS / "optimizer").glob("*.yaml")}
    assert set(opts) <= presets, f"{name}: no configs/optimizer file for {set(opts) - presets}"
    assert len(str(params.seed).split(",")) >= 3, f"{name}: fewer than 3 seeds"
    for opt in opts:
        c = _compose(
            f"experiment={name}",
            "debug=smoke",
            f"optimizer={opt}",
            "train.steps=2",
            "train.eval_every=2",
        )
        OmegaConf.set_struct(c, False)
        del c["hydra"]
        assert c.optimizer.name in optimizers.list_optimizers()
        check_config(c)
        rec = loop.train(c, tmp_path / name / opt)
        assert rec["status"] == "completed", (name, opt, rec["error"])
