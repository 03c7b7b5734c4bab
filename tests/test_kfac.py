"""K-FAC / KFC (optimizers/kfac.py): ALGORITHMS.md §1.9 and §10 against torch.func references."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from _helpers import checkpoint_round_trip, train_ce
from ngbench.optimizers._kronecker import KroneckerBlock
from ngbench.optimizers.kfac import KFAC
from torch import nn
from torch.func import functional_call, grad, jacrev, vmap

DT = torch.float64
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def kfac(model, **kw):
    for k, v in dict(kl_clip=None, stat_every=1, inv_every=1, momentum=0.0).items():
        kw.setdefault(k, v)
    return KFAC(model, **kw)


def homogeneous_perm(layer: nn.Linear, offset: int = 0) -> torch.Tensor:
    """Indices mapping (weight, bias) flat order to the row-major [W | b] layout."""
    m, d = layer.weight.shape
    idx = torch.arange(m * d + m) + offset
    return torch.cat([idx[: m * d].reshape(m, d), idx[m * d :].reshape(m, 1)], 1).reshape(-1)


def ggn_mse(model, x):
    """Exact GGN of mean ½‖f(x)-y‖² (H = I), parameters flattened in named order."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def f_one(p, xi):
        return functional_call(model, p, (xi.unsqueeze(0),)).squeeze(0)

    jac = vmap(jacrev(f_one), in_dims=(None, 0))(params, x)
    J = torch.cat([j.reshape(x.shape[0], j.shape[1], -1) for j in jac.values()], 2)
    return torch.einsum("nop,noq->pq", J, J) / x.shape[0]


def one_step_stats(model, loss_fn, *, lr=0.0, **kw):
    opt = kfac(model, lr=lr, **kw)
    opt.zero_grad()
    loss_fn().backward()
    opt.step()
    return opt


# --------------------------------------------------------------------------- §1.9.1
def test_eigen_kfac_equals_damped_natural_gradient_linear_mse_exact_G():
    lin = nn.Linear(4, 3).to(DT)
    x, y = torch.randn(6, 4, dtype=DT), torch.randn(6, 3, dtype=DT)
    lam = 0.3

    def loss():
        return 0.5 * (lin(x) - y).pow(2).sum(1).mean()

    opt = one_step_stats(lin, loss, damping=lam)
    block = opt.blocks[""]
    block.tensors["G"] = torch.eye(3, dtype=DT)  # exact G for MSE (H = I)
    assert block.refresh(lam)
    V = opt.layers[""].grad_matrix()
    P = block.precondition(V)

    perm = homogeneous_perm(lin)
    Fd = ggn_mse(lin, x)[perm][:, perm]
    ref = torch.linalg.solve(Fd + lam * torch.eye(15, dtype=DT), V.reshape(-1)).reshape(3, 5)
    torch.testing.assert_close(P, ref)

    # negative test: factored Tikhonov damping is a different matrix
    ft = KroneckerBlock(opt.layers[""], damping_form="factored_tikhonov")
    ft.tensors = {k: block.tensors[k] for k in ("A", "G", "T")}
    ft.meta["commits"] = 1
    assert ft.refresh(lam)
    rel = (ft.precondition(V) - ref).norm() / ref.norm()
    assert rel > 0.05


# --------------------------------------------------------------------------- §1.9.2
def test_deep_linear_kfac_block_equals_exact_ggn_block():
    net = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)).to(DT)
    x, y = torch.randn(7, 3, dtype=DT), torch.randn(7, 2, dtype=DT)

    def loss():
        return 0.5 * (net(x) - y).pow(2).sum(1).mean()

    opt = one_step_stats(net, loss)
    A1 = opt.blocks["0"].tensors["A"]
    W2 = net[1].weight.detach()
    G1 = W2.T @ W2  # exact G of layer 1 for MSE
    perm = homogeneous_perm(net[0])
    Fd = ggn_mse(net, x)[perm][:, perm]
    torch.testing.assert_close(torch.kron(G1, A1), Fd)


# --------------------------------------------------------------------------- §1.9.3 + EF scale
def test_ef_factors_single_example_equal_ef_block_and_g_scaling():
    lin = nn.Linear(3, 4).to(DT)

    def ce(out, yy):
        return F.cross_entropy(out, yy)

    x1, y1 = torch.randn(1, 3, dtype=DT), torch.randint(0, 4, (1,))
    opt = one_step_stats(lin, lambda: ce(lin(x1), y1))
    b = opt.blocks[""]
    params = {k: v.detach() for k, v in lin.named_parameters()}
    gr = grad(lambda p: ce(functional_call(lin, p, (x1,)), y1))(params)
    v = torch.cat([gr["weight"], gr["bias"].unsqueeze(1)], 1).reshape(-1)
    torch.testing.assert_close(torch.kron(b.tensors["G"], b.tensors["A"]), torch.outer(v, v))

    # N > 1: G is the second moment of the per-example gradients (hook value × N)
    x, y = torch.randn(5, 3, dtype=DT), torch.randint(0, 4, (5,))
    opt = one_step_stats(lin, lambda: ce(lin(x), y))
    g = torch.softmax(lin(x).detach(), 1) - F.one_hot(y, 4).to(DT)
    torch.testing.assert_close(opt.blocks[""].tensors["G"], g.T @ g / 5)


# --------------------------------------------------------------------------- §1.9.4
def _random_block(layer_module, form, *, T=1.0, pi=True):
    from ngbench.optimizers._layers import make_helper

    h = make_helper("x", layer_module)
    blk = KroneckerBlock(h, damping_form=form, pi_correction=pi)
    m, n = h.out_dim, h.in_dim
    xa, xg = torch.randn(2 * n, n, dtype=DT), torch.randn(2 * m, m, dtype=DT)
    A = torch.rand(n, dtype=DT) if h.diagonal_input else xa.T @ xa / (2 * n)
    blk.tensors = {"A": A, "G": xg.T @ xg / (2 * m), "T": torch.tensor(T, dtype=DT)}
    blk.meta["commits"] = 1
    return blk, m, n


MODULES = {
    "linear": lambda: nn.Linear(4, 3),
    "linear_nobias": lambda: nn.Linear(4, 3, bias=False),
    "conv": lambda: nn.Conv2d(2, 3, 2),
    "embedding": lambda: nn.Embedding(5, 3),
}


@pytest.mark.parametrize("kind", list(MODULES))
@pytest.mark.parametrize("T", [1.0, 9.0])
def test_damping_forms_equal_their_kron_solves(kind, T):
    lam = 0.2
    mod = MODULES[kind]().to(DT)
    for form in ("eigen", "inverse", "factored_tikhonov"):
        blk, m, n = _random_block(mod, form, T=T)
        assert blk.refresh(lam)
        A, G = blk.tensors["A"], blk.tensors["G"]
        if A.dim() == 1:
            A = torch.diag(A)
        V = torch.randn(m, n, dtype=DT)
        I_m, I_n = torch.eye(m, dtype=DT), torch.eye(n, dtype=DT)
        if form == "eigen":
            M = T * torch.kron(G, A) + lam * torch.eye(m * n, dtype=DT)
        elif form == "inverse":
            M = T * torch.kron(G + lam / T * I_m, A + lam / T * I_n)
        else:
            gamma = (lam / T) ** 0.5
            pi = ((A.trace() / n) / (G.trace() / m)).sqrt()
            M = T * torch.kron(G + gamma / pi * I_m, A + pi * gamma * I_n)
        ref = torch.linalg.solve(M, V.reshape(-1)).reshape(m, n)
        torch.testing.assert_close(blk.precondition(V), ref)
        torch.testing.assert_close(blk.damped_dense(lam), M)


def test_factored_tikhonov_without_pi_is_sqrt_damping_on_both_factors():
    blk, m, n = _random_block(nn.Linear(3, 2).to(DT), "factored_tikhonov", pi=False)
    lam = 0.09
    blk.refresh(lam)
    A, G = blk.tensors["A"], blk.tensors["G"]
    V = torch.randn(m, n, dtype=DT)
    ref = torch.linalg.solve(G + 0.3 * torch.eye(m, dtype=DT), V) @ torch.linalg.inv(
        A + 0.3 * torch.eye(n, dtype=DT)
    )
    torch.testing.assert_close(blk.precondition(V), ref)


# --------------------------------------------------------------------------- optimizer step
def test_step_is_sgd_on_preconditioned_direction_with_decoupled_weight_decay():
    lin = nn.Linear(3, 2).to(DT)
    x, y = torch.randn(6, 3, dtype=DT), torch.randint(0, 2, (6,))
    opt = kfac(lin, lr=0.3, weight_decay=0.1, momentum=0.9)
    W0, b0 = lin.weight.detach().clone(), lin.bias.detach().clone()
    F.cross_entropy(lin(x), y).backward()
    V = opt.layers[""].grad_matrix()
    opt.step()
    P = opt.blocks[""].precondition(V)
    torch.testing.assert_close(lin.weight.detach(), W0 - 0.3 * (P[:, :3] + 0.1 * W0))
    torch.testing.assert_close(lin.bias.detach(), b0 - 0.3 * P[:, 3])  # no decay on biases


def test_kl_clip_identity():
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(DT)
    x, y = torch.randn(8, 3, dtype=DT), torch.randint(0, 2, (8,))
    lr, kappa = 0.5, 1e-4
    for clip, expect_clip in ((kappa, True), (1e9, False)):
        model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(DT)
        model.load_state_dict(net.state_dict())
        opt = kfac(model, lr=lr, kl_clip=clip)
        F.cross_entropy(model(x), y).backward()
        Vs = {n: h.grad_matrix() for n, h in opt.layers.items()}
        opt.step()
        vdotp = sum(float((opt.blocks[n].precondition(V) * V).sum()) for n, V in Vs.items())
        nu = opt.last_kl_scale
        if expect_clip:
            assert nu < 1
            assert nu**2 * lr**2 * vdotp == pytest.approx(kappa, rel=1e-10)
        else:
            assert nu == 1.0


def test_preconditioner_bit_identical_between_refreshes():
    net = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(12, 2)).to(DT)
    x, y = torch.randn(4, 2, 4, 4, dtype=DT), torch.randint(0, 2, (4,))
    opt = kfac(net, lr=0.1, stat_every=1, inv_every=4)
    V = torch.randn(3, 19, dtype=DT)
    outs = []
    for _ in range(6):
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
        outs.append(opt.blocks["0"].precondition(V))
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[1], outs[2])
    assert torch.equal(outs[2], outs[3])
    assert not torch.equal(outs[3], outs[4])  # step 4 refreshed with newer factors
    assert torch.equal(outs[4], outs[5])


def _conv_net():
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(3, 4, 3, stride=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16, 3),
    ).to(DT)




def test_state_dict_round_trip_continues_identically():
    x, y = torch.randn(6, 2, 5, 5, dtype=DT), torch.randint(0, 3, (6,))
    kw = dict(lr=0.05, momentum=0.9, stat_every=2, inv_every=4, kl_clip=1e-2)
    _, _, net2, opt2 = checkpoint_round_trip(
        _conv_net, lambda net: KFAC(net, **kw), x, y, before=5, after=5
    )
    with pytest.raises(ValueError, match="curvature"):
        opt2.load_state_dict(torch.optim.SGD(net2.parameters(), lr=0.1).state_dict())


def test_works_with_lr_scheduler():
    lin = nn.Linear(3, 2).to(DT)
    x, y = torch.randn(6, 3, dtype=DT), torch.randint(0, 2, (6,))
    opt = kfac(lin, lr=0.4, stat_every=1, inv_every=100)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for k in range(3):
        opt.zero_grad()
        F.cross_entropy(lin(x), y).backward()
        V = opt.layers[""].grad_matrix()
        W0 = lin.weight.detach().clone()
        opt.step()
        sched.step()
        P = opt.blocks[""].precondition(V)
        torch.testing.assert_close(lin.weight.detach(), W0 - 0.4 * 0.5**k * P[:, :3])
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)


def test_kfac_trains_a_tiny_conv_net():
    x, y = torch.randn(16, 2, 5, 5, dtype=DT), torch.randint(0, 3, (16,))
    net = _conv_net()
    opt = KFAC(net, lr=0.1, stat_every=2, inv_every=4)
    first = F.cross_entropy(net(x), y).item()
    train_ce(net, opt, x, y, 30)
    assert F.cross_entropy(net(x), y).item() < 0.5 * first


# --------------------------------------------------------------------------- registry/config
