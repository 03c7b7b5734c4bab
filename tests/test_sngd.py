"""SNGD (optimizers/sngd.py): ALGORITHMS.md §5.5 and §10 #16."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from _helpers import checkpoint_round_trip, train_ce
from ngbench.optimizers.sngd import SNGD, denman_beavers
from torch import nn

DT = torch.float64
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def sngd(model, **kw):
    for k, v in dict(stat_every=1, inv_every=1, momentum=0.0, lr=0.0).items():
        kw.setdefault(k, v)
    return SNGD(model, **kw)


def homog(x):
    return torch.cat([x, torch.ones(*x.shape[:-1], 1, dtype=x.dtype)], -1)


def inv_sqrt(m):
    d, q = torch.linalg.eigh(m)
    return (q * d.rsqrt().unsqueeze(-2)) @ q.transpose(-1, -2)


# --------------------------------------------------------------------------- §5.5.1
@pytest.mark.parametrize("mode", ["input", "rfim"])
def test_sgd_on_reparametrized_layer_equals_preconditioned_step(mode):
    lin = nn.Linear(3, 4).to(DT)
    x, y = torch.randn(7, 3, dtype=DT), torch.randint(0, 4, (7,))
    lr, eps = 0.4, 1e-2
    W = torch.cat([lin.weight.detach(), lin.bias.detach()[:, None]], 1).clone()
    opt = sngd(lin, lr=lr, damping=eps, mode=mode, first_last_shared=False)
    F.cross_entropy(lin(x), y).backward()
    opt.step()
    block = opt.blocks[""]
    xt = homog(x)
    # the metric itself, from its definition
    if mode == "input":
        assert block.kind == "input"
        torch.testing.assert_close(block.tensors["M"], xt.T @ xt / 7)
    else:
        assert block.kind == "unit"
        psi = torch.sigmoid(xt @ W.T).pow(2)  # σ(h)² of the layer's own pre-activation
        torch.testing.assert_close(
            block.tensors["M"], torch.einsum("nj,nk,nl->jkl", psi, xt, xt) / 7
        )
    Md = block.damped_metric(eps)
    R = inv_sqrt(Md)  # M^{-1/2}: (n, n), or one per output unit (m, n, n)
    # the reconstructed layer: W = W' M^{-1/2} (row by row for per-unit metrics)
    if mode == "input":
        Wp = (W @ torch.linalg.inv(R)).requires_grad_(True)
        W_of = lambda wp: wp @ R  # noqa: E731
    else:
        Wp = torch.einsum("jk,jkl->jl", W, torch.linalg.inv(R)).requires_grad_(True)
        W_of = lambda wp: torch.einsum("jk,jkl->jl", wp, R)  # noqa: E731
    loss = F.cross_entropy(xt @ W_of(Wp).T, y)
    (gp,) = torch.autograd.grad(loss, Wp)
    W_new = W_of(Wp.detach() - lr * gp)
    got = torch.cat([lin.weight.detach(), lin.bias.detach()[:, None]], 1)
    torch.testing.assert_close(got, W_new)


# --------------------------------------------------------------------------- §5.5.3
def test_per_unit_metric_single_example_sherman_morrison():
    lin = nn.Linear(4, 3).to(DT)
    x, y = torch.randn(1, 4, dtype=DT), torch.randint(0, 3, (1,))
    eps_rel, eps_abs = 1e-9, 0.3
    opt = sngd(
        lin,
        mode="rfim",
        unit_weight="one",
        first_last_shared=False,
        damping=eps_rel,
        damping_abs=eps_abs,
        rank_warmup=False,  # one row: the metric is singular without the damping
    )
    F.cross_entropy(lin(x), y).backward()
    V = opt.layers[""].grad_matrix()
    opt.step()
    xt = homog(x)[0]
    g = V[:, -1]  # ∇W_j = g_j x̃ᵀ
    shift = eps_rel * xt.dot(xt) + eps_abs  # ε_rel·tr M + ε_abs, tr M = ‖x̃‖²
    expect = torch.outer(g, xt) / (xt.dot(xt) + shift)
    torch.testing.assert_close(opt.blocks[""].precondition(V), expect)


# --------------------------------------------------------------------------- §5.5.2
def test_denman_beavers_matches_eigh():
    a = torch.randn(6, 6, dtype=DT)
    m = a @ a.T + 0.5 * torch.eye(6, dtype=DT)
    root, inv_root = denman_beavers(m)
    d, q = torch.linalg.eigh(m)
    torch.testing.assert_close(root, (q * d.sqrt()) @ q.T)
    torch.testing.assert_close(inv_root, (q * d.rsqrt()) @ q.T)
    batch = torch.stack([m, m + torch.eye(6, dtype=DT)])
    torch.testing.assert_close(denman_beavers(batch)[1], inv_sqrt(batch))


# --------------------------------------------------------------------------- layers
def test_conv_metrics_from_unfolded_patches():
    conv = nn.Conv2d(2, 3, 2, padding=1).to(DT)
    x = torch.randn(4, 2, 3, 3, dtype=DT)
    for conv_mode in ("input", "unit"):
        opt = sngd(conv, conv_mode=conv_mode, first_last_shared=False)
        out = conv(x)
        out.pow(2).mean().backward()
        opt.step()
        patches = homog(F.unfold(x, 2, padding=1).transpose(1, 2)).reshape(-1, 9)  # (N·T, n)
        block = opt.blocks[""]
        if conv_mode == "input":
            ref = patches.T @ patches / patches.shape[0]
        else:
            h = out.detach().permute(0, 2, 3, 1).reshape(-1, 3)  # the conv's own output
            psi = torch.sigmoid(h).pow(2)
            ref = torch.einsum("rj,rk,rl->jkl", psi, patches, patches) / patches.shape[0]
        assert block.kind == conv_mode
        torch.testing.assert_close(block.tensors["M"], ref)
        opt.remove_hooks()
        conv.zero_grad()


def test_first_and_last_layers_use_the_shared_metric():
    net = nn.Sequential(
        nn.Conv2d(1, 2, 2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8, 5),
        nn.ReLU(),
        nn.Linear(5, 6),
        nn.ReLU(),
        nn.Linear(6, 2),
    ).to(DT)
    kinds = {n: b.kind for n, b in sngd(net).blocks.items()}
    assert kinds == {"0": "input", "3": "unit", "5": "unit", "7": "input"}
    kinds = {
        n: b.kind for n, b in sngd(net, conv_mode="unit", first_last_shared=False).blocks.items()
    }
    assert kinds == {"0": "unit", "3": "unit", "5": "unit", "7": "unit"}
    assert {b.kind for b in sngd(net, mode="input").blocks.values()} == {"input"}
    with pytest.warns(UserWarning, match="unit_max_elements"):
        opt = sngd(net, unit_max_elements=300)  # layer 3 needs 5·9² = 405, layer 5 6·6² = 216
    assert {n: b.kind for n, b in opt.blocks.items()} == {
        "0": "input",
        "3": "input",
        "5": "unit",
        "7": "input",
    }


def test_embedding_diagonal_metric():
    net = nn.Sequential(nn.Embedding(5, 3), nn.Flatten(), nn.Linear(6, 2)).to(DT)
    idx, y = torch.tensor([[0, 1], [1, 1], [4, 0]]), torch.randint(0, 2, (3,))
    eps = 0.1
    opt = sngd(net, damping=eps, damping_abs=0.05)
    F.cross_entropy(net(idx), y).backward()
    V = opt.layers["0"].grad_matrix()
    opt.step()
    counts = torch.tensor([2.0, 3.0, 0.0, 0.0, 1.0], dtype=DT) / 6
    torch.testing.assert_close(opt.blocks["0"].tensors["M"], counts)
    torch.testing.assert_close(opt.blocks["0"].precondition(V), V / (counts + eps * 1.0 + 0.05))


def test_rank_warmup_keeps_plain_gradient_until_enough_rows():
    lin = nn.Linear(6, 3).to(DT)  # n = 7: needs 7 rows
    opt = sngd(lin, stat_every=1, inv_every=100, first_last_shared=False, lr=0.1)
    for k in range(2):
        x = torch.randn(4, 6, dtype=DT)
        W0 = lin.weight.detach().clone()
        opt.zero_grad()
        lin(x).pow(2).mean().backward()
        gw = lin.weight.grad.clone()
        opt.step()
        if k == 0:  # 4 rows: plain SGD direction
            assert not opt.blocks[""].ready
            torch.testing.assert_close(lin.weight.detach(), W0 - 0.1 * gw)
        else:  # 8 rows: first inverse at once
            assert opt.blocks[""].ready
            assert not torch.allclose(lin.weight.detach(), W0 - 0.1 * gw)


def test_stat_decay_is_per_iteration():
    lin = nn.Linear(3, 2).to(DT)
    xs = [torch.randn(5, 3, dtype=DT) for _ in range(3)]
    opt = sngd(lin, stat_every=2, inv_every=2, stat_decay=0.9, mode="input")
    for x in xs:
        opt.zero_grad()
        lin(x).pow(2).mean().backward()
        opt.step()
    m0, m2 = (homog(xs[k]).T @ homog(xs[k]) / 5 for k in (0, 2))
    torch.testing.assert_close(opt.blocks[""].tensors["M"], 0.81 * m0 + 0.19 * m2)


@pytest.mark.parametrize("mode", ["input", "rfim"])
def test_identity_init_is_the_released_average(mode):
    """``init="identity"`` (released code): ``M_k = d^k I + (1-d) Σ_j d^(k-1-j) M(batch_j)``, and a
    refresh inverts that mix; ``"first_batch"`` starts from the first batch metric instead."""
    d, damping = 0.9, 1e-3
    lin = nn.Linear(3, 2).to(DT)
    opt = sngd(lin, init="identity", stat_decay=d, inv_every=2, damping=damping, lr=0.1,
               first_last_shared=False, mode=mode)
    block = opt.blocks[""]
    shape = (2, 4, 4) if mode == "rfim" else (4, 4)
    eye = torch.eye(4, dtype=DT).expand(shape)
    assert block.ready and torch.equal(block.tensors["M"], eye)
    assert torch.equal(block.tensors["Minv"], eye)
    want = eye.clone()
    for k in range(3):
        x = torch.randn(5, 3, dtype=DT)
        xt = homog(x)
        if mode == "rfim":  # per unit j: mean of sigmoid(h_j)^2 x̃ x̃ᵀ, h from the forward weights
            psi = torch.sigmoid(xt @ torch.cat([lin.weight, lin.bias[:, None]], 1).T).pow(2)
            batch = torch.einsum("rj,ra,rb->jab", psi.detach(), xt, xt) / 5
        else:
            batch = xt.T @ xt / 5
        want = d * want + (1 - d) * batch
        W0 = torch.cat([lin.weight, lin.bias[:, None]], 1).detach()
        opt.zero_grad()
        lin(x).pow(2).mean().backward()
        g = torch.cat([lin.weight.grad, lin.bias.grad[:, None]], 1)
        opt.step()
        torch.testing.assert_close(block.tensors["M"], want)
        if k == 2:  # refreshed at steps 0 and 2: the step used inv(M + ε tr(M) I)
            tr = want.diagonal(dim1=-2, dim2=-1).sum(-1)
            inv = torch.linalg.inv(want + (damping * tr)[..., None, None] * eye)
            p = (inv @ g.unsqueeze(-1)).squeeze(-1) if mode == "rfim" else g @ inv
            W1 = torch.cat([lin.weight, lin.bias[:, None]], 1).detach()
            torch.testing.assert_close(W1, W0 - 0.1 * p)
    fb = sngd(nn.Linear(3, 2).to(DT), first_last_shared=False, mode=mode)
    assert "M" not in fb.blocks[""].tensors and not fb.blocks[""].ready  # first_batch: no prior


# --------------------------------------------------------------------------- state / errors
def _net():
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(75, 8),
        nn.ReLU(),
        nn.Linear(8, 8),
        nn.ReLU(),
        nn.Linear(8, 3),
    ).to(DT)




def test_state_dict_round_trip_training_and_fallback():
    x, y = torch.randn(8, 2, 5, 5, dtype=DT), torch.randint(0, 3, (8,))
    start = [_net()]  # trained first; the copy that loads the checkpoint is a fresh net
    first = F.cross_entropy(start[0](x), y).item()
    kw = dict(lr=0.05, stat_every=2, inv_every=4, damping=1e-3, momentum=0.0)
    net, opt, _, _ = checkpoint_round_trip(
        lambda: start.pop() if start else _net(), lambda net: SNGD(net, **kw), x, y,
        before=5, after=15,
    )
    assert F.cross_entropy(net(x), y).item() < 0.5 * first
    # conv (first): shared 19²; hidden Linear: 8 units × 76² and 8 × 9²; last: shared 9²
    assert opt.memory_usage()["Minv"] == (19**2 + 8 * 76**2 + 8 * 9**2 + 9**2) * 8
    # a failed inverse keeps the previous one
    old = opt.blocks["5"].tensors["Minv"].clone()
    opt.blocks["5"].tensors["M"].fill_(float("nan"))
    with pytest.warns(RuntimeWarning, match="failed"):
        train_ce(net, opt, x, y, 4)
    assert torch.equal(opt.blocks["5"].tensors["Minv"], old)

