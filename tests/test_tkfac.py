"""TKFAC and TEKFAC (optimizers/tkfac.py, optimizers/tekfac.py): ALGORITHMS.md §3.5 and §10 #8
against torch.func dense empirical-Fisher references and closed forms (float64, tiny layers)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from _helpers import checkpoint_round_trip, train_ce
from _reference import dense_ef, per_example_matrices
from ngbench.optimizers._layers import make_helper
from ngbench.optimizers.tekfac import TEKFAC
from ngbench.optimizers.tkfac import TKFAC, TKFACBlock
from torch import nn
from torch.func import functional_call, grad, vmap

DT = torch.float64
ROOT = Path(__file__).resolve().parents[1]
BASE = dict(kl_clip=None, momentum=0.0, stat_every=1)
FORMS = ("weighted", "normalized")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def mlp(bias=True):
    return nn.Sequential(nn.Linear(3, 4, bias=bias), nn.Tanh(), nn.Linear(4, 3)).to(DT)


def conv_net():
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(3, 2, 2, stride=2, bias=False),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8, 3),
    ).to(DT)








def stats_of(model, x, y, **kw):
    opt = TKFAC(model, lr=0.0, **BASE, **kw)
    train_ce(model, opt, x, y, 1)
    return opt


# --------------------------------------------------------------------------- §3.5.1 / 3
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("bias", [True, False])
def test_trace_identity_against_dense_ef(form, bias):
    model = mlp(bias)
    x, y = torch.randn(9, 3, dtype=DT), torch.randint(0, 3, (9,))
    opt = stats_of(model, x, y, trace_form=form)
    pe = per_example_matrices(model, x, y)
    for name, block in opt.blocks.items():
        phi, psi, delta = block.factors()
        assert phi.trace() == pytest.approx(1.0) and psi.trace() == pytest.approx(1.0)
        Fd = dense_ef(pe[name])
        assert block.dense().trace() == pytest.approx(float(Fd.trace()), rel=1e-10)
        assert delta == pytest.approx(float(Fd.trace()), rel=1e-10)


@pytest.mark.parametrize("form", FORMS)
def test_single_example_equals_dense_ef_exactly(form):
    model = mlp()
    x, y = torch.randn(1, 3, dtype=DT), torch.randint(0, 3, (1,))
    opt = stats_of(model, x, y, trace_form=form)
    pe = per_example_matrices(model, x, y)
    for name, block in opt.blocks.items():
        torch.testing.assert_close(block.dense(), dense_ef(pe[name]))


def test_weighted_and_normalized_readings_differ_in_general():
    model = mlp()
    x = torch.randn(9, 3, dtype=DT) * torch.linspace(0.2, 3, 9, dtype=DT)[:, None]
    y = torch.randint(0, 3, (9,))
    w = stats_of(model, x, y, trace_form="weighted").blocks["2"].factors()
    n = stats_of(model, x, y, trace_form="normalized").blocks["2"].factors()
    assert (w[0] - n[0]).norm() > 1e-3 * n[0].norm()
    assert w[2] == pytest.approx(n[2])  # same δ


# --------------------------------------------------------------------------- §3.5.2
def test_equal_norm_examples_give_trace_normalized_kfac_factors():
    h = make_helper("l", nn.Linear(4, 3).to(DT))
    a = torch.randn(6, 1, 4, dtype=DT)
    a = a / a.norm(dim=2, keepdim=True) * 1.7  # ‖ā_n‖² = 1.7² + 1 for every n
    g = torch.randn(6, 1, 3, dtype=DT)
    g = g / g.norm(dim=2, keepdim=True) * 0.3
    blocks = {}
    for form in FORMS:
        b = TKFACBlock(h, trace_form=form)
        b.update_stats(a, g)
        b.commit_stats(0.95)
        blocks[form] = b
    a_h = torch.cat([a[:, 0], torch.ones(6, 1, dtype=DT)], 1)
    A, G = a_h.T @ a_h / 6, g[:, 0].T @ g[:, 0] / 6
    for b in blocks.values():
        phi, psi, delta = b.factors()
        torch.testing.assert_close(phi, A / A.trace())
        torch.testing.assert_close(psi, G / G.trace())
        assert delta == pytest.approx(float(A.trace() * G.trace()))  # = c · K-FAC, c = 1 here


# --------------------------------------------------------------------------- conv / embedding
# rows per example: T·n = 16·19 = 304 -> one piece, one example, two (5 = 2+2+1) per chunk
@pytest.mark.parametrize("chunk", [1 << 21, 1, 608])
@pytest.mark.parametrize("form", FORMS)
def test_conv_statistics_sum_locations_per_example(monkeypatch, form, chunk):
    monkeypatch.setattr(TKFACBlock, "ROW_CHUNK_ELEMENTS", chunk)
    conv = nn.Conv2d(2, 3, 3, padding=1).to(DT)
    h = make_helper("c", conv)
    x = torch.randn(5, 2, 4, 4, dtype=DT)
    a_h = h.input_rows(x)  # (N, T, n)
    g = torch.randn(5, a_h.shape[1], 3, dtype=DT)
    b = TKFACBlock(h, trace_form=form)
    b.update_stats(x, g)  # the raw conv input, as the optimizer's hook captures it
    b.commit_stats(0.95)
    T = a_h.shape[1]
    lam = [a_h[n].T @ a_h[n] for n in range(5)]  # Λ_n = Σ_t ā ā ᵀ
    gam = [g[n].T @ g[n] for n in range(5)]
    tr = torch.stack([lam[n].trace() * gam[n].trace() for n in range(5)])
    if form == "weighted":
        phi = sum(gam[n].trace() * lam[n] for n in range(5)) / tr.sum()
        psi = sum(lam[n].trace() * gam[n] for n in range(5)) / tr.sum()
    else:
        phi, psi = sum(lam) / sum(lam).trace(), sum(gam) / sum(gam).trace()
    got_phi, got_psi, delta = b.factors()
    torch.testing.assert_close(got_phi, phi)
    torch.testing.assert_close(got_psi, psi)
    assert delta == pytest.approx(float(tr.mean()) / T)
    assert b.dense().trace() == pytest.approx(float(tr.mean()) / T)


def test_embedding_factor_is_diagonal_and_trace_matches_dense_ef():
    emb = nn.Embedding(5, 3).to(DT)
    model = nn.Sequential(emb, nn.Flatten(), nn.Linear(3, 2).to(DT))
    ids, y = torch.randint(0, 5, (7, 1)), torch.randint(0, 2, (7,))  # one token per example
    opt = TKFAC(model, lr=0.0, layers=["0"], **BASE)
    train_ce(model, opt, ids, y, 1)
    params = {k: v.detach() for k, v in model.named_parameters()}

    def one(p, xi, yi):
        return F.cross_entropy(functional_call(model, p, (xi.unsqueeze(0),)), yi.unsqueeze(0))

    model.eval()
    pe = vmap(grad(one), in_dims=(None, 0, 0))(params, ids, y)["0.weight"].transpose(1, 2)
    block = opt.blocks["0"]
    assert block.tensors["Phi"].dim() == 1
    assert block.dense().trace() == pytest.approx(float(dense_ef(pe).trace()), rel=1e-10)
    V = torch.randn(3, 5, dtype=DT)
    phi, psi, delta = block.factors()
    lam = opt.param_groups[0]["damping"]
    M = torch.kron(
        math.sqrt(delta) * psi + math.sqrt(lam) * torch.eye(3, dtype=DT),
        math.sqrt(delta) * torch.diag(phi) + math.sqrt(lam) * torch.eye(5, dtype=DT),
    )
    ref = torch.linalg.solve(M, V.reshape(-1)).reshape(3, 5)
    torch.testing.assert_close(block.precondition(V), ref)


# --------------------------------------------------------------------------- damping
@pytest.mark.parametrize("conv_damping", ["standard", "trace"])
def test_precondition_equals_damped_kron_solve(conv_damping):
    model = conv_net()
    x, y = torch.randn(6, 2, 4, 4, dtype=DT), torch.randint(0, 3, (6,))
    opt = TKFAC(model, lr=0.0, damping=0.04, conv_damping=conv_damping, **BASE)
    train_ce(model, opt, x, y, 1)
    for name, block in opt.blocks.items():
        phi, psi, delta = block.factors()
        lam = 0.04 * delta if (conv_damping == "trace" and name != "5") else 0.04
        m, n = psi.shape[0], phi.shape[0]
        M = torch.kron(
            math.sqrt(delta) * psi + math.sqrt(lam) * torch.eye(m, dtype=DT),
            math.sqrt(delta) * phi + math.sqrt(lam) * torch.eye(n, dtype=DT),
        )
        V = torch.randn(m, n, dtype=DT)
        ref = torch.linalg.solve(M, V.reshape(-1)).reshape(m, n)
        torch.testing.assert_close(block.precondition(V), ref)


# --------------------------------------------------------------------------- TEKFAC
@pytest.mark.parametrize("form", FORMS)
def test_tekfac_single_example_equals_tkfac(form):
    x, y = torch.randn(1, 3, dtype=DT), torch.randint(0, 3, (1,))
    out = {}
    for cls in (TEKFAC, TKFAC):
        torch.manual_seed(1)
        model = mlp()
        opt = cls(model, lr=0.0, inv_every=100, damping=0.03, trace_form=form, **BASE)
        out[cls] = (opt, train_ce(model, opt, x, y, 3))
    for block in out[TEKFAC][0].blocks.values():
        assert block.meta["scale_updates"] == 2
        d_psi, d_phi = block.tensors["dG"], block.tensors["dA"]
        _, _, delta = block.structure.factors()
        torch.testing.assert_close(block.tensors["s"], delta * torch.outer(d_psi, d_phi))
    for a, b in zip(out[TEKFAC][1][-1], out[TKFAC][1][-1], strict=True):
        torch.testing.assert_close(a, b)


def test_tekfac_equals_tkfac_right_after_recompute_and_eigen_damping_differs():
    x, y = torch.randn(7, 2, 4, 4, dtype=DT), torch.randint(0, 3, (7,))
    out = {}
    for key, cls, kw in (
        ("tek", TEKFAC, {}),
        ("tk", TKFAC, {}),
        ("eig", TEKFAC, {"damping_style": "eigen"}),
    ):
        torch.manual_seed(1)
        model = conv_net()
        opt = cls(model, lr=0.0, inv_every=3, **BASE, **kw)
        out[key] = train_ce(model, opt, x, y, 5)

    def same(u, v):
        return all(torch.allclose(a, b, rtol=1e-9, atol=1e-12) for a, b in zip(u, v, strict=True))

    for k in range(5):
        assert same(out["tek"][k], out["tk"][k]) == (k in (0, 3)), k
        assert not same(out["eig"][k], out["tk"][k])


@pytest.mark.parametrize("chunk", [1 << 21, 1])  # one piece / one example per chunk
def test_tekfac_exact_scalings_equal_diag_of_projected_dense_ef(monkeypatch, chunk):
    monkeypatch.setattr(TKFACBlock, "ROW_CHUNK_ELEMENTS", chunk)
    model = mlp()
    x, y = torch.randn(8, 3, dtype=DT), torch.randint(0, 3, (8,))
    opt = TEKFAC(model, lr=0.0, inv_every=100, **BASE)
    train_ce(model, opt, x, y, 2)
    pe = per_example_matrices(model, x, y)
    for name, block in opt.blocks.items():
        Q = torch.kron(block.tensors["QG"], block.tensors["QA"])
        ref = torch.diagonal(Q.T @ dense_ef(pe[name]) @ Q).reshape(block.m, block.n)
        torch.testing.assert_close(block.tensors["s"], ref)
        _, _, delta = block.structure.factors()
        fresh = delta * torch.outer(block.tensors["dG"], block.tensors["dA"])
        assert (ref - fresh).norm() > 0.01 * ref.norm()  # N > 1: a real correction


# --------------------------------------------------------------------------- persistence etc.
@pytest.mark.parametrize("cls", [TKFAC, TEKFAC])
def test_state_dict_round_trip_continues_identically(cls):
    x, y = torch.randn(6, 2, 4, 4, dtype=DT), torch.randint(0, 3, (6,))
    torch.manual_seed(3)
    kw = dict(lr=0.05, momentum=0.9, stat_every=2, inv_every=4, kl_clip=1e-2)
    _, opt, _, _ = checkpoint_round_trip(conv_net, lambda net: cls(net, **kw), x, y,
                                         before=7, after=5)
    for b in opt.blocks.values():
        assert set(b.tensors) >= {"Phi", "Psi", "trace", "T"}




@pytest.mark.parametrize(
    "cls,kw",
    [
        (TKFAC, {}),
        (TKFAC, {"trace_form": "normalized", "conv_damping": "trace"}),
        (TEKFAC, {}),
        (TEKFAC, {"scalings": "ra", "scale_decay": 0.75}),
    ],
)
def test_trains_tiny_conv_net(cls, kw):
    x, y = torch.randn(16, 2, 4, 4, dtype=DT), torch.randint(0, 3, (16,))
    torch.manual_seed(2)
    net = conv_net()
    opt = cls(net, lr=0.1, stat_every=2, inv_every=4, **kw)
    first = F.cross_entropy(net(x), y).item()
    train_ce(net, opt, x, y, 25)
    assert F.cross_entropy(net(x), y).item() < 0.5 * first

