"""Distributed curvature (KAISA, ALGORITHMS.md §1.8; optimizers/_distributed.py): 2 CPU processes
(gloo) with DDP equal 1 process on the same global batch, for grad_worker_fraction 1 (COMM_OPT)
and 1/2 (MEM_OPT); the work assignment is the greedy n³ balance; MEM_OPT holds fewer bytes."""

from __future__ import annotations

import warnings

import pytest
import torch
from _helpers import run_gloo
from ngbench.optimizers._distributed import assign_work, check_fraction
from ngbench.optimizers.kfac import KFAC
from torch import nn

DT = torch.float64
STEPS = 6
KW = dict(lr=0.05, stat_every=2, inv_every=4, damping=1e-2, stat_decay=0.9, kl_clip=1e-2)


class Net(nn.Module):
    """A conv layer (T = 16 locations per example) and two linear layers."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, stride=2, padding=1)
        self.fc1 = nn.Linear(3 * 16, 12)
        self.fc2 = nn.Linear(12, 4)

    def forward(self, x):
        h = torch.tanh(self.conv(x)).flatten(1)
        return self.fc2(torch.tanh(self.fc1(h)))


def _data():
    g = torch.Generator().manual_seed(1)
    xs = torch.randn(STEPS, 8, 2, 8, 8, generator=g, dtype=DT)
    ys = torch.randint(0, 4, (STEPS, 8), generator=g)
    return xs, ys


def _model():
    torch.manual_seed(0)
    return Net().to(DT)


def _train(model, net, opt, xs, ys, rank=0, world=1):
    per = xs.shape[1] // world
    for k in range(STEPS):
        x, y = xs[k, rank * per : (rank + 1) * per], ys[k, rank * per : (rank + 1) * per]
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(net(x), y).backward()  # mean over the LOCAL batch
        opt.step()
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _worker(rank, world, out):
    xs, ys = _data()
    for frac in (1.0, 0.5):
        model = _model()
        opt = KFAC(model, grad_worker_fraction=frac, **KW)
        net = nn.parallel.DistributedDataParallel(model)
        params = _train(model, net, opt, xs, ys, rank, world)
        # a checkpoint written by rank 0 after consolidation holds every decomposition
        opt.consolidate_state_dict(to=0)
        sd = opt.state_dict() if rank == 0 else None
        full = sd is not None and all(
            "QA" in b["tensors"] for b in sd["curvature"]["blocks"].values()
        )
        torch.save(
            {
                "params": params,
                "mem": opt.memory_usage()["total"],
                "phases": opt.phase_times(),
                "inv_worker": dict(opt.work_assignment.inv_worker),
                "holds": sorted(n for n, b in opt.blocks.items() if "QA" in b.tensors),
                "full_checkpoint": full,
            },
            f"{out}/r{rank}_f{frac}.pt",
        )


@pytest.fixture(scope="module")
def two_process(tmp_path_factory):
    out = tmp_path_factory.mktemp("kaisa")
    run_gloo(_worker, str(out))
    return {
        (r, f): torch.load(out / f"r{r}_f{f}.pt", weights_only=False)
        for r in (0, 1)
        for f in (1.0, 0.5)
    }


def _reference():
    xs, ys = _data()
    model = _model()
    opt = KFAC(model, **KW)
    return _train(model, model, opt, xs, ys), opt


@pytest.mark.parametrize("frac", [1.0, 0.5])
def test_two_processes_match_one_process(two_process, frac):
    ref, _ = _reference()
    for rank in (0, 1):
        got = two_process[(rank, frac)]["params"]
        rel = float((got - ref).norm() / ref.norm())
        assert rel < 1e-5, (frac, rank, rel)
    # and the run really moved away from the start (the comparison is not vacuous)
    start = torch.cat([p.detach().reshape(-1) for p in _model().parameters()])
    assert float((ref - start).norm() / start.norm()) > 1e-3


def test_mem_opt_splits_memory_and_work(two_process):
    full = [two_process[(r, 1.0)] for r in (0, 1)]
    half = [two_process[(r, 0.5)] for r in (0, 1)]
    _, opt1 = _reference()
    # COMM_OPT: every rank holds everything, exactly what one process holds
    assert all(f["mem"] == opt1.memory_usage()["total"] for f in full)
    assert all(f["holds"] == ["conv", "fc1", "fc2"] for f in full)
    # MEM_OPT: each block's decomposition lives on its inverse worker only
    owners = half[0]["inv_worker"]
    assert half[1]["inv_worker"] == owners and set(owners.values()) == {0, 1}
    for r in (0, 1):
        assert half[r]["holds"] == sorted(n for n, o in owners.items() if o == r)
        assert half[r]["mem"] < full[r]["mem"]
    factor = (half[0]["mem"] + half[1]["mem"]) / (2 * full[0]["mem"])
    assert 0.5 < factor < 0.9, factor  # statistics stay on every rank, decompositions split
    assert half[0]["full_checkpoint"]
    for d in full + half:
        assert d["phases"]["communication"] > 0


def test_greedy_assignment_balances_cost():
    costs = {"a": 1000.0, "b": 800.0, "c": 300.0, "d": 200.0, "e": 100.0}
    asg = assign_work(costs, world_size=2, grad_worker_fraction=0.5)
    assert asg.inv_worker == {"a": 0, "b": 1, "c": 1, "d": 0, "e": 1}
    assert asg.loads(costs) == [1200.0, 1200.0]
    # COMM_OPT: one column holding all ranks; inverse work still balanced
    asg = assign_work(costs, world_size=2, grad_worker_fraction=1.0)
    assert asg.holders("a") == [0, 1] and set(asg.inv_worker.values()) == {0, 1}
    # HYBRID on 4 ranks: 2 gradient workers per block, columns {0, 2} and {1, 3}
    asg = assign_work(costs, world_size=4, grad_worker_fraction=0.5)
    assert asg.column_ranks(0) == [0, 2] and asg.row_ranks(1) == [2, 3]
    for name, r in asg.inv_worker.items():
        assert r in asg.holders(name) and len(asg.holders(name)) == 2


def test_bad_fraction_names_key():
    with pytest.raises(ValueError, match="grad_worker_fraction"):
        check_fraction(0.3, 4)
    with pytest.raises(ValueError, match="grad_worker_fraction"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            KFAC(_model(), grad_worker_fraction=0.0)


def test_one_process_works_alone_and_reports_no_communication():
    """Without a process group the optimizer's comm is local: one rank refreshes and holds
    every block, and no ``communication`` phase appears."""
    _, opt = _reference()
    assert set(opt.work_assignment.inv_worker.values()) == {0}
    assert opt.work_assignment.holders("conv") == [0]
    assert "communication" not in opt.phase_times()
    assert all("QA" in b.tensors for b in opt.blocks.values())
