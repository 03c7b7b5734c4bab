"""NG+ (optimizers/ngplus.py): ALGORITHMS.md §4.7 and §10 #11, #19 against torch.func."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from _helpers import checkpoint_round_trip, train_ce
from _reference import per_example_matrices
from ngbench.optimizers.ngplus import NGPlus, _embedding_gram, _per_example_gram
from torch import nn

DT = torch.float64
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def ngplus(model, **kw):
    for k, v in dict(stat_every=1, inv_every=1, momentum=0.0, lr=0.0).items():
        kw.setdefault(k, v)
    return NGPlus(model, **kw)


def one_step(model, loss_fn, **kw):
    opt = ngplus(model, **kw)
    opt.zero_grad()
    loss_fn().backward()
    grads = {n: h.grad_matrix().clone() for n, h in opt.layers.items()}
    opt.step()
    return opt, grads




# --------------------------------------------------------------------------- §4.7.1
@pytest.mark.parametrize("sqrt_damping", [True, False])
@pytest.mark.parametrize("smw", ["never", "always"])
def test_single_example_direction_is_normalized_gradient(sqrt_damping, smw):
    lin = nn.Linear(4, 3).to(DT)
    x, y = torch.randn(1, 4, dtype=DT), torch.randint(0, 3, (1,))
    mu = 0.3
    opt, grads = one_step(
        lin, lambda: F.cross_entropy(lin(x), y), damping=mu, sqrt_damping=sqrt_damping, smw=smw
    )
    V = grads[""]
    delta = math.sqrt(mu) if sqrt_damping else mu
    assert opt.blocks[""].uses_smw == (smw == "always")
    torch.testing.assert_close(opt.blocks[""].precondition(V), V / (V.pow(2).sum() + delta))


# --------------------------------------------------------------------------- §4.7.2
def test_linear_and_conv_gfim_equal_per_example_products():
    net = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(27, 5),
        nn.Tanh(),
        nn.Linear(5, 4),
    ).to(DT)
    x, y = torch.randn(6, 2, 3, 3, dtype=DT), torch.randint(0, 4, (6,))
    opt, _ = one_step(net, lambda: F.cross_entropy(net(x), y), smw="never")
    G = per_example_matrices(net, x, y, F.cross_entropy, ["0", "3", "5"])
    for name, T in (("0", 9), ("3", 1), ("5", 1)):
        scale = 1.0 / math.sqrt(T)  # conv_scale="sqrt_t" (reference code); Linear: 1
        ref = torch.einsum("nik,njk->ij", G[name], G[name]) / 6 * scale
        torch.testing.assert_close(opt.blocks[name].tensors["F"], ref)
    # Linear: K-FAC's G weighted by the squared input norms (§4.1)
    a = torch.tanh(net[0](x).flatten(1)).detach()
    g = G["3"][:, :, -1]  # the bias column of G_n is g_n
    abar2 = a.pow(2).sum(1) + 1
    ref = torch.einsum("n,ni,nj->ij", abar2, g, g) / 6
    torch.testing.assert_close(opt.blocks["3"].tensors["F"], ref)


@pytest.mark.parametrize("conv_scale,power", [("none", 0.0), ("t", 1.0)])
def test_conv_scale_option(conv_scale, power):
    conv = nn.Conv2d(2, 3, 2).to(DT)
    x = torch.randn(4, 2, 4, 4, dtype=DT)
    opt, _ = one_step(conv, lambda: conv(x).pow(2).mean(), conv_scale=conv_scale)
    # per-example loss ℓ_n = mean of out_n² (the batch loss is their mean)
    pe = per_example_matrices(conv, x, torch.zeros(4), lambda out, _y: out.pow(2).mean(), [""])[""]
    ref = torch.einsum("nik,njk->ij", pe, pe) / 4 / 9**power
    torch.testing.assert_close(opt.blocks[""].tensors["F"], ref)


def test_gram_paths_agree_and_embedding_gram():
    a, g = torch.randn(3, 5, 4, dtype=DT), torch.randn(3, 5, 2, dtype=DT)
    ref = sum(g[n].T @ a[n] @ (g[n].T @ a[n]).T for n in range(3))
    torch.testing.assert_close(_per_example_gram(a, g), ref)  # direct (bmm) path
    a2, g2 = torch.randn(2, 2, 9, dtype=DT), torch.randn(2, 2, 7, dtype=DT)
    ref2 = sum(g2[n].T @ a2[n] @ (g2[n].T @ a2[n]).T for n in range(2))
    torch.testing.assert_close(_per_example_gram(a2, g2), ref2)  # location-kernel path
    idx = torch.tensor([[0, 2, 0], [1, 1, 3]])
    ge = torch.randn(2, 3, 4, dtype=DT)
    onehot = F.one_hot(idx, 5).to(DT)
    ref3 = sum(ge[n].T @ onehot[n] @ (ge[n].T @ onehot[n]).T for n in range(2))
    torch.testing.assert_close(_embedding_gram(idx, ge), ref3)


# --------------------------------------------------------------------------- §4.7.3 SMW
def test_smw_equals_dense_when_m_exceeds_n():
    net = nn.Sequential(nn.Linear(3, 9), nn.Tanh(), nn.Linear(9, 12)).to(DT)
    x, y = torch.randn(4, 3, dtype=DT), torch.randint(0, 12, (4,))
    mu = 0.2
    outs = {}
    for smw in ("auto", "never"):
        torch.manual_seed(1)
        model = nn.Sequential(nn.Linear(3, 9), nn.Tanh(), nn.Linear(9, 12)).to(DT)
        model.load_state_dict(net.state_dict())
        opt, grads = one_step(model, lambda m=model: F.cross_entropy(m(x), y), damping=mu, smw=smw)
        assert all(b.uses_smw == (smw == "auto") for b in opt.blocks.values())  # m > N = 4
        outs[smw] = {n: opt.blocks[n].precondition(V) for n, V in grads.items()}
    G = per_example_matrices(net, x, y, F.cross_entropy, ["0", "2"])
    for name in ("0", "2"):
        Fd = torch.einsum("nik,njk->ij", G[name], G[name]) / 4
        m = Fd.shape[0]
        ref = torch.linalg.solve(Fd + math.sqrt(mu) * torch.eye(m, dtype=DT), grads[name])
        torch.testing.assert_close(outs["auto"][name], ref)
        torch.testing.assert_close(outs["never"][name], ref)


def test_smw_for_sequence_inputs_equals_dense():
    lin_a, lin_b = nn.Linear(2, 7).to(DT), nn.Linear(2, 7).to(DT)
    lin_b.load_state_dict(lin_a.state_dict())
    x = torch.randn(2, 3, 2, dtype=DT)  # N=2 examples, T=3 tokens: U has N·n = 6 < 7 columns
    res = []
    for lin, smw in ((lin_a, "auto"), (lin_b, "never")):
        opt, grads = one_step(lin, lambda m=lin: m(x).pow(3).mean(), smw=smw)
        assert opt.blocks[""].uses_smw == (smw == "auto")
        res.append(opt.blocks[""].precondition(grads[""]))
    torch.testing.assert_close(res[0], res[1])


# --------------------------------------------------------------------------- §4.7.4 / #19
def test_preconditioner_bit_identical_between_refreshes_and_ema_weights_new():
    net = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(12, 2)).to(DT)
    xs = [torch.randn(4, 2, 4, 4, dtype=DT) for _ in range(7)]
    y = torch.randint(0, 2, (4,))
    alpha = 0.7
    opt = ngplus(net, lr=0.1, stat_every=3, inv_every=3, curvature_momentum=alpha)
    V = torch.randn(3, 19, dtype=DT)
    outs, batch_f = [], []
    for k in range(7):
        opt.zero_grad()
        F.cross_entropy(net(xs[k]), y).backward()
        if k in (0, 3):
            G = per_example_matrices(net, xs[k], y, F.cross_entropy, ["0"])["0"]
            batch_f.append(torch.einsum("nik,njk->ij", G, G) / 4 / 2.0)  # T = 4 -> 1/√T
        opt.step()
        outs.append(opt.blocks["0"].precondition(V))
        if k == 3:  # α weights the NEW statistic (reference convention)
            ref = (1 - alpha) * batch_f[0] + alpha * batch_f[1]
            torch.testing.assert_close(opt.blocks["0"].tensors["F"], ref)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[1], outs[2])
    assert not torch.equal(outs[2], outs[3])
    assert torch.equal(outs[3], outs[4]) and torch.equal(outs[4], outs[5])
    assert not torch.equal(outs[5], outs[6])


def test_damping_schedule_decays_per_step():
    lin = nn.Linear(3, 2).to(DT)
    x, y = torch.randn(5, 3, dtype=DT), torch.randint(0, 2, (5,))
    opt = ngplus(
        lin,
        damping=0.4,
        stat_every=2,
        inv_every=2,
        damping_decay_rate=0.5,
        damping_decay_every=4,
        smw="never",
    )
    for k in range(7):
        opt.zero_grad()
        F.cross_entropy(lin(x), y).backward()
        opt.step()
        if k % 2 == 0:  # refreshed at step k with μ·r^(k/4), shift √(·)
            expect = math.sqrt(0.4 * 0.5 ** (k / 4))
            assert float(opt.blocks[""].tensors["shift"]) == pytest.approx(expect, rel=1e-12)


# --------------------------------------------------------------------------- optimizer level
def test_step_is_sgd_on_preconditioned_direction():
    lin = nn.Linear(3, 2).to(DT)
    x, y = torch.randn(6, 3, dtype=DT), torch.randint(0, 2, (6,))
    opt = ngplus(lin, lr=0.3, weight_decay=0.1, smw="never")
    W0, b0 = lin.weight.detach().clone(), lin.bias.detach().clone()
    F.cross_entropy(lin(x), y).backward()
    V = opt.layers[""].grad_matrix()
    opt.step()
    P = opt.blocks[""].precondition(V)
    torch.testing.assert_close(lin.weight.detach(), W0 - 0.3 * (P[:, :3] + 0.1 * W0))
    torch.testing.assert_close(lin.bias.detach(), b0 - 0.3 * P[:, 3])


def _net():
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(75, 8),
        nn.ReLU(),
        nn.Linear(8, 3),
    ).to(DT)




def test_state_dict_round_trip_and_training():
    x, y = torch.randn(6, 2, 5, 5, dtype=DT), torch.randint(0, 3, (6,))
    assert NGPlus(_net()).blocks["5"].meta == {"ready": False}
    kw = dict(lr=0.05, stat_every=2, inv_every=4, damping_decay_rate=0.9, damping_decay_every=3)
    _, opt, _, _ = checkpoint_round_trip(_net, lambda net: NGPlus(net, **kw), x, y,
                                         before=5, after=6)
    assert opt.blocks["3"].uses_smw and not opt.blocks["0"].uses_smw  # m = 8 > N = 6
    mem = opt.memory_usage()
    assert mem["total"] > 0 and "inv" in mem and "U" in mem


def test_trains_a_tiny_conv_net():
    x, y = torch.randn(6, 2, 5, 5, dtype=DT), torch.randint(0, 3, (6,))
    net = _net()
    opt = NGPlus(net, lr=0.05, stat_every=2, inv_every=4, smw="never")
    first = F.cross_entropy(net(x), y).item()
    train_ce(net, opt, x, y, 12)
    assert F.cross_entropy(net(x), y).item() < 0.5 * first


def test_numerical_failure_keeps_previous_inverse():
    lin = nn.Linear(3, 2).to(DT)
    x, y = torch.randn(5, 3, dtype=DT), torch.randint(0, 2, (5,))
    opt = ngplus(lin, smw="never", lr=0.1)
    train_ce(lin, opt, x, y, 1)
    old = opt.blocks[""].tensors["inv"].clone()
    opt.blocks[""].tensors["F"].fill_(float("nan"))
    with pytest.warns(RuntimeWarning, match="failed"):
        train_ce(lin, opt, x, y, 2)
    assert torch.equal(opt.blocks[""].tensors["inv"], old)
    assert all(torch.isfinite(p).all() for p in lin.parameters())



