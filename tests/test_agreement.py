"""Agreement with independent implementations that install from the package index.

The peers are in the ``peers`` extra (``pip install -e ".[peers]"``; ``make test`` installs it):
ASDL (``asdfghjkl``, import name ``asdl``) for K-FAC and ``pytorch-optimizer`` for Shampoo.  Each
test configures the same mathematics on both sides in float64, runs a few steps on the same data
and requires the parameters to agree to ~1e-10 relative (measured: see the README's "verified
against" table).  Every normalisation conversion is derived in a comment from the peer's source
(read in its installed package), never fitted; each test also asserts that the compared update
is far from the raw gradient step, so agreement is not two identities agreeing.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from ngbench.optimizers.kfac import KFAC
from ngbench.optimizers.shampoo import Shampoo
from torch import nn

DT = torch.float64
TOL = 1e-10  # relative, per parameter and step; measured differences are ~1e-14
SEED = 1234  # the MC labels: both sides reseed the global generator with it before sampling

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # ASDL imports torch.jit.script


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# ------------------------------------------------------------------------------- K-FAC vs ASDL
#
# ASDL's KfacGradientMaker (asdl/precondition/natural_gradient.py, fisher.py,
# operations/{linear,conv,operation}.py), with ``PreconditioningConfig(data_size=N,
# damping=λ)`` and no ``ema_decay``, rebuilds its factors from every batch and inverts them at
# once.  Its covariance scale is ``scale / data_size = 1/N`` and its per-example output
# gradients ``g`` are those of the summed loss, i.e. our per-example ``g``.  With T output
# locations per example (1 for Linear):
#
#   A_asdl = (1/N) Σ_n (1/T) Σ_t a aᵀ  = A        (conv.py cov_kron_A divides by out_size = T)
#   B_asdl = (1/N) Σ_n Σ_t g gᵀ         = T·G      (conv.py cov_kron_B: no 1/T)
#
# where our A, G are 1/(N·T) Σ over all rows (optimizers/_kronecker.py).  ASDL damps each factor
# with π-correction (operation.py cov_kron_damping):
#
#   π_asdl = sqrt((tr A_asdl / n) / (tr B_asdl / m)) = π / sqrt(T)
#   A_asdl + sqrt(λ)·π_asdl I = A + π·sqrt(λ/T) I                 = A + πγ I,   γ = sqrt(λ/T)
#   B_asdl + sqrt(λ)/π_asdl I = T·G + sqrt(λT)/π I                 = T (G + γ/π I)
#
# so ASDL's direction (B_asdl + ·)⁻¹ V (A_asdl + ·)⁻¹ = (1/T)(G + γ/π I)⁻¹ V (A + πγ I)⁻¹, our
# ``damping_form="factored_tikhonov"`` with ``pi_correction=True`` and the SAME λ: no conversion.
# V is the gradient of the mean loss on both sides (ASDL divides its summed-loss gradients by
# data_size).  ASDL preconditions a bias separately (``Kron.mvp``: ``B⁻¹ ∇b``, the bias outside
# A), while we fold it into A as the homogeneous column ``[W | b]`` (Martens & Grosse): two
# different approximations, so the layers here have no bias.  Our factors are the batch's alone
# with ``stat_decay=0``; no KL clip, no momentum; both take ``p -= lr·P``.


def _kfac_net(conv: bool) -> nn.Module:
    torch.manual_seed(0)
    if conv:  # 6×6 input; padding 1 / stride 1, then a non-square kernel with stride (2, 1)
        return nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1, bias=False),
            nn.Tanh(),
            nn.Conv2d(4, 5, (3, 2), padding=(1, 0), stride=(2, 1), bias=False),  # -> 5×3×5
            nn.Tanh(),
            nn.Flatten(),
            nn.Linear(75, 4, bias=False),
        ).to(DT)
    return nn.Sequential(
        nn.Linear(6, 5, bias=False), nn.Tanh(), nn.Linear(5, 4, bias=False)
    ).to(DT)


@pytest.mark.parametrize("fisher", ["ef", "mc"])
@pytest.mark.parametrize("conv", [False, True], ids=["linear", "conv"])
def test_kfac_equals_asdl_kfac(conv, fisher):
    asdl = pytest.importorskip("asdl", reason="peer asdfghjkl missing: pip install -e '.[peers]'")
    n, lam, lr, steps = 8, 1e-2, 0.5, 3
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, *((3, 6, 6) if conv else (6,)), generator=g, dtype=DT)
    y = torch.randint(0, 4, (n,), generator=g)
    ours_net = _kfac_net(conv)
    peer_net = copy.deepcopy(ours_net)
    ours = KFAC(
        ours_net, lr=lr, momentum=0.0, damping=lam, damping_form="factored_tikhonov",
        pi_correction=True, stat_every=1, inv_every=1, stat_decay=0.0, kl_clip=None,
        fisher=fisher,
    )
    peer = asdl.KfacGradientMaker(
        peer_net, asdl.PreconditioningConfig(data_size=n, damping=lam),
        fisher_type="fisher_emp" if fisher == "ef" else "fisher_mc", seed=SEED,
    )
    peer_sgd = torch.optim.SGD(peer_net.parameters(), lr=lr)
    worst = 0.0
    for _ in range(steps):
        before = [p.detach().clone() for p in ours_net.parameters()]
        ours.zero_grad()
        out = ours_net(x)
        if fisher == "mc":  # the peer's sampling (fisher.py FisherMCCrossEntropy), same seed
            torch.manual_seed(SEED)
            ys = torch.distributions.Categorical(F.softmax(out, dim=-1)).sample()
            assert (ys != y).any()  # the MC factor G differs from the empirical one
            with ours.sampled_backward():
                F.cross_entropy(out, ys).backward(retain_graph=True)
        F.cross_entropy(out, y).backward()
        raw = [p.grad.detach().clone() for p in ours_net.parameters()]
        ours.step()
        peer_sgd.zero_grad()
        peer.setup_loss_call(F.cross_entropy, peer.setup_model_call(peer_net, x), y)
        peer.forward_and_backward()
        peer_sgd.step()
        for p, q, p0, gr in zip(ours_net.parameters(), peer_net.parameters(), before, raw,
                                strict=True):
            step_ours, step_peer = p.detach() - p0, q.detach() - p0
            assert _rel(step_ours, -lr * gr) > 0.1  # preconditioned, not the raw gradient
            worst = max(worst, _rel(step_ours, step_peer))
    assert worst < TOL, f"K-FAC vs ASDL: max relative difference {worst:.2e}"


# ------------------------------------------------------------ Shampoo vs pytorch-optimizer
#
# pytorch-optimizer's ``Shampoo`` (pytorch_optimizer/optimizer/shampoo.py) is the original
# algorithm: per mode i a factor H_i = εI + Σ_t G_(i) G_(i)ᵀ (``pre_cond`` starts at
# ``matrix_eps·I`` and accumulates sums), the root H_i^(-1/(2k)) for an order-k tensor
# (``compute_power_svd(pre_cond, 2·order)``; for a symmetric PSD matrix the SVD is the
# eigendecomposition), applied along every mode to the raw gradient, no grafting; with
# ``momentum=0`` and ``preconditioning_compute_steps=1`` it steps ``p -= lr·P`` with roots of
# the current sums.  Ours with ``beta1=0`` (raw gradient), ``beta2=1`` (w = 1: sums from zero),
# ``graft="none"``, roots every step from step 1 computes (Σ_t G Gᵀ + ε I)^(-1/(2k)) (the
# spectrum of a PSD sum is not shifted, see ``matrix_inverse_root``): the same matrix as the
# peer's H_i, so ``epsilon = matrix_eps`` with no conversion.  ``max_preconditioner_dim=6``
# (>= every dim, < every product of two) keeps every mode its own factor, unmerged and
# unblocked; ``precondition_1d=True`` gives the 1-D parameter its 6×6 factor as the peer does.


def test_shampoo_equals_pytorch_optimizer_shampoo():
    po = pytest.importorskip(
        "pytorch_optimizer", reason="peer pytorch-optimizer missing: pip install -e '.[peers]'"
    )
    eps, lr, steps = 1e-2, 0.05, 4
    g = torch.Generator().manual_seed(3)
    shapes = [(6, 5), (6,), (4, 3, 5)]
    init = [torch.randn(*s, generator=g, dtype=DT) for s in shapes]
    data = [(torch.randn(7, 5, generator=g, dtype=DT), torch.randn(7, 6, generator=g, dtype=DT),
             torch.randn(3, 5, generator=g, dtype=DT)) for _ in range(steps)]
    ours_p = [nn.Parameter(t.clone()) for t in init]
    peer_p = [nn.Parameter(t.clone()) for t in init]

    def loss(ps, batch):  # a smooth loss whose gradients depend on the parameters
        w, b, t = ps
        xb, yb, ub = batch
        return (torch.tanh(xb @ w.T + b) - yb).pow(2).mean() + torch.sin(
            torch.einsum("ijk,jk->i", t, ub)).pow(2).sum()

    ours = Shampoo(
        ours_p, lr=lr, beta1=0.0, beta2=1.0, epsilon=eps, graft="none",
        precondition_frequency=1, start_preconditioning_step=1, max_preconditioner_dim=6,
        precondition_1d=True, momentum=0.0, weight_decay=0.0,
    )
    peer = po.Shampoo(peer_p, lr=lr, momentum=0.0, weight_decay=0.0,
                      preconditioning_compute_steps=1, matrix_eps=eps)
    worst, small = 0.0, False
    for batch in data:
        before = [p.detach().clone() for p in ours_p]
        for opt, ps in ((ours, ours_p), (peer, peer_p)):
            opt.zero_grad()
            loss(ps, batch).backward()
        raw = [p.grad.detach().clone() for p in ours_p]
        ours.step()
        peer.step()
        # the test reaches factors with 0 < lam_min < eps, where the old eps rule differed
        lam_min = [float(torch.linalg.eigvalsh(f).min()) for f in _factors(ours, ours_p)]
        small = small or any(0 < lm < eps for lm in lam_min)
        for p, q, p0, gr in zip(ours_p, peer_p, before, raw, strict=True):
            step_ours, step_peer = p.detach() - p0, q.detach() - p0
            assert _rel(step_ours, -lr * gr) > 0.1  # preconditioned, not the raw gradient
            worst = max(worst, _rel(step_ours, step_peer))
    assert small
    assert worst < TOL, f"Shampoo vs pytorch-optimizer: max relative difference {worst:.2e}"


def _factors(opt: Shampoo, params: list[nn.Parameter]) -> list[torch.Tensor]:
    return [f[0] for p in params for f in opt.state[p].get("factors", [])]
