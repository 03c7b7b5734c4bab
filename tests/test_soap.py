"""SOAP (ALGORITHMS.md §7.4, §7.5 #4): with the basis frozen to I it is AdamW step for step."""

from __future__ import annotations

from pathlib import Path

import ngbench.optimizers.soap as soap_mod
import pytest
import torch
from ngbench.optimizers.soap import SOAP, merge_dims_front
from torch import nn

DT = torch.float64
CONFIG = Path(__file__).resolve().parent.parent / "configs" / "optimizer" / "soap.yaml"


def _grads(shape, n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g, dtype=DT) for _ in range(n)]


def _run(opt, p, grads):
    out = []
    for g in grads:
        before = p.detach().clone()
        p.grad = g.clone()
        opt.step()
        out.append(p.detach() - before)
    return out


@pytest.mark.parametrize("shape", [(4, 3), (2, 3, 2), (5,)])
def test_identity_basis_equals_adamw(monkeypatch, shape):
    monkeypatch.setattr(soap_mod, "_eigenbasis", lambda gg: torch.eye(gg.shape[0], dtype=gg.dtype))
    monkeypatch.setattr(soap_mod, "_refresh_basis", lambda gg, q, v, dim: (q, v))
    grads = _grads(shape, 6)
    p = nn.Parameter(torch.randn(*shape, dtype=DT))
    q = nn.Parameter(p.detach().clone())
    opt = SOAP(
        [p],
        lr=0.1,
        beta1=0.9,
        beta2=0.99,
        eps=1e-8,
        weight_decay=0.1,
        precondition_frequency=2,
        precondition_1d=True,
    )
    adamw = torch.optim.AdamW([q], lr=0.1, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    got = _run(opt, p, grads)
    assert torch.equal(got[0], torch.zeros_like(got[0]))  # first call builds the basis only
    for a, b in zip(got[1:], _run(adamw, q, grads[1:]), strict=True):
        torch.testing.assert_close(a, b)


def test_real_basis_rotates_and_refreshes():
    p = nn.Parameter(torch.randn(4, 3, dtype=DT))
    opt = SOAP([p], lr=0.1, precondition_frequency=2)
    grads = _grads((4, 3), 5)
    p.grad = grads[0]
    opt.step()
    st = opt.state[p]
    gg0 = grads[0] @ grads[0].T * (1 - 0.95)
    torch.testing.assert_close(st["GG"][0], gg0)
    lam = torch.linalg.eigvalsh(gg0).flip(0)
    torch.testing.assert_close(torch.diagonal(st["Q"][0].T @ gg0 @ st["Q"][0]), lam)
    q0 = st["Q"][0].clone()
    for g in grads[1:3]:
        p.grad = g
        opt.step()
    assert not torch.allclose(st["Q"][0].abs(), q0.abs())  # refreshed at step 2
    for q in st["Q"]:
        torch.testing.assert_close(q.T @ q, torch.eye(q.shape[0], dtype=DT))


def test_merge_dims_follows_the_reference_by_default():
    """``merge_from="front"`` is the reference SOAP's greedy merge from dim 0; ``"back"`` is
    Distributed Shampoo's merge (this module's rule before the option existed)."""
    assert merge_dims_front((64, 32, 3, 3), 10000) == (6144, 3)  # the example
    assert merge_dims_front((20000, 5), 10000) == (20000, 5)  # too-large dim stays alone
    assert merge_dims_front((3, 20000, 2), 10000) == (3, 20000, 2)
    assert merge_dims_front((1, 5, 1), 10) == (5,)
    assert merge_dims_front((), 10) == (1,) and merge_dims_front((1, 1), 10) == (1,)
    p = nn.Parameter(torch.randn(8, 4, 3, 3, dtype=DT))
    shapes = {}
    for rule in ("front", "back"):
        opt = SOAP([p], merge_dims=True, merge_from=rule, max_precond_dim=100)
        p.grad = _grads((8, 4, 3, 3), 1)[0]
        opt.step()
        shapes[rule] = [tuple(gg.shape) for gg in opt.state[p]["GG"]]
    assert shapes == {"front": [(96, 96), (3, 3)], "back": [(8, 8), (36, 36)]}
    assert SOAP([p]).defaults["merge_from"] == "front"
