"""The SchNet task (schnetpack 2.2): data in schnetpack's format, hooks on its layers, training
beats the mean predictor on the tiny EMT data set, QM9 reading from a path."""

from __future__ import annotations

import copy
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from ngbench.tasks import DataNotFoundError, TaskConfigError, build_task
from ngbench.tasks.config import task_config
from ngbench.tasks.schnet import SchNetTask, split_dense_activations
from torch import nn

REPO = Path(__file__).resolve().parent.parent
DATA_ROOT = Path(os.environ.get("NGBENCH_DATA", REPO / "data"))


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models on a shared 2-core machine: one intra-op thread avoids spin overhead."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny() -> SchNetTask:
    """The tiny task on the shared data root (the EMT set is built once and cached there)."""
    task = SchNetTask({"name": "schnet", "flavor": "tiny", "data_root": str(DATA_ROOT)})
    task.num_train_examples()
    return task


def test_emt_dataset_is_schnetpack_format_with_emt_energies(tiny: SchNetTask) -> None:
    from ase.calculators.emt import EMT
    from ngbench.tasks._molecules import EMT_ELEMENTS, emt_path
    from schnetpack.data import ASEAtomsData

    data = ASEAtomsData(str(emt_path(DATA_ROOT)), load_properties=["energy", "forces"])
    assert data.units == {"energy": "eV", "forces": "eV/Ang"}
    assert len(data) == 1944
    for i in (0, 977, len(data) - 1):
        item = data[i]
        from ase import Atoms

        atoms = Atoms(numbers=item["_atomic_numbers"].numpy(), positions=item["_positions"].numpy())
        assert set(atoms.get_chemical_symbols()) <= EMT_ELEMENTS
        atoms.calc = EMT()
        assert float(item["energy"]) == pytest.approx(atoms.get_potential_energy(), abs=1e-8)
        np.testing.assert_allclose(item["forces"].numpy(), atoms.get_forces(), atol=1e-8)


def test_offsets_are_atomrefs_plus_mean_per_atom(tiny: SchNetTask) -> None:
    """target (after RemoveOffsets) + Σ atomref[Z] + mean·n_atoms = the stored energy."""
    from ngbench.tasks._molecules import emt_path
    from schnetpack.data import ASEAtomsData

    data = ASEAtomsData(str(emt_path(DATA_ROOT)), load_properties=["energy"])
    atomref = data.atomrefs["energy"].double()
    train, val = tiny._data()
    mean = tiny.stats["mean_per_atom"]
    for item in (train[0], train[5], val[3]):
        raw = float(data[int(item["_idx"])]["energy"])
        rebuilt = (
            float(item["energy"])
            + float(atomref[item["_atomic_numbers"]].sum())
            + mean * int(item["_n_atoms"])
        )
        assert rebuilt == pytest.approx(raw, abs=1e-5)
    # the training targets are centred by construction
    tr = torch.cat([it["energy"] for it in train]).double()
    per_atom = tr / torch.cat([it["_n_atoms"] for it in train]).double()
    assert abs(float(per_atom.mean())) < 1e-6


def test_split_activations_keeps_the_function() -> None:
    import schnetpack as spk
    from schnetpack.nn import Dense

    torch.manual_seed(0)
    head = spk.atomistic.Atomwise(n_in=6, output_key="y").double()
    block = spk.representation.SchNetInteraction(6, 5, 6).double()
    split_head, split_block = copy.deepcopy(head), copy.deepcopy(block)
    assert split_dense_activations(split_head) == 1
    assert split_dense_activations(split_block) == 2
    for m in list(split_head.modules()) + list(split_block.modules()):
        if isinstance(m, Dense):
            assert isinstance(m.activation, nn.Identity)
    x = torch.randn(7, 6, dtype=torch.float64)
    inputs = {"scalar_representation": x, "_idx_m": torch.tensor([0, 0, 0, 1, 1, 2, 2]),
              "_n_atoms": torch.tensor([3, 2, 2])}  # fmt: skip
    assert torch.equal(head(dict(inputs))["y"], split_head(dict(inputs))["y"])
    f = torch.randn(9, 5, dtype=torch.float64)
    idx_i, idx_j = (
        torch.tensor([0, 1, 2, 3, 4, 5, 6, 0, 2]),
        torch.tensor([1, 0, 3, 2, 5, 6, 5, 2, 0]),
    )
    rcut = torch.rand(9, dtype=torch.float64)
    assert torch.equal(block(x, f, idx_i, idx_j, rcut), split_block(x, f, idx_i, idx_j, rcut))


def test_hooks_fire_and_see_pre_activations(tiny: SchNetTask) -> None:
    """Every trainable parameter lives in an nn.Linear or nn.Embedding; forward hooks and
    output-gradient hooks fire on all of them; a Linear's hooked output is W a + b (the
    pre-activation) and its hooked gradient is ∂loss/∂(that output)."""
    torch.manual_seed(0)
    model = tiny.build_model()
    hooked = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Embedding))}
    covered = {id(p) for m in hooked.values() for p in m.parameters(recurse=False)}
    outside = [n for n, p in model.named_parameters() if id(p) not in covered]
    assert outside == []
    assert [n for n, m in hooked.items() if isinstance(m, nn.Embedding)] == [
        "representation.embedding"
    ]
    seen: dict[str, dict[str, torch.Tensor]] = {n: {} for n in hooked}

    def make(name: str):
        def fwd(mod: nn.Module, inputs: tuple, out: torch.Tensor) -> None:
            seen[name]["a"], seen[name]["s"] = inputs[0].detach(), out.detach()
            out.register_hook(lambda g: seen[name].__setitem__("g", g.detach()))

        return fwd

    for n, m in hooked.items():
        m.register_forward_hook(make(n))
    batch = next(tiny.train_batches(epoch=0, batch_size=8, seed=0))
    loss, pred = tiny.loss(model, batch)
    loss.backward()
    assert pred.shape == (8,)
    for name, m in hooked.items():
        assert set(seen[name]) == {"a", "s", "g"}, name
        if isinstance(m, nn.Linear):
            ref = torch.nn.functional.linear(seen[name]["a"], m.weight, m.bias)
            torch.testing.assert_close(seen[name]["s"], ref)
    # the filter network's first layer: its gradient equals G^T a summed over pairs
    name = "representation.interactions.0.filter_network.0.0"
    g, a = seen[name]["g"], seen[name]["a"]
    torch.testing.assert_close(hooked[name].weight.grad, g.T @ a)
    torch.testing.assert_close(hooked[name].bias.grad, g.sum(0))


def test_sampled_loss_is_unit_gaussian_likelihood(tiny: SchNetTask) -> None:
    torch.manual_seed(0)
    out = torch.zeros(200_000, requires_grad=True)
    loss = tiny.sampled_loss(out)
    assert float(loss.detach()) == pytest.approx(1.0, abs=0.02)  # E[ε²] for ε ~ N(0, 1)
    loss.backward()
    assert out.grad is not None and float(out.grad.abs().sum()) > 0


def test_tiny_training_beats_the_mean_predictor(tiny: SchNetTask) -> None:
    from ngbench.optimizers import build_optimizer

    torch.manual_seed(0)
    model = tiny.build_model()
    opt = build_optimizer("adamw", model, lr=3e-3, weight_decay=0.0)
    start = time.perf_counter()
    before = tiny.evaluate(model, torch.device("cpu"))["val_mae"]
    step = 0
    for epoch in range(10):
        for batch in tiny.train_batches(epoch=epoch, batch_size=32, seed=0):
            opt.zero_grad(set_to_none=True)
            loss, _ = tiny.loss(model, batch)
            loss.backward()
            opt.step()
            step += 1
            if step == 300:
                break
        if step == 300:
            break
    metrics = tiny.evaluate(model, torch.device("cpu"))
    elapsed = time.perf_counter() - start
    mean_mae = tiny.stats["baseline_mean_mae"]
    # measured: 0.25 eV after 300 steps; mean predictor 1.73 eV
    assert metrics["val_mae"] < 0.5 * mean_mae, (metrics, tiny.stats)
    assert metrics["val_mae"] < 0.5 * before
    assert metrics["val_rmse"] >= metrics["val_mae"]
    assert elapsed < 60


def test_batches_are_a_function_of_seed_and_epoch_and_shard(tiny: SchNetTask) -> None:
    a = next(tiny.train_batches(epoch=1, batch_size=8, seed=3))
    b = next(tiny.train_batches(epoch=1, batch_size=8, seed=3))
    c = next(tiny.train_batches(epoch=2, batch_size=8, seed=3))
    assert torch.equal(a["_idx"], b["_idx"]) and not torch.equal(a["_idx"], c["_idx"])
    r0 = next(tiny.train_batches(epoch=1, batch_size=8, seed=3, rank=0, world_size=2))
    r1 = next(tiny.train_batches(epoch=1, batch_size=8, seed=3, rank=1, world_size=2))
    assert torch.equal(torch.cat([r0["_idx"], r1["_idx"]]), a["_idx"])
    # collated neighbour indices stay inside each molecule
    assert torch.equal(a["_idx_m"][a["_idx_i"]], a["_idx_m"][a["_idx_j"]])


def _fake_qm9(path: Path) -> list[float]:
    """A schnetpack-format QM9 look-alike: energy_U0 in Hartree with atom references."""
    from ase.collections import g2
    from schnetpack.data import ASEAtomsData

    refs = np.zeros(100)
    refs[[1, 6, 7, 8]] = [-0.5, -37.8, -54.5, -75.0]
    data = ASEAtomsData.create(
        str(path), distance_unit="Ang", property_unit_dict={"energy_U0": "Ha", "gap": "Ha"},
        atomrefs={"energy_U0": refs.tolist(), "gap": np.zeros(100).tolist()},
    )  # fmt: skip
    energies, props, mols = [], [], []
    for k, name in enumerate(["CH4", "NH3", "H2O", "C2H6", "CH3OH", "HCN", "C2H2", "CO2"] * 2):
        atoms = g2[name]
        e = float(refs[atoms.numbers].sum()) - 0.3 - 0.01 * k
        energies.append(e)
        props.append({"energy_U0": np.array([e]), "gap": np.array([0.2 + 0.01 * k])})
        mols.append(atoms)
    data.add_systems(props, mols)
    return energies


def test_qm9_from_a_path_converts_hartree_to_ev(tmp_path: Path) -> None:
    energies = _fake_qm9(tmp_path / "qm9.db")
    cfg = {"name": "schnet", "flavor": "full", "dataset": "qm9", "data_root": str(tmp_path),
           "n_train": 10, "n_val": 6, "n_atom_basis": 8, "n_interactions": 1}  # fmt: skip
    task = build_task(cfg)
    assert isinstance(task, SchNetTask) and task.sizes["cutoff"] == 5.0
    train, val = task._data()
    assert len(train) == 10 and len(val) == 6
    # the constant-mean baseline in eV equals the one computed by hand from the Hartree values
    hartree = 27.211386
    e = np.asarray(energies) * hartree
    perm = np.random.default_rng(0).permutation(16)
    expected = np.abs(e[perm[10:]] - e[perm[:10]].mean()).mean()
    assert task.stats["baseline_mean_mae"] == pytest.approx(expected, rel=1e-4)
    model = task.build_model()
    loss, pred = task.loss(model, next(task.train_batches(epoch=0, batch_size=5, seed=0)))
    assert pred.shape == (5,) and torch.isfinite(loss)
    assert set(task.evaluate(model, torch.device("cpu"))) == {"val_mae", "val_rmse", "val_loss"}
    # an intensive property uses mean aggregation and no atom references
    gap = SchNetTask({**cfg, "property": "gap"})
    assert not gap.extensive and gap.build_model().output_modules[0].aggregation_mode == "avg"


def test_missing_qm9_and_bad_keys_raise_clear_errors(tmp_path: Path) -> None:
    task = SchNetTask({"flavor": "full", "dataset": "qm9", "data_root": str(tmp_path)})
    with pytest.raises(DataNotFoundError, match=r"qm9\.db.*ngbench data qm9"):
        task.num_train_examples()
    with pytest.raises(TaskConfigError, match="task.dataset='md17'.*qm9, ase_emt"):
        SchNetTask({"dataset": "md17"})
    with pytest.raises(TaskConfigError, match="task.property='forces'"):
        SchNetTask({"dataset": "ase_emt", "property": "forces"})
    with pytest.raises(TaskConfigError, match="task.cutoff must be > 0"):
        SchNetTask({"dataset": "ase_emt", "cutoff": -1.0})


def test_config_composes_with_targets(compose) -> None:
    tiny = task_config(compose("task=schnet").task)
    assert tiny.effective_dataset == "ase_emt" and tiny.resolved_target.metric == "val_mae"
    full = compose("task=schnet", "task.flavor=full")
    c = task_config(full.task)
    assert c.effective_dataset == "qm9" and c.resolved_target.value == pytest.approx(0.014)
    task = build_task(full.task)
    assert task.sizes == {"n_atom_basis": 128, "n_interactions": 6, "n_rbf": 20, "cutoff": 5.0}
