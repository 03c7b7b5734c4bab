"""EKFAC (optimizers/ekfac.py, optimizers/_eigencorrect.py): ALGORITHMS.md §2.7 and §10 #7
against torch.func dense empirical-Fisher references (float64, tiny layers)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from _helpers import checkpoint_round_trip, run_gloo, train_ce
from _reference import dense_ef, per_example_matrices
from ngbench.optimizers import build_optimizer
from ngbench.optimizers._eigencorrect import projected_second_moment
from ngbench.optimizers._layers import make_helper
from ngbench.optimizers.ekfac import EKFAC
from ngbench.optimizers.kfac import KFAC
from torch import nn
from torch.func import functional_call, grad, vmap

DT = torch.float64
ROOT = Path(__file__).resolve().parents[1]
BASE = dict(kl_clip=None, momentum=0.0, stat_every=1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def mlp():
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).to(DT)


def conv_net():
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(3, 2, 2, stride=2, bias=False),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8, 3),
    ).to(DT)


def data(model, n):
    if isinstance(model[0], nn.Conv2d):
        return torch.randn(n, 2, 4, 4, dtype=DT), torch.randint(0, 3, (n,))
    return torch.randn(n, 3, dtype=DT), torch.randint(0, 3, (n,))






def kfe(block) -> torch.Tensor:
    """Row-major Kronecker eigenbasis ``Q_G ⊗ Q_A`` (matches ``vec_r(Q_Gᵀ V Q_A)``)."""
    return torch.kron(block.tensors["QG"], block.tensors["QA"])




# --------------------------------------------------------------------------- §2.7.1
@pytest.mark.parametrize("chunked", [False, True])
@pytest.mark.parametrize("make", [mlp, conv_net])
def test_exact_scalings_equal_diag_of_projected_dense_ef(monkeypatch, make, chunked):
    if chunked:  # statistics one example at a time (uneven chunks are the default's case)
        from ngbench.optimizers._kronecker import KroneckerBlock  # EKFAC's factor structure
        from ngbench.optimizers._layers import Conv2dHelper

        monkeypatch.setattr(KroneckerBlock, "ROW_CHUNK_ELEMENTS", 1)
        monkeypatch.setattr(Conv2dHelper, "GRAM_CHUNK_ELEMENTS", 1)
    model = make()
    x, y = data(model, 7)
    opt = EKFAC(model, lr=0.0, inv_every=100, **BASE)
    train_ce(model, opt, x, y, 2)  # step 0: basis; step 1 (lr 0: same weights): first estimate
    pe = per_example_matrices(model, x, y)
    for name, block in opt.blocks.items():
        assert block.meta["scale_updates"] == 1
        Q = kfe(block)
        ref = torch.diagonal(Q.T @ dense_ef(pe[name]) @ Q).reshape(block.m, block.n)
        torch.testing.assert_close(block.tensors["s"], ref)
        torch.testing.assert_close(block.tensors["scale"], 1.0 / (ref + 1e-2))


def test_single_example_ekfac_equals_kfac_and_scalings_equal_kronecker_eigenvalues():
    x, y = data(mlp(), 1)
    runs = {}
    for cls in (EKFAC, KFAC):
        torch.manual_seed(1)
        model = mlp()
        opt = cls(model, lr=0.0, inv_every=100, damping=0.05, **BASE)
        runs[cls] = (opt, train_ce(model, opt, x, y, 3))
    ek, kf = runs[EKFAC], runs[KFAC]
    for block in ek[0].blocks.values():
        assert block.meta["scale_updates"] == 2
        torch.testing.assert_close(block.tensors["s"], block.kronecker_eigenvalues())
    for ge, gk in zip(ek[1][-1], kf[1][-1], strict=True):
        torch.testing.assert_close(ge, gk)


@pytest.mark.parametrize("make", [mlp, conv_net])
def test_direction_equals_kfac_right_after_basis_recompute_and_differs_between(make):
    x, y = data(make(), 6)
    runs = {}
    for cls in (EKFAC, KFAC):
        torch.manual_seed(1)
        model = make()
        opt = cls(model, lr=0.0, inv_every=3, **BASE)
        runs[cls] = train_ce(model, opt, x, y, 5)
    for k in range(5):
        same = all(
            torch.allclose(a, b, rtol=1e-9, atol=1e-12)
            for a, b in zip(runs[EKFAC][k], runs[KFAC][k], strict=True)
        )
        # steps 0 and 3 recompute the basis (scalings reset); 1, 2, 4 use corrected scalings
        assert same == (k in (0, 3)), k


def test_exact_scalings_differ_from_kronecker_eigenvalues_for_several_examples():
    model = mlp()
    x, y = data(model, 8)
    opt = EKFAC(model, lr=0.0, inv_every=100, **BASE)
    train_ce(model, opt, x, y, 2)
    for block in opt.blocks.values():
        s, k = block.tensors["s"], block.kronecker_eigenvalues()
        assert (s - k).norm() > 0.05 * k.norm()


# --------------------------------------------------------------------------- §2.7.3
@pytest.mark.parametrize("make", [mlp, conv_net])
def test_frobenius_error_not_larger_than_kfac(make):
    model = make()
    x, y = data(model, 9)
    opt = EKFAC(model, lr=0.0, inv_every=100, stat_decay=0.0, **BASE)
    train_ce(model, opt, x, y, 2)  # same batch twice: A, G are this batch's factors
    pe = per_example_matrices(model, x, y)
    for name, block in opt.blocks.items():
        Fd = dense_ef(pe[name])
        A, G, T = block.structure.factors()
        Q = kfe(block)
        ek = Q @ torch.diag(block.tensors["s"].reshape(-1)) @ Q.T
        err_ek = (Fd - ek).norm()
        err_kf = (Fd - T * torch.kron(G, A)).norm()
        assert err_ek <= err_kf * (1 + 1e-10)
        assert err_ek < 0.999 * err_kf  # strictly better on this data


# --------------------------------------------------------------------------- batched paths
def _loop_reference(a_h, g, qa, qg):
    """Per-example loop: Σ_n (Q_Gᵀ (Σ_t g_{n,t} ā_{n,t}ᵀ) Q_A)²."""
    out = torch.zeros(qg.shape[0], qa.shape[0], dtype=DT)
    for n in range(g.shape[0]):
        out += (qg.T @ (g[n].T @ a_h[n]) @ qa).square()
    return out


def _orth(k):
    return torch.linalg.qr(torch.randn(k, k, dtype=DT))[0]


@pytest.mark.parametrize("bias", [True, False])
def test_conv_projected_second_moment_batched_paths_equal_loop(bias):
    conv = nn.Conv2d(3, 4, 3, stride=2, padding=1, bias=bias).to(DT)
    h = make_helper("c", conv)
    x = torch.randn(5, 3, 6, 6, dtype=DT)
    a = h.input_rows(x, homogeneous=False)  # (N, T, n-1) without the bias column
    a_h = h.input_rows(x)
    g = torch.randn(5, a.shape[1], 4, dtype=DT)
    qa, qg = _orth(h.in_dim), _orth(4)
    ref = _loop_reference(a_h, g, qa, qg)
    for path in ("rows", "grads", "auto"):
        for chunk in (1 << 22, 2 * 4 * h.in_dim):  # one chunk, and chunks of two examples
            got = projected_second_moment(
                a, g, qa, qg, n=h.in_dim, has_bias=bias, path=path, chunk_elements=chunk
            )
            torch.testing.assert_close(got, ref)


def test_linear_and_embedding_projected_second_moment_equal_loop():
    # Linear with several tokens per example (loss averaged over the batch)
    a = torch.randn(4, 3, 5, dtype=DT)
    g = torch.randn(4, 3, 2, dtype=DT)
    qa, qg = _orth(6), _orth(2)
    a_h = torch.cat([a, torch.ones(4, 3, 1, dtype=DT)], 2)
    ref = _loop_reference(a_h, g, qa, qg)
    torch.testing.assert_close(projected_second_moment(a, g, qa, qg, n=6, has_bias=True), ref)
    ref1 = _loop_reference(a_h[:, :1], g[:, :1], qa, qg)
    torch.testing.assert_close(
        projected_second_moment(a[:, :1], g[:, :1], qa, qg, n=6, has_bias=True), ref1
    )
    # Embedding: repeated tokens within an example add up before squaring
    ids = torch.tensor([[0, 2, 2], [1, 1, 4], [3, 0, 0]])
    onehot = F.one_hot(ids, 5).to(DT)
    g = torch.randn(3, 3, 2, dtype=DT)
    ref = _loop_reference(onehot, g, torch.eye(5, dtype=DT), qg)
    torch.testing.assert_close(projected_second_moment(ids, g, None, qg, n=5, has_bias=False), ref)


def test_embedding_layer_scalings_match_dense_ef():
    emb = nn.Embedding(6, 3).to(DT)
    head = nn.Linear(3, 2).to(DT)
    model = nn.Sequential(emb, nn.Flatten(), nn.Linear(6, 3).to(DT), nn.Tanh(), head)
    ids = torch.randint(0, 6, (7, 2))
    y = torch.randint(0, 2, (7,))
    opt = EKFAC(model, lr=0.0, inv_every=100, layers=["0"], **BASE)
    train_ce(model, opt, ids, y, 2)
    params = {k: v.detach() for k, v in model.named_parameters()}

    def one(p, xi, yi):
        return F.cross_entropy(functional_call(model, p, (xi.unsqueeze(0),)), yi.unsqueeze(0))

    model.eval()
    pe = vmap(grad(one), in_dims=(None, 0, 0))(params, ids, y)["0.weight"].transpose(1, 2)
    block = opt.blocks["0"]
    QG = block.tensors["QG"]
    ref = (QG.T @ pe).square().mean(0)  # Q_A = I
    torch.testing.assert_close(block.tensors["s"], ref)


# --------------------------------------------------------------------------- options
def test_running_average_mode_uses_batch_gradient_times_n():
    model = mlp()
    x, y = data(model, 5)
    opt = EKFAC(model, lr=0.0, inv_every=100, scalings="ra", scale_decay=0.75, **BASE)
    train_ce(model, opt, x, y, 1)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    V = {n: h.grad_matrix().clone() for n, h in opt.layers.items()}
    opt.step()
    for name, block in opt.blocks.items():
        QG, QA = block.tensors["QG"], block.tensors["QA"]
        # ra: s <- β·(K-FAC eigenvalues) + (1-β)·N·(Q_Gᵀ V Q_A)², β = scale_decay = 0.75
        ref = 0.75 * block.kronecker_eigenvalues() + 0.25 * 5 * (QG.T @ V[name] @ QA).square()
        torch.testing.assert_close(block.tensors["s"], ref)
        P = QG @ ((QG.T @ V[name] @ QA) / (ref + 1e-2)) @ QA.T
        torch.testing.assert_close(opt.layers[name].grad_matrix(), P)
        # calling precondition outside step() has no side effect
        block.precondition(V[name])
        assert block.meta["scale_updates"] == 1


def test_scale_every_decouples_scalings_from_factor_statistics():
    model = mlp()
    x, y = data(model, 6)
    opt = EKFAC(model, lr=0.05, inv_every=100, stat_every=4, scale_every=1, kl_clip=None)
    As, updates = [], []
    for _ in range(6):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        As.append(opt.blocks["2"].tensors["A"].clone())  # input of layer 2 moves
        updates.append(opt.blocks["2"].meta["scale_updates"])
    assert torch.equal(As[1], As[2]) and torch.equal(As[2], As[3])
    assert not torch.equal(As[3], As[4])  # step 4 is a statistic step
    assert updates == [0, 1, 2, 3, 4, 5]


@pytest.mark.parametrize(
    "mode,expect", [("exact", 2.1), ("ra", ((7 * 0.6 + 0.4) * 0.6 + 0.8) * 0.6 + 1.2)]
)
def test_scaling_average_after_a_reset(mode, expect):
    block = EKFAC(mlp(), scalings=mode, scale_decay=0.6, **BASE).blocks["0"]
    block.reset_scalings(torch.full((4, 4), 7.0, dtype=DT), 0.1)
    for v in (1.0, 2.0, 3.0):
        block.update_scalings(torch.full((4, 4), v, dtype=DT))
    # exact, β_k = min(1 - 1/k, 0.6): k=1 replaces (1), k=2 mean (1.5), k=3 0.6·1.5 + 0.4·3
    # ra, β = 0.6 from the reset value 7: ((7·.6 + .4)·.6 + .8)·.6 + 1.2
    full = torch.full((4, 4), expect, dtype=DT)
    torch.testing.assert_close(block.tensors["s"], full)
    torch.testing.assert_close(block.tensors["scale"], 1.0 / (full + 0.1))


def test_state_dict_round_trip_continues_identically():
    x, y = data(conv_net(), 6)
    torch.manual_seed(3)
    kw = dict(lr=0.05, momentum=0.9, stat_every=2, inv_every=4, kl_clip=1e-2)
    _, opt, _, _ = checkpoint_round_trip(
        conv_net, lambda net: EKFAC(net, **kw), x, y, before=7, after=5
    )
    for b in opt.blocks.values():
        assert set(b.tensors) >= {"A", "G", "QA", "QG", "s", "scale"}
    assert opt.memory_usage()["s"] > 0




def test_trains_tiny_conv_net_and_mc_fisher_runs():
    x, y = data(conv_net(), 16)
    for kw in (dict(), dict(scalings="ra", scale_decay=0.75), dict(fisher="mc")):
        torch.manual_seed(2)
        net = conv_net()
        opt = EKFAC(net, lr=0.1, stat_every=2, inv_every=4, **kw)
        first = F.cross_entropy(net(x), y).item()
        for _ in range(25):
            opt.zero_grad()
            out = net(x)
            if opt.needs_sampled_backward():
                with opt.sampled_backward():
                    ys = torch.distributions.Categorical(logits=out.detach()).sample()
                    F.cross_entropy(out, ys).backward(retain_graph=True)
            F.cross_entropy(out, y).backward()
            opt.step()
        assert F.cross_entropy(net(x), y).item() < 0.5 * first, kw
        assert set(opt.phase_times()) >= {"statistics", "inverse", "precondition"}




# --------------------------------------------------------------------------- DDP (KAISA)
DDP_STEPS = 6
DDP_KW = dict(lr=0.05, stat_every=2, inv_every=4, stat_decay=0.9, kl_clip=1e-2)


def _ddp_classes():
    from ngbench.optimizers.tekfac import TEKFAC
    from ngbench.optimizers.tkfac import TKFAC

    return {"ekfac": EKFAC, "tkfac": TKFAC, "tekfac": TEKFAC}


def _ddp_data():
    gen = torch.Generator().manual_seed(1)
    xs = torch.randn(DDP_STEPS, 8, 2, 4, 4, generator=gen, dtype=DT)
    return xs, torch.randint(0, 3, (DDP_STEPS, 8), generator=gen)


def _ddp_train(name, frac=None, rank=0, world=1):
    import torch.distributed as dist

    torch.manual_seed(0)
    model = conv_net()
    kw = dict(DDP_KW) if frac is None else dict(DDP_KW, grad_worker_fraction=frac)
    opt = _ddp_classes()[name](model, **kw)
    net = model if world == 1 else nn.parallel.DistributedDataParallel(model)
    xs, ys = _ddp_data()
    per = xs.shape[1] // world
    for k in range(DDP_STEPS):
        sl = slice(rank * per, (rank + 1) * per)
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(net(xs[k, sl]), ys[k, sl]).backward()
        opt.step()
    if world > 1:
        dist.barrier()
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _ddp_worker(rank, world, out):
    res = {
        (name, frac): _ddp_train(name, frac, rank, world)
        for name in ("ekfac", "tkfac", "tekfac")
        for frac in (1.0, 0.5)
    }
    torch.save(res, f"{out}/r{rank}.pt")


@pytest.mark.slow
def test_two_processes_match_one_process_for_the_eigencorrected_family(tmp_path):
    """Scalings are updated on every rank from all-reduced per-example sums; the basis and the
    reset scalings come from the inverse worker (grad_worker_fraction 1 and 1/2)."""
    run_gloo(_ddp_worker, str(tmp_path))
    got = [torch.load(tmp_path / f"r{r}.pt", weights_only=True) for r in (0, 1)]
    torch.manual_seed(0)
    start = torch.cat([p.detach().reshape(-1) for p in conv_net().parameters()])
    for name in ("ekfac", "tkfac", "tekfac"):
        ref = _ddp_train(name)
        assert float((ref - start).norm() / start.norm()) > 1e-3  # the run moved
        for frac in (1.0, 0.5):
            for r in (0, 1):
                rel = float((got[r][(name, frac)] - ref).norm() / ref.norm())
                assert rel < 1e-6, (name, frac, r, rel)


# ----------------------------------------------------------------------------- projection dtype
def test_bfloat16_row_projections_stay_close_to_float64_and_sum_in_float32():
    """``dtype=bfloat16`` multiplies the row projections in bfloat16 and sums their squares in
    the factor dtype: the result is float32 and within bfloat16's rounding of the exact sums;
    the ``grads`` path ignores it (its inputs stay float32, bit for bit)."""
    torch.manual_seed(0)
    N, T, n_in, m = 6, 5, 20, 7  # T < m: the rows path
    a = torch.randn(N, T, n_in).relu()
    g = torch.randn(N, T, m)
    qa, qg = _orth(n_in + 1).float(), _orth(m).float()
    ref = projected_second_moment(
        a.double(), g.double(), qa.double(), qg.double(), n=n_in + 1, has_bias=True
    )
    for path in ("rows", "auto"):
        got = projected_second_moment(
            a, g, qa, qg, n=n_in + 1, has_bias=True, path=path, dtype=torch.bfloat16
        )
        assert got.dtype == torch.float32
        rel = float((got.double() - ref).norm() / ref.norm())
        assert 1e-5 < rel < 2e-2, rel  # rounded (not float32-exact), but close
    f32 = projected_second_moment(a, g, qa, qg, n=n_in + 1, has_bias=True, path="grads")
    bf = projected_second_moment(
        a, g, qa, qg, n=n_in + 1, has_bias=True, path="grads", dtype=torch.bfloat16
    )
    assert torch.equal(f32, bf)
    # rank-one rows (T = 1, Linear layers) use the dtype too
    got1 = projected_second_moment(
        a[:, :1], g[:, :1], qa, qg, n=n_in + 1, has_bias=True, dtype=torch.bfloat16
    )
    ref1 = projected_second_moment(
        a[:, :1].double(), g[:, :1].double(), qa.double(), qg.double(), n=n_in + 1, has_bias=True
    )
    assert got1.dtype == torch.float32
    assert float((got1.double() - ref1).norm() / ref1.norm()) < 2e-2


def test_projection_dtype_auto_follows_factor_dtype_and_hardware(monkeypatch):
    import ngbench.optimizers._eigencorrect as ec

    cpu = torch.device("cpu")
    for choice, want in (("float32", torch.float32), ("float64", torch.float64),
                         ("bfloat16", torch.bfloat16)):
        assert ec.resolve_projection_dtype(choice, torch.float64, cpu) == want
    for native in (True, False):
        monkeypatch.setattr(ec, "native_bf16_matmul", lambda device, native=native: native)
        got = ec.resolve_projection_dtype("auto", torch.float32, cpu)
        assert got == (torch.bfloat16 if native else torch.float32)
        # float64 factors (the dense-reference tests) are never rounded
        assert ec.resolve_projection_dtype("auto", torch.float64, cpu) == torch.float64
    with pytest.raises(ValueError, match="projection_dtype"):
        ec.resolve_projection_dtype("half", torch.float32, cpu)


@pytest.mark.parametrize("name", ["ekfac", "tekfac"])
def test_bfloat16_projections_give_nearly_the_float32_scalings(name):
    """One training run per projection dtype (float32 model): after a basis refresh and a
    scaling update, the damped scales 1/(s + D) agree to bfloat16's rounding."""
    torch.manual_seed(0)
    x = torch.randn(16, 3, 8, 8)
    y = torch.randint(0, 4, (16,))
    scales = {}
    for pd in ("float32", "bfloat16"):
        torch.manual_seed(1)
        model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(),
                              nn.Linear(8 * 64, 4))
        opt = build_optimizer(name, model, lr=1e-3, stat_every=1, inv_every=3,
                              projection_dtype=pd)
        for _ in range(5):  # basis refresh at step 3, then scaling updates
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        scales[pd] = [b.tensors["scale"].clone() for b in opt.blocks.values()]
        assert all(b.meta["scale_updates"] >= 1 for b in opt.blocks.values())
    rels = []
    for s32, s16 in zip(scales["float32"], scales["bfloat16"], strict=True):
        assert s16.dtype == torch.float32
        rels.append(float(((s16 - s32) / s32).abs().max()))
    assert 0 < max(rels) < 5e-2, rels  # the option takes effect, and only at rounding level
    with pytest.raises(Exception, match="projection_dtype"):
        build_optimizer(name, nn.Linear(2, 2), projection_dtype="int8")
