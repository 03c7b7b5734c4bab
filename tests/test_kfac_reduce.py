"""K-FAC-reduce (Eschenhagen et al., NeurIPS 2023; ``approx="reduce"`` in optimizers/kfac.py)
against a dense float64 reference of its definition built with torch.func::

    â_n = mean_r [x_{n,r}; 1],  ĝ_n = Σ_r ∂ℓ_n/∂s_{n,r},  F_reduce = (1/N Σ ââᵀ) ⊗ (1/N Σ ĝĝᵀ)

(ĝ_n is the per-example bias gradient, computed with vmap(grad)); and its exactness where the
inputs do not vary over the locations (there expand is not exact)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from ngbench.optimizers import build_optimizer
from ngbench.optimizers.kfac import KFAC
from torch import nn
from torch.func import functional_call, grad, vmap

DT = torch.float64
LAM = 0.1


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


class SeqNet(nn.Module):
    """Linear over a sequence (tokens share the weight), mean over tokens, classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.lin(x)).mean(1))


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, stride=2, padding=1)
        self.head = nn.Linear(3, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.conv(x)).mean((2, 3)))


def _one_step(model, x, y, approx):
    opt = KFAC(model, lr=0.0, momentum=0.0, kl_clip=None, stat_every=1, inv_every=1,
               damping=LAM, approx=approx)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    return opt


def _per_example_bias_grads(model, layer_name, x, y):
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss_one(p, xi, yi):
        out = functional_call(model, p, (xi.unsqueeze(0),))
        return F.cross_entropy(out, yi.unsqueeze(0))

    per = vmap(grad(loss_one), in_dims=(None, 0, 0))(params, x, y)
    return per[f"{layer_name}.bias"], per


def _check_block(opt, name, a_hat, g_hat):
    n = a_hat.shape[0]
    A_ref = a_hat.t() @ a_hat / n
    G_ref = g_hat.t() @ g_hat / n
    block = opt.blocks[name]
    A, G, T = block.factors()
    torch.testing.assert_close(A, A_ref)
    torch.testing.assert_close(G, G_ref)
    assert T == 1.0
    F_ref = torch.kron(G_ref, A_ref)
    eye = torch.eye(F_ref.shape[0], dtype=DT)
    torch.testing.assert_close(block.damped_dense(LAM), F_ref + LAM * eye)
    V = opt.layers[name].grad_matrix()
    ref = torch.linalg.solve(F_ref + LAM * eye, V.reshape(-1)).reshape(V.shape)
    torch.testing.assert_close(block.precondition(V), ref)


def test_reduce_linear_over_sequence_matches_dense_definition():
    model = SeqNet().to(DT)
    x, y = torch.randn(5, 4, 3, dtype=DT), torch.randint(0, 3, (5,))
    opt = _one_step(model, x, y, "reduce")
    g_hat, _ = _per_example_bias_grads(model, "lin", x, y)
    a_hat = torch.cat([x, torch.ones(5, 4, 1, dtype=DT)], 2).mean(1)
    _check_block(opt, "lin", a_hat, g_hat)


def test_reduce_conv_matches_dense_definition():
    model = ConvNet().to(DT)
    x, y = torch.randn(4, 2, 5, 5, dtype=DT), torch.randint(0, 3, (4,))
    opt = _one_step(model, x, y, "reduce")
    g_hat, _ = _per_example_bias_grads(model, "conv", x, y)
    patches = F.unfold(x, 3, padding=1, stride=2)  # (N, C k k, T)
    a_hat = torch.cat([patches, torch.ones(4, 1, patches.shape[2], dtype=DT)], 1).mean(2)
    _check_block(opt, "conv", a_hat, g_hat)


def test_reduce_is_exact_for_constant_inputs_and_expand_is_not():
    """One example whose tokens all carry the same input: the per-example gradient is
    ``ĝ âᵀ``, so reduce's ``A ⊗ G`` equals the exact (rank-one) empirical Fisher block."""
    model = SeqNet().to(DT)
    x = torch.randn(1, 1, 3, dtype=DT).expand(1, 4, 3).contiguous()
    y = torch.tensor([1])
    _, per = _per_example_bias_grads(model, "lin", x, y)
    vec = torch.cat([per["lin.weight"][0], per["lin.bias"][0].unsqueeze(1)], 1).reshape(-1)
    exact = torch.outer(vec, vec)
    for approx, matches in (("reduce", True), ("expand", False)):
        block = _one_step(model, x, y, approx).blocks["lin"]
        A, G, T = block.factors()
        close = torch.allclose(T * torch.kron(G, A), exact, rtol=1e-6, atol=1e-10)
        assert close is matches, approx


def test_reduce_tokens_average_scales_by_one_over_R():
    model = SeqNet().to(DT)
    x, y = torch.randn(5, 4, 3, dtype=DT), torch.randint(0, 3, (5,))
    opt = KFAC(model, lr=0.0, stat_every=1, inv_every=1, approx="reduce",
               loss_average="tokens")
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    assert opt.blocks["lin"].factors()[2] == pytest.approx(1 / 4)
    assert opt.blocks["head"].factors()[2] == pytest.approx(1.0)  # no sharing: expand == reduce


@pytest.mark.parametrize("net", [SeqNet, ConvNet])
def test_ekfac_reduce_factors_equal_kfac_reduce(net):
    """EKFAC builds its factors from input-row chunks (not the raw hook values): the same
    K-FAC-reduce ``A``, ``G``, ``T`` must come out, and its eigenvalues reset to them."""
    model = net().to(DT)
    x = torch.randn(4, 4, 3, dtype=DT) if net is SeqNet else torch.randn(4, 2, 5, 5, dtype=DT)
    y = torch.randint(0, 3, (4,))
    ref = _one_step(model, x, y, "reduce")
    opt = build_optimizer("ekfac", model, lr=0.0, momentum=0.0, kl_clip=None, stat_every=1,
                          inv_every=1, damping=LAM, approx="reduce")
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    for name, block in opt.blocks.items():
        structure = block.structure
        for got, want in zip(structure.factors(), ref.blocks[name].factors(), strict=True):
            torch.testing.assert_close(got, want)
        torch.testing.assert_close(block.kronecker_eigenvalues(), block.tensors["s"])


def test_reduce_trains_and_rejects_a_bad_value():
    model = ConvNet()
    x, y = torch.randn(8, 2, 6, 6), torch.randint(0, 3, (8,))
    opt = build_optimizer("kfac", model, lr=0.05, stat_every=1, inv_every=2, approx="reduce")
    first = None
    for _ in range(15):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        first = loss.item() if first is None else first
    assert float(loss) < first
    with pytest.raises(ValueError, match="optimizer.approx must be one of expand, reduce"):
        build_optimizer("kfac", ConvNet(), approx="sum")


@pytest.mark.parametrize(
    "kw",
    [dict(padding=1, stride=2), dict(padding=0), dict(padding=2, dilation=2, stride=3),
     dict(padding="same", dilation=2), dict(padding=1, padding_mode="reflect"),
     dict(padding=3, stride=4, kernel_size=2)],
)
def test_conv_reduced_rows_equal_mean_patch(kw):
    """The separable patch sums (zero padding clipped, not copied) equal unfold's mean patch."""
    from ngbench.optimizers._layers import Conv2dHelper

    conv = nn.Conv2d(3, 4, **{"kernel_size": 3, **kw}).to(DT)
    x = torch.randn(2, 3, 7, 6, dtype=DT)
    out = conv(x)
    padded = conv._reversed_padding_repeated_twice if kw.get("padding") == "same" else None
    if kw.get("padding_mode", "zeros") != "zeros" or padded is not None:
        mode = "constant" if kw.get("padding_mode", "zeros") == "zeros" else kw["padding_mode"]
        xp = F.pad(x, conv._reversed_padding_repeated_twice, mode=mode)
        ref = F.unfold(xp, conv.kernel_size, dilation=conv.dilation, stride=conv.stride)
    else:
        ref = F.unfold(x, conv.kernel_size, dilation=conv.dilation, padding=conv.padding,
                       stride=conv.stride)
    a_hat, g_hat, locations = Conv2dHelper("c", conv).reduced_rows(x, torch.ones_like(out))
    assert locations == out.shape[2] * out.shape[3] == ref.shape[2]
    torch.testing.assert_close(a_hat, ref.mean(2))
    torch.testing.assert_close(g_hat, torch.full((2, 4), 2.0 * locations, dtype=DT))
