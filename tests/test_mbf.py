"""MBF (optimizers/mbf.py): ALGORITHMS.md §6.4 and §10 #12 against torch.func references."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from _helpers import checkpoint_round_trip, train_ce
from _reference import per_example_matrices
from ngbench.optimizers import build_optimizer
from ngbench.optimizers.mbf import MBF, batched_spd_inverse, parse_linear_block
from torch import nn

DT = torch.float64
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def mbf(model, **kw):
    for k, v in dict(stat_every=1, inv_every=1, momentum=0.0, lr=0.0, stat_decay=0.0).items():
        kw.setdefault(k, v)
    return MBF(model, **kw)


def one_step(model, loss_fn, **kw):
    opt = mbf(model, **kw)
    opt.zero_grad()
    loss_fn().backward()
    grads = {n: h.grad_matrix().clone() for n, h in opt.layers.items()}
    opt.step()
    return opt, grads




def block_ids(kind: str, m: int, n: int, *, size: int = 0, kernel: int = 0) -> torch.Tensor:
    """Mini-block id of every entry of the ``m × n`` [W | b] matrix (written from the spec)."""
    ids = torch.empty(m, n, dtype=torch.long)
    for i in range(m):
        for c in range(n):
            if kind == "conv":  # kernel (i, j) blocks; the bias column is a diagonal
                ids[i, c] = i * n + c // kernel if c < n - 1 else 10**6 + i
            elif kind == "row":  # fewest equal chunks of <= size per row
                chunks = math.ceil(n / size)
                ids[i, c] = i * chunks + c // math.ceil(n / chunks)
            else:  # runs of `size` consecutive entries of the flattened matrix
                ids[i, c] = (i * n + c) // size
    return ids


def _net():
    return nn.Sequential(
        nn.Conv2d(2, 3, 2), nn.Tanh(), nn.Flatten(), nn.Linear(12, 5), nn.Tanh(), nn.Linear(5, 4)
    ).to(DT)


PARTITIONS = [
    ("row", "row", 128),
    ("row", "row", 4),  # 13 columns -> 4 chunks of 4 (one zero-padded)
    ("chunk:3", "chunk", 3),
    ("chunk:7", "chunk", 7),  # blocks span rows
]


# --------------------------------------------------------------------------- §6.4.1
@pytest.mark.parametrize("spec,kind,size", PARTITIONS)
def test_single_example_blocks_give_normalized_block_gradients(spec, kind, size):
    net = _net()
    x, y = torch.randn(1, 2, 3, 3, dtype=DT), torch.randint(0, 4, (1,))
    lam = 0.3
    opt, grads = one_step(
        net, lambda: F.cross_entropy(net(x), y), damping=lam, linear_block=spec, max_block=size
    )
    for name, V in grads.items():
        m, n = V.shape
        ids = block_ids("conv", m, n, kernel=4) if name == "0" else block_ids(kind, m, n, size=size)
        expect = torch.empty_like(V)
        for b in ids.unique():
            sel = ids == b
            v = V[sel]
            expect[sel] = v / (v.pow(2).sum() + lam)
        torch.testing.assert_close(opt.blocks[name].precondition(V), expect)


# --------------------------------------------------------------------------- §6.4.2
@pytest.mark.parametrize("estimator", ["per_example", "batch"])
@pytest.mark.parametrize("spec,kind,size", PARTITIONS)
def test_batched_blocks_equal_dense_block_diagonal_solve(spec, kind, size, estimator):
    net = _net()
    N = 5
    x, y = torch.randn(N, 2, 3, 3, dtype=DT), torch.randint(0, 4, (N,))
    lam = 0.05
    opt, grads = one_step(
        net,
        lambda: F.cross_entropy(net(x), y),
        damping=lam,
        linear_block=spec,
        max_block=size,
        estimator=estimator,
    )
    G = per_example_matrices(net, x, y, layers=["0", "3", "5"])
    for name, V in grads.items():
        m, n = V.shape
        ids = block_ids("conv", m, n, kernel=4) if name == "0" else block_ids(kind, m, n, size=size)
        vecs = G[name].reshape(N, -1)
        if estimator == "per_example":
            ef = vecs.T @ vecs / N
        else:
            mean = vecs.mean(0)
            ef = N * torch.outer(mean, mean)
        flat = ids.reshape(-1)
        dense = torch.where(flat[:, None] == flat[None, :], ef, torch.zeros_like(ef))
        ref = torch.linalg.solve(dense + lam * torch.eye(m * n, dtype=DT), V.reshape(-1))
        block = opt.blocks[name]
        torch.testing.assert_close(block.precondition(V), ref.reshape(m, n))
        torch.testing.assert_close(
            block.damped_dense(lam), dense + lam * torch.eye(m * n, dtype=DT)
        )


def test_shared_input_blocks():
    lin = nn.Linear(3, 4).to(DT)
    lam = 0.2
    # one example: F_i = g_i² ā āᵀ exactly, the same as per-row blocks
    x1, y1 = torch.randn(1, 3, dtype=DT), torch.randint(0, 4, (1,))
    outs = []
    for spec in ("shared_input", "row"):
        opt, grads = one_step(
            lin, lambda: F.cross_entropy(lin(x1), y1), damping=lam, linear_block=spec
        )
        outs.append(opt.blocks[""].precondition(grads[""]))
    torch.testing.assert_close(outs[0], outs[1])
    # N examples: (E[g_i²] A + λI)⁻¹ per row
    x, y = torch.randn(6, 3, dtype=DT), torch.randint(0, 4, (6,))
    opt, grads = one_step(
        lin, lambda: F.cross_entropy(lin(x), y), damping=lam, linear_block="shared_input"
    )
    abar = torch.cat([x, torch.ones(6, 1, dtype=DT)], 1)
    g = torch.softmax(lin(x).detach(), 1) - F.one_hot(y, 4).to(DT)
    A, S = abar.T @ abar / 6, g.pow(2).mean(0)
    V = grads[""]
    ref = torch.stack(
        [torch.linalg.solve(S[i] * A + lam * torch.eye(4, dtype=DT), V[i]) for i in range(4)]
    )
    torch.testing.assert_close(opt.blocks[""].precondition(V), ref)


# --------------------------------------------------------------------------- §6.4.3
def test_conv_block_touches_only_its_kernel():
    conv = nn.Conv2d(3, 4, 3, padding=1).to(DT)
    x = torch.randn(6, 3, 5, 5, dtype=DT)
    opt, _ = one_step(conv, lambda: conv(x).pow(2).mean(), damping=0.1)
    block = opt.blocks[""]
    assert block.tensors["Finv"].shape == (12, 9, 9) and block.tensors["Dinv"].shape == (4,)
    for i, j in ((0, 0), (2, 1), (3, 2)):
        gw = torch.zeros(4, 3, 3, 3, dtype=DT)
        gw[i, j] = torch.randn(3, 3, dtype=DT)
        V = torch.cat([gw.reshape(4, -1), torch.zeros(4, 1, dtype=DT)], 1)
        P = block.precondition(V)[:, :-1].reshape(4, 3, 3, 3)
        assert P[i, j].abs().sum() > 0
        P[i, j] = 0
        assert torch.equal(P, torch.zeros_like(P))
        # the block's own 9×9 solve, written with the kernel's per-example gradients
        blk = block.tensors["F"][i * 3 + j]
        ref = torch.linalg.solve(blk + 0.1 * torch.eye(9, dtype=DT), gw[i, j].reshape(-1))
        torch.testing.assert_close(block.precondition(V)[i, j * 9 : (j + 1) * 9], ref)


# --------------------------------------------------------------------------- momentum option
def test_grad_ema_momentum_preconditions_the_averaged_l2_gradient():
    lin = nn.Linear(3, 2).to(DT)
    x, y = torch.randn(6, 3, dtype=DT), torch.randint(0, 2, (6,))
    lr, rho, l2 = 0.3, 0.9, 0.1
    opt = mbf(lin, lr=lr, momentum=rho, weight_decay=l2, momentum_type="grad_ema")
    W0, b0 = lin.weight.detach().clone(), lin.bias.detach().clone()
    F.cross_entropy(lin(x), y).backward()
    V = opt.layers[""].grad_matrix()
    opt.step()
    d = V.clone()
    d[:, :3] += l2 * W0  # L2 on the weights only, before preconditioning
    P = opt.blocks[""].precondition((1 - rho) * d)  # the EMA starts at zero
    torch.testing.assert_close(lin.weight.detach(), W0 - lr * P[:, :3])
    torch.testing.assert_close(lin.bias.detach(), b0 - lr * P[:, 3])
    assert opt.param_groups[0]["momentum"] == 0.0 and opt.param_groups[0]["grad_ema"] == rho


# --------------------------------------------------------------------------- robustness / state
def test_batched_inverse_and_failure_fallback():
    mats = torch.randn(5, 4, 4, dtype=DT)
    spd = mats @ mats.transpose(1, 2) + 0.1 * torch.eye(4, dtype=DT)
    torch.testing.assert_close(batched_spd_inverse(spd), torch.linalg.inv(spd))
    assert batched_spd_inverse(-spd) is None
    net = _net()
    x, y = torch.randn(5, 2, 3, 3, dtype=DT), torch.randint(0, 4, (5,))
    opt = mbf(net, lr=0.1, stat_decay=0.9)
    train_ce(net, opt, x, y, 1)
    old = opt.blocks["3"].tensors["Finv"].clone()
    opt.blocks["3"].tensors["F"].fill_(float("nan"))
    with pytest.warns(RuntimeWarning, match="failed"):
        train_ce(net, opt, x, y, 2)
    assert torch.equal(opt.blocks["3"].tensors["Finv"], old)
    assert all(torch.isfinite(p).all() for p in net.parameters())




@pytest.mark.parametrize("momentum_type", ["heavy_ball", "grad_ema"])
def test_state_dict_round_trip_and_memory(momentum_type):
    x, y = torch.randn(6, 2, 3, 3, dtype=DT), torch.randint(0, 4, (6,))
    kw = dict(lr=0.05, stat_every=2, inv_every=4, momentum_type=momentum_type, weight_decay=0.01)
    _, opt, _, _ = checkpoint_round_trip(_net, lambda net: MBF(net, **kw), x, y,
                                         before=5, after=6)
    mem = opt.memory_usage()
    # conv: 6 kernels of 2×2 -> (6, 4, 4); Linear rows of 13 and 6: (5, 13, 13), (4, 6, 6)
    blocks = (6 * 16 + 5 * 169 + 4 * 36) * 8
    assert mem["F"] == blocks and mem["Finv"] == blocks and mem["D"] == 3 * 8


def test_trains_a_tiny_conv_net():
    x, y = torch.randn(16, 2, 3, 3, dtype=DT), torch.randint(0, 4, (16,))
    net = _net()
    opt = MBF(net, lr=0.05, damping=0.1, stat_every=2, inv_every=4)
    first = F.cross_entropy(net(x), y).item()
    train_ce(net, opt, x, y, 30)
    assert F.cross_entropy(net(x), y).item() < 0.5 * first


def test_embedding_gets_the_plain_direction():
    emb = nn.Sequential(nn.Embedding(5, 3), nn.Flatten(), nn.Linear(6, 2)).to(DT)
    idx, y = torch.randint(0, 5, (4, 2)), torch.randint(0, 2, (4,))
    opt = mbf(emb, lr=0.1)
    train_ce(emb, opt, idx, y, 2)
    assert not opt.blocks["0"].ready and opt.blocks["2"].ready


@pytest.mark.parametrize("spec", ["chunk:0", "chunk:x", "column"])
def test_bad_linear_block_names_the_key(spec):
    with pytest.raises(ValueError, match="optimizer.linear_block"):
        build_optimizer("mbf", nn.Linear(2, 2), linear_block=spec)
    with pytest.raises(ValueError, match="optimizer.nesterov"):
        build_optimizer("mbf", nn.Linear(2, 2), nesterov=True, momentum_type="grad_ema")


def test_parse_linear_block():
    assert parse_linear_block("chunk:64") == ("chunk", 64)
    assert parse_linear_block("row") == ("row", 0)

