"""Shampoo: closed-form identities (ALGORITHMS.md §7.5, §10 #9, #10, #18, #19) and contracts."""

from __future__ import annotations

import copy
import math
import warnings
from pathlib import Path

import pytest
import torch
from ngbench.optimizers import OptimizerConfigError, build_optimizer, get_spec
from ngbench.optimizers.shampoo import Shampoo, _precondition, matrix_inverse_root, merge_dims
from omegaconf import OmegaConf
from torch import nn

DT = torch.float64
CONFIG = Path(__file__).resolve().parent.parent / "configs" / "optimizer" / "shampoo.yaml"


def _param(*shape: int, seed: int = 0) -> nn.Parameter:
    g = torch.Generator().manual_seed(seed)
    return nn.Parameter(torch.randn(*shape, generator=g, dtype=DT))


def _grads(shape: tuple[int, ...], n: int, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g, dtype=DT) for _ in range(n)]


def _run(opt: torch.optim.Optimizer, params: list[nn.Parameter], grads: list[list[torch.Tensor]]):
    """Feed ``grads[t][i]`` to ``params[i]``; return the list of updates per step."""
    deltas = []
    for gs in grads:
        before = [p.detach().clone() for p in params]
        for p, g in zip(params, gs, strict=True):
            p.grad = g.clone()
        opt.step()
        deltas.append([p.detach() - b for p, b in zip(params, before, strict=True)])
    return deltas


def _root(a: torch.Tensor, exponent: float, eps: float) -> torch.Tensor:
    """``(a + eps I)^exponent``; a negative spectrum is first shifted to 0 (Distributed Shampoo)."""
    lam, q = torch.linalg.eigh(a)
    lam = lam - min(float(lam.min()), 0.0)
    return q @ torch.diag((lam + eps) ** exponent) @ q.T


def _dense_shampoo(grads, *, lr, beta1, beta2, eps, freq, start, gb2, geps):
    """Reference Shampoo on one matrix: EMA factors + bias correction, Adam graft."""
    m, n = grads[0].shape
    fl, fr = torch.zeros(m, m, dtype=DT), torch.zeros(n, n, dtype=DT)
    rl, rr = torch.eye(m, dtype=DT), torch.eye(n, dtype=DT)
    mom, v, have_root, out = torch.zeros(m, n, dtype=DT), torch.zeros(m, n, dtype=DT), False, []
    for t, g in enumerate(grads, 1):
        fl = beta2 * fl + (1 - beta2) * g @ g.T
        fr = beta2 * fr + (1 - beta2) * g.T @ g
        if t >= start and (t % freq == 0 or not have_root):
            bc = 1 - beta2**t
            rl, rr, have_root = _root(fl / bc, -0.25, eps), _root(fr / bc, -0.25, eps), True
        mom = beta1 * mom + (1 - beta1) * g
        mh = mom / (1 - beta1**t)
        v = gb2 * v + (1 - gb2) * g * g
        gd = mh / ((v / (1 - gb2**t)).sqrt() + geps)
        if t >= start:
            p = rl @ mh @ rr
            p = p * gd.norm() / (p.norm() + 1e-16)
        else:
            p = gd
        out.append(-lr * p)
    return out


HP = dict(lr=0.1, beta1=0.9, beta2=0.95, epsilon=1e-6, graft_beta2=0.99, graft_epsilon=1e-8)


# ---------------------------------------------------------------- shapes


def test_merge_dims_and_conv_merge():
    assert merge_dims((32, 3, 64, 64), 8192) == (96, 4096)
    assert merge_dims((1, 5, 1), 10) == (5,)
    assert merge_dims((), 10) == (1,)
    conv = nn.Conv2d(3, 4, 3).to(DT)
    opt = Shampoo([conv.weight], max_preconditioner_dim=27)
    assert opt.block_shapes(conv.weight) == [(4, 27)]
    conv.weight.grad = torch.randn_like(conv.weight)
    opt.step()
    assert [tuple(f.shape) for f in opt.state[conv.weight]["factors"]] == [(1, 4, 4), (1, 27, 27)]
    opt_small = Shampoo([conv.weight], max_preconditioner_dim=200)  # all 108 entries in one dim
    assert opt_small.block_shapes(conv.weight) == [(108,)]


# ---------------------------------------------------------------- closed forms


def test_identity_statistics_give_scaled_sgd():
    c1, c2, eps = 3.0, 0.5, 1e-3
    g = _grads((4, 6), 1)[0]
    roots = [
        matrix_inverse_root(c1 * torch.eye(4, dtype=DT)[None], -0.25, eps)[0],
        matrix_inverse_root(c2 * torch.eye(6, dtype=DT)[None], -0.25, eps)[0],
    ]
    out = _precondition(g[None], roots)[0]
    torch.testing.assert_close(out, ((c1 + eps) * (c2 + eps)) ** -0.25 * g)
    # end to end: an orthogonal gradient makes both factors c*I exactly
    q, _ = torch.linalg.qr(_grads((4, 4), 1, seed=3)[0])
    c = 2.0
    p = _param(4, 4)
    opt = Shampoo(
        [p],
        lr=1.0,
        beta1=0.0,
        beta2=1.0,
        epsilon=eps,
        graft="none",
        precondition_frequency=1,
        max_preconditioner_dim=4,
    )
    (delta,) = _run(opt, [p], [[math.sqrt(c) * q]])[0]
    torch.testing.assert_close(delta, -((c + eps) ** -0.5) * math.sqrt(c) * q)


def test_epsilon_rule_shifts_only_a_negative_spectrum():
    """The root is that of ``A + eps I`` whenever ``lam_min >= 0``, also for ``lam_min`` in
    ``(0, eps)`` (the old rule shifted those by ``-lam_min``: 0.10 off on this 5x5 matrix)."""
    eps = 1e-4
    q, _ = torch.linalg.qr(_grads((5, 5), 1, seed=7)[0])
    lam = torch.tensor([eps / 2, 0.3 * eps, 2e-3, 0.1, 1.0], dtype=DT)  # lam_min = eps/2 > 0
    a = q @ torch.diag(lam) @ q.T
    got = matrix_inverse_root(a[None], -0.25, eps)[0][0]
    want = q @ torch.diag((lam + eps) ** -0.25) @ q.T  # (A + eps I)^(-1/4), no shift
    torch.testing.assert_close(got, want, rtol=1e-10, atol=0)
    shifted = q @ torch.diag((lam - lam.min() + eps) ** -0.25) @ q.T  # the former rule
    assert float((shifted - want).norm() / want.norm()) > 0.05
    # a spectrum pushed below 0 by rounding is still moved up to 0 before adding eps
    neg = q @ torch.diag(lam - 3 * eps) @ q.T  # lam_min = -2.5 eps
    got_neg = matrix_inverse_root(neg[None], -0.25, eps)[0][0]
    want_neg = q @ torch.diag((lam - lam.min() + eps) ** -0.25) @ q.T
    torch.testing.assert_close(got_neg, want_neg, rtol=1e-10, atol=0)


@pytest.mark.parametrize("beta2", [1.0, 0.9])
def test_one_step_is_damped_polar_factor(beta2):
    eps = 1e-2
    g = _grads((4, 6), 1)[0]
    p = _param(4, 6)
    opt = Shampoo(
        [p],
        lr=1.0,
        beta1=0.0,
        beta2=beta2,
        epsilon=eps,
        graft="none",
        precondition_frequency=1,
        max_preconditioner_dim=6,
    )
    (delta,) = _run(opt, [p], [[g]])[0]
    u, s, vh = torch.linalg.svd(g, full_matrices=False)
    torch.testing.assert_close(delta, -(u * (s / (s**2 + eps).sqrt())) @ vh)


def test_vector_full_matrix_root_and_graft_only_option():
    eps = 1e-2
    g = _grads((5,), 1)[0]
    p = _param(5)
    opt = Shampoo(
        [p], lr=1.0, beta1=0.0, beta2=1.0, epsilon=eps, graft="none", precondition_frequency=1
    )
    (delta,) = _run(opt, [p], [[g]])[0]
    torch.testing.assert_close(delta, -g / (g.dot(g) + eps).sqrt())  # (gg^T + eps)^(-1/2) g
    p2, p3 = _param(5), _param(5)
    opt2 = Shampoo([p2], lr=0.1, precondition_1d=False, precondition_frequency=1)
    adam = torch.optim.Adam([p3], lr=0.1, betas=(0.9, 0.999), eps=1e-8)
    grads = [[x] for x in _grads((5,), 3)]
    d2, d3 = _run(opt2, [p2], grads), _run(adam, [p3], grads)
    assert opt2.state[p2]["factors"] == []
    for a, b in zip(d2, d3, strict=True):
        torch.testing.assert_close(a[0], b[0])


def test_order_three_block_uses_minus_one_sixth():
    eps = 1e-3
    g = _grads((3, 4, 5), 1)[0]
    p = _param(3, 4, 5)
    opt = Shampoo(
        [p],
        lr=1.0,
        beta1=0.0,
        beta2=1.0,
        epsilon=eps,
        graft="none",
        precondition_frequency=1,
        max_preconditioner_dim=5,
    )
    assert opt.block_shapes(p) == [(3, 4, 5)]
    (delta,) = _run(opt, [p], [[g]])[0]
    r = [
        _root(torch.tensordot(g, g, dims=([j for j in range(3) if j != i],) * 2), -1 / 6, eps)
        for i in range(3)
    ]
    ref = torch.einsum("ia,jb,kc,abc->ijk", r[0], r[1], r[2], g)
    torch.testing.assert_close(delta, -ref)
    q = _param(3, 4, 5)  # SGD grafting: same direction, rescaled to the gradient's norm
    opt = Shampoo(
        [q],
        lr=1.0,
        beta1=0.0,
        beta2=1.0,
        epsilon=eps,
        graft="sgd",
        precondition_frequency=1,
        max_preconditioner_dim=5,
    )
    (delta,) = _run(opt, [q], [[g]])[0]
    torch.testing.assert_close(delta, -ref * g.norm() / ref.norm())


@pytest.mark.parametrize("max_dim", [7, 20])
def test_unblocked_matches_dense_reference(max_dim):
    grads = _grads((5, 7), 7)
    p = _param(5, 7)
    opt = Shampoo(
        [p],
        max_preconditioner_dim=max_dim,
        precondition_frequency=3,
        start_preconditioning_step=2,
        **HP,
    )
    assert opt.block_shapes(p) == [(5, 7)]
    got = _run(opt, [p], [[g] for g in grads])
    ref = _dense_shampoo(
        grads,
        lr=HP["lr"],
        beta1=HP["beta1"],
        beta2=HP["beta2"],
        eps=HP["epsilon"],
        freq=3,
        start=2,
        gb2=HP["graft_beta2"],
        geps=HP["graft_epsilon"],
    )
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a[0], b)


BLOCKS = [
    (slice(0, 3), slice(0, 3)),
    (slice(0, 3), slice(3, 5)),
    (slice(3, 6), slice(0, 3)),
    (slice(3, 6), slice(3, 5)),
]


def test_blocks_equal_independent_shampoo_per_block():
    grads = _grads((6, 5), 6)
    p = _param(6, 5)
    opt = Shampoo([p], max_preconditioner_dim=3, precondition_frequency=2, **HP)
    assert sorted(opt.block_shapes(p)) == [(3, 2), (3, 2), (3, 3), (3, 3)]
    got = _run(opt, [p], [[g] for g in grads])
    subs = [nn.Parameter(p.detach()[sl].clone()) for sl in BLOCKS]
    ref_opt = Shampoo(subs, max_preconditioner_dim=3, precondition_frequency=2, **HP)
    ref = _run(ref_opt, subs, [[g[sl] for sl in BLOCKS] for g in grads])
    for a, b in zip(got, ref, strict=True):
        for sl, rb in zip(BLOCKS, b, strict=True):
            torch.testing.assert_close(a[0][sl], rb)


def test_grafting_keeps_adam_norm_per_block_and_is_adam_before_start():
    grads = _grads((6, 5), 5)
    p, q = _param(6, 5), _param(6, 5)
    opt = Shampoo(
        [p],
        lr=0.1,
        beta1=0.9,
        beta2=0.999,
        epsilon=1e-8,
        graft="adam",
        graft_beta2=0.999,
        graft_epsilon=1e-8,
        max_preconditioner_dim=3,
        precondition_frequency=1,
        start_preconditioning_step=3,
    )
    adam = torch.optim.Adam([q], lr=0.1, betas=(0.9, 0.999), eps=1e-8)
    got, ref = _run(opt, [p], [[g] for g in grads]), _run(adam, [q], [[g] for g in grads])
    for t, (a, b) in enumerate(zip(got, ref, strict=True), 1):
        if t < 3:
            torch.testing.assert_close(a[0], b[0])
            continue
        assert not torch.allclose(a[0], b[0])
        for sl in BLOCKS:
            torch.testing.assert_close(a[0][sl].norm(), b[0][sl].norm())


def test_roots_frozen_between_refreshes():
    p = _param(4, 3)
    opt = Shampoo(
        [p], precondition_frequency=3, start_preconditioning_step=1, max_preconditioner_dim=4
    )
    roots = []
    for g in _grads((4, 3), 6):
        p.grad = g
        opt.step()
        roots.append([r.clone() for r in opt.state[p]["roots"]])
    for t in (1, 2, 4):  # refreshed at steps 1, 3 and 6
        assert all(torch.equal(a, b) for a, b in zip(roots[t - 1], roots[t], strict=True)) == (
            t != 2
        )
    assert not torch.equal(roots[4][0], roots[5][0])


# ---------------------------------------------------------------- baseline equivalences


def test_before_preconditioning_matches_torch_baselines():
    grads = [[g] for g in _grads((4, 3), 4)]
    p1, q1 = _param(4, 3), _param(4, 3)
    sh = Shampoo(
        [p1],
        lr=0.1,
        beta1=0.0,
        graft="sgd",
        momentum=0.9,
        nesterov=True,
        weight_decay=0.1,
        weight_decay_type="l2",
        start_preconditioning_step=100,
    )
    sgd = torch.optim.SGD([q1], lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.1)
    for a, b in zip(_run(sh, [p1], grads), _run(sgd, [q1], grads), strict=True):
        torch.testing.assert_close(a[0], b[0])
    p2, q2 = _param(4, 3), _param(4, 3)
    sh = Shampoo(
        [p2], lr=0.1, beta1=0.9, graft="adam", weight_decay=0.1, start_preconditioning_step=100
    )
    adamw = torch.optim.AdamW([q2], lr=0.1, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)
    for a, b in zip(_run(sh, [p2], grads), _run(adamw, [q2], grads), strict=True):
        torch.testing.assert_close(a[0], b[0])


# ---------------------------------------------------------------- contracts


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(DT)


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(8, 4, generator=g, dtype=DT)
        opt.zero_grad(set_to_none=True)
        model(x).square().mean().backward()
        opt.step()


def test_state_dict_round_trip_continues_identically():
    hp = dict(precondition_frequency=2, momentum=0.5, weight_decay=0.01, lr=0.05)
    model = _mlp()
    opt = build_optimizer("shampoo", model, **hp)
    _train(model, opt, 3, seed=0)
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    model2 = _mlp()
    model2.load_state_dict(saved_model)
    opt2 = build_optimizer("shampoo", model2, **hp)
    opt2.load_state_dict(saved_opt)
    w = model[0].weight
    w2 = model2[0].weight
    assert opt2.state[w2]["step"] == 3
    for a, b in zip(
        opt.state[w]["factors"] + opt.state[w]["roots"],
        opt2.state[w2]["factors"] + opt2.state[w2]["roots"],
        strict=True,
    ):
        assert torch.equal(a, b)
    _train(model, opt, 3, seed=1)
    _train(model2, opt2, 3, seed=1)
    for a, b in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(a, b)


def test_lr_scheduler_scales_the_step():
    p, q = _param(4, 3), _param(4, 3)
    o1 = Shampoo([p], lr=0.1, precondition_frequency=1)
    o2 = Shampoo([q], lr=0.1, precondition_frequency=1)
    sched = torch.optim.lr_scheduler.StepLR(o2, step_size=1, gamma=0.5)
    g1, g2 = _grads((4, 3), 2)
    a1, b1 = _run(o1, [p], [[g1]])[0][0], _run(o2, [q], [[g1]])[0][0]
    sched.step()
    assert o2.param_groups[0]["lr"] == pytest.approx(0.05)
    a2, b2 = _run(o1, [p], [[g2]])[0][0], _run(o2, [q], [[g2]])[0][0]
    torch.testing.assert_close(b1, a1)
    torch.testing.assert_close(b2, 0.5 * a2)


def test_nesterov_needs_momentum():
    """(Types and ranges of every option: tests/test_conformance.py.)"""
    with pytest.raises(ValueError, match="optimizer.nesterov must be"):
        Shampoo([_param(2, 2)], nesterov=True)
    with pytest.raises(OptimizerConfigError, match="optimizer.nesterov must be"):
        build_optimizer("shampoo", _mlp(), nesterov=True)


def test_failing_eigh_keeps_old_root_and_warns_once(monkeypatch):
    p = _param(4, 3)
    opt = Shampoo(
        [p], precondition_frequency=1, start_preconditioning_step=1, max_preconditioner_dim=4
    )
    grads = _grads((4, 3), 4)
    p.grad = grads[0]
    opt.step()
    old = [r.clone() for r in opt.state[p]["roots"]]
    real_eigh = torch.linalg.eigh

    def float64_only(a, *args, **kwargs):  # the first try fails, the float64 retry succeeds
        if a.dtype != torch.float64 or a.ndim == 3:
            raise torch.linalg.LinAlgError("injected")
        return real_eigh(a, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "eigh", float64_only)
    p.grad = grads[1]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()
    assert opt.num_root_failures == 0
    assert not torch.equal(opt.state[p]["roots"][0], old[0])
    old = [r.clone() for r in opt.state[p]["roots"]]

    def broken(*args, **kwargs):
        raise torch.linalg.LinAlgError("injected")

    monkeypatch.setattr(torch.linalg, "eigh", broken)
    p.grad = grads[2]
    with pytest.warns(RuntimeWarning, match="keeping the previous roots"):
        opt.step()
    assert opt.num_root_failures == 2
    assert all(torch.equal(a, b) for a, b in zip(opt.state[p]["roots"], old, strict=True))
    p.grad = grads[3]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()
    assert opt.num_root_failures == 4
    assert torch.isfinite(p).all()


def test_registry_config_memory_and_phase_times():
    spec = get_spec("shampoo")
    assert spec.curvature and not spec.needs_model and not spec.sampled_fisher
    cfg = OmegaConf.to_container(OmegaConf.load(CONFIG))
    cfg.pop("defaults")  # the preset's schema (Hydra's defaults list)
    model = _mlp()
    opt = build_optimizer(
        cfg, model, weight_decay=0.1, precondition_frequency=2, max_preconditioner_dim=6
    )
    decay = {g["group"]: g["weight_decay"] for g in opt.param_groups}
    assert decay == {"decay": 0.1, "no_decay": 0.0}
    _train(model, opt, 2, seed=0)
    mem = opt.memory_usage()
    # Linear(4,6): 6x6 + 4x4; bias 6: 6x6; Linear(6,3): 3x3 + 6x6; bias 3: 3x3 (float64)
    assert mem["factors"] == mem["roots"] == 8 * (36 + 16 + 36 + 9 + 36 + 9)
    n = sum(p.numel() for p in model.parameters())
    assert mem["graft"] == 8 * n and mem["moments"] == 8 * n
    times = opt.phase_times()
    assert {"statistics", "inverse", "precondition"} <= set(times)
    assert all(v > 0 for v in times.values())
