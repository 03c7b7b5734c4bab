"""Per-layer helpers for Kronecker-factored curvature (K-FAC family).

Each helper knows one module type and turns what the hooks capture into the quantities of
ALGORITHMS.md §0.1 (Martens & Grosse 2015, "Optimizing Neural Networks with Kronecker-factored
Approximate Curvature"; Grosse & Martens 2016, "A Kronecker-factored approximate Fisher matrix
for convolution layers"):

* ``input_rows(a)`` -> ``(N, T, n)`` homogeneous inputs ``ā`` (bias column last); for an
  ``nn.Embedding`` the integer token ids ``(N, T)`` instead (its ``A`` is diagonal),
* ``output_rows(g)`` -> ``(N, T, m)`` per-example output gradients (hook value × N, or × N·R
  with ``loss_average="tokens"``),
* ``grad_matrix()`` -> the ``m × n`` gradient ``[∇W | ∇b]`` (row-major, bias column last) and
  ``set_grad(P)`` to write a preconditioned matrix back into ``weight.grad`` / ``bias.grad``.

``T`` is the number of locations per example that share the weight (conv output pixels, or the
tokens of a sequence with ``loss_average="batch"``); with ``loss_average="tokens"`` every token is
its own example and ``T == 1``.
"""

from __future__ import annotations

from collections.abc import Iterator
from enum import StrEnum, auto
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._linalg import add_gram_, complete_gram_, gram

__all__ = [
    "LOSS_AVERAGES",
    "LossAverage",
    "LayerHelper",
    "LinearHelper",
    "Conv2dHelper",
    "EmbeddingHelper",
    "UnsupportedLayerError",
    "make_helper",
    "unsupported_reason",
]

class LossAverage(StrEnum):
    """What the loss averages over: ``batch`` (hook grad × N) or ``tokens`` (× N·R)."""

    batch = auto()
    tokens = auto()


LOSS_AVERAGES = tuple(LossAverage)


class UnsupportedLayerError(ValueError):
    """The module type (or configuration, e.g. grouped conv) has no curvature helper."""


class LayerHelper:
    """Base class: one registered module with weight ``W`` (m × n in the homogeneous layout)."""

    kind = "layer"
    #: ``True`` when ``A`` is diagonal (embedding): ``input_rows`` returns indices
    diagonal_input = False

    def __init__(self, name: str, module: nn.Module, *, loss_average: str = "batch") -> None:
        if loss_average not in LOSS_AVERAGES:
            raise ValueError(
                f"optimizer.loss_average must be one of {', '.join(LOSS_AVERAGES)}, "
                f"got {loss_average!r}"
            )
        self.name = name
        self.module = module
        self.loss_average = loss_average
        self.weight = cast(nn.Parameter, module.weight)
        self.bias: nn.Parameter | None = getattr(module, "bias", None)
        self.has_bias = self.bias is not None

    # -- shapes ---------------------------------------------------------------
    @property
    def out_dim(self) -> int:
        """m: rows of the gradient matrix."""
        raise NotImplementedError

    @property
    def in_dim(self) -> int:
        """n: columns of the gradient matrix (bias column included)."""
        raise NotImplementedError

    def params(self) -> list[nn.Parameter]:
        return [self.weight] + ([self.bias] if self.bias is not None else [])

    # -- captured tensors -----------------------------------------------------
    def input_rows(self, a: Tensor, *, homogeneous: bool = True) -> Tensor:
        """``(N, T, n)`` homogeneous input (a new tensor, safe against later in-place ops).

        ``homogeneous=False`` leaves out the bias column: ``(N, T, n - 1)`` for a layer with a
        bias (possibly a non-contiguous view of a new tensor; cheaper for large conv inputs).
        """
        raise NotImplementedError

    def output_rows(self, g: Tensor, *, scaled: bool = True) -> Tensor:
        """``(N, T, m)`` output gradients; ``scaled`` multiplies by :meth:`grad_multiplier`."""
        raise NotImplementedError

    def output_gram(self, g: Tensor, *, dtype: torch.dtype) -> tuple[Tensor, int, int]:
        """``(Σ ĝ ĝᵀ, rows, examples)`` over the scaled output rows ``ĝ`` of the raw hook
        value ``g`` (:meth:`output_rows`), summed in ``dtype``."""
        rows = self.output_rows(g)
        gt = rows.reshape(-1, rows.shape[-1]).t().to(dtype)
        return gram(gt), gt.shape[1], rows.shape[0]

    def input_gram(self, a: Tensor, *, dtype: torch.dtype) -> tuple[Tensor, Tensor, int]:
        """``(Σ x xᵀ, Σ x, rows)`` over the ``N·T`` input rows ``x`` (bias column left out)
        of the raw module input ``a``, summed in ``dtype``.  The default goes through
        :meth:`input_rows`; :class:`Conv2dHelper` builds patch columns chunk by chunk instead."""
        x = self.input_rows(a, homogeneous=False)
        xt = x.reshape(-1, x.shape[-1]).t().to(dtype)
        return gram(xt), xt.sum(1), xt.shape[1]

    def reduced_rows(self, a: Tensor, g: Tensor) -> tuple[Tensor, Tensor, int]:
        """K-FAC-reduce (Eschenhagen et al., NeurIPS 2023): ``(x̂, ĝ, R)`` with
        ``x̂_n = (1/R) Σ_r x_{n,r}`` the per-example *mean* input (``(N, n-1)``, bias column
        left out), ``ĝ_n = Σ_r g_{n,r}`` the per-example *sum* of the scaled output gradients
        (``(N, m)``), from the raw module input ``a`` and the raw hook value ``g``; ``R`` is the
        number of locations (tokens) that share the weight per example."""
        raise NotImplementedError(f"{type(self).__name__} has no K-FAC-reduce rows")

    def example_chunks(
        self, a: Tensor, g: Tensor, *, elements: int
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """``(a_chunk, g_chunk)`` pieces of the raw input ``a`` and the output rows ``g``
        (``(N, T, m)``), a few examples at a time so that ``input_rows(a_chunk)`` has about
        ``elements`` entries (cache-sized; a conv's whole patch matrix is never built).  One
        piece when ``a``'s first dim is not the examples' (token-level examples, an unbatched
        conv input) or off the CPU (one large product is faster on an accelerator)."""
        N = g.shape[0]
        batched = a.dim() > 0 and a.shape[0] == N and not (self.kind == "conv2d" and a.dim() == 3)
        step = N
        if batched and a.device.type == "cpu":
            step = max(1, elements // max(1, g.shape[1] * self.in_dim))
        if step >= N:
            yield a, g
            return
        for i in range(0, N, step):
            yield a[i : i + step], g[i : i + step]

    def grad_multiplier(self, g: Tensor) -> float:
        """Hook value -> per-example gradient: N (``batch``) or N·R (``tokens``)."""
        if self.loss_average == "tokens":
            return float(g.numel() // g.shape[-1]) if g.dim() > 1 else 1.0
        return float(g.shape[0])

    # -- gradients ------------------------------------------------------------
    def grad_matrix(self) -> Tensor | None:
        """``[∇W | ∇b]`` as an ``m × n`` matrix, or ``None`` when the weight has no grad."""
        gw = self.weight.grad
        if gw is None:
            return None
        gw = self._weight_to_matrix(gw)
        if self.bias is None:
            return gw
        gb = self.bias.grad
        gb = torch.zeros_like(self.bias) if gb is None else gb
        return torch.cat([gw, gb.unsqueeze(1)], dim=1)

    def set_grad(self, mat: Tensor) -> None:
        """Write an ``m × n`` matrix back into ``weight.grad`` (and ``bias.grad``)."""
        w = mat[:, :-1] if self.bias is not None else mat
        self.weight.grad = self._matrix_to_weight(w).to(self.weight.dtype).contiguous()
        if self.bias is not None:
            self.bias.grad = mat[:, -1].to(self.bias.dtype).contiguous()

    def weight_matrix(self) -> Tensor:
        """Current ``[W | b]`` (m × n), e.g. for dense test references."""
        w = self._weight_to_matrix(self.weight.detach())
        if self.bias is None:
            return w
        return torch.cat([w, self.bias.detach().unsqueeze(1)], dim=1)

    def _weight_to_matrix(self, w: Tensor) -> Tensor:
        return w.reshape(w.shape[0], -1)

    def _matrix_to_weight(self, mat: Tensor) -> Tensor:
        return mat.reshape(self.weight.shape)

    @staticmethod
    def _append_ones(x: Tensor) -> Tensor:
        ones = torch.ones(*x.shape[:-1], 1, dtype=x.dtype, device=x.device)
        return torch.cat([x, ones], dim=-1)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, m={self.out_dim}, n={self.in_dim})"


class LinearHelper(LayerHelper):
    """``nn.Linear`` on ``(N, d)`` or ``(N, ..., d)`` inputs (extra dims are locations/tokens)."""

    kind = "linear"
    module: nn.Linear

    @property
    def out_dim(self) -> int:
        return self.module.out_features

    @property
    def in_dim(self) -> int:
        return self.module.in_features + int(self.has_bias)

    def _rows(self, x: Tensor) -> Tensor:
        if x.dim() == 1:
            return x.reshape(1, 1, -1)
        if x.dim() == 2:
            return x.unsqueeze(1)
        if self.loss_average == "tokens":
            return x.reshape(-1, 1, x.shape[-1])
        return x.reshape(x.shape[0], -1, x.shape[-1])

    def input_rows(self, a: Tensor, *, homogeneous: bool = True) -> Tensor:
        a = self._rows(a.detach())
        return self._append_ones(a) if self.has_bias and homogeneous else a.clone()

    def output_rows(self, g: Tensor, *, scaled: bool = True) -> Tensor:
        rows = self._rows(g.detach())
        return rows * self.grad_multiplier(g) if scaled else rows

    def reduced_rows(self, a: Tensor, g: Tensor) -> tuple[Tensor, Tensor, int]:
        """As :meth:`LayerHelper.reduced_rows`; the locations are every dim between the first
        (examples) and the last (features), whatever ``loss_average`` says."""
        x, gd = a.detach(), g.detach()
        if x.dim() <= 2:
            mult = self.grad_multiplier(g)
            return x.reshape(-1, x.shape[-1]), gd.reshape(-1, gd.shape[-1]) * mult, 1
        x = x.reshape(x.shape[0], -1, x.shape[-1])
        gs = gd.reshape(gd.shape[0], -1, gd.shape[-1]).sum(1)
        return x.mean(1), gs * self.grad_multiplier(g), x.shape[1]


def _batched(x: Tensor) -> Tensor:
    """A conv's detached input or output gradient with its batch dimension (an unbatched
    ``(C, H, W)`` value becomes one example)."""
    x = x.detach()
    return x.unsqueeze(0) if x.dim() == 3 else x


class Conv2dHelper(LayerHelper):
    """``nn.Conv2d`` (stride, padding incl. ``'same'`` and non-zero modes, dilation) via
    strided patches.

    ``groups > 1`` is not supported (see :func:`unsupported_reason`).
    """

    kind = "conv2d"
    module: nn.Conv2d

    def __init__(self, name: str, module: nn.Conv2d, *, loss_average: str = "batch") -> None:
        super().__init__(name, module, loss_average=loss_average)
        m = module
        self._explicit_pad = isinstance(m.padding, str) or m.padding_mode != "zeros"
        pad = getattr(m, "_reversed_padding_repeated_twice", None)
        if self._explicit_pad and pad is None:  # pragma: no cover - torch internals moved
            raise UnsupportedLayerError(f"{name}: cannot determine the padding of {m}")
        #: ``(left, right, top, bottom)`` for the explicit ``F.pad`` (unused otherwise)
        self._pad: tuple[int, ...] = tuple(pad) if pad is not None else (0, 0, 0, 0)
        #: ``(ph, pw)`` of zero padding given as numbers (unused with an explicit pad)
        p = m.padding
        self._sym_pad = (0, 0) if isinstance(p, str) else (int(p[0]), int(p[1]))

    @property
    def out_dim(self) -> int:
        return self.module.out_channels

    @property
    def in_dim(self) -> int:
        m = self.module
        return m.in_channels * m.kernel_size[0] * m.kernel_size[1] + int(self.has_bias)

    def _out_hw(self, h: int, w: int) -> tuple[int, int]:
        """Output height and width for an ``h × w`` input (padding, dilation, stride)."""
        m = self.module
        if self._explicit_pad:
            left, right, top, bottom = self._pad
            h, w = h + top + bottom, w + left + right
        else:
            h, w = h + 2 * self._sym_pad[0], w + 2 * self._sym_pad[1]
        (kh, kw), (sh, sw), (dh, dw) = m.kernel_size, m.stride, m.dilation
        return (h - dh * (kh - 1) - 1) // sh + 1, (w - dw * (kw - 1) - 1) // sw + 1

    def patch_columns(self, a: Tensor) -> Tensor:
        """``(C_in·kh·kw, N·T)`` patch columns of a batched input, built by one strided copy
        of the (padded) input: the layout the Gram product wants, without ``unfold``'s
        ``(N, C·kh·kw, T)`` intermediate and its transpose (measured 1.2-1.8x faster on CPU for
        the small CNN's convs).  Columns in ``weight.view(C_out, -1)`` order; padding modes
        other than zeros and ``padding="same"`` go through an explicit ``F.pad``."""
        c, kh, kw, n, ho, wo = (view := self._patch_view(a)).shape
        return view.reshape(c * kh * kw, n * ho * wo)

    def _padded(self, a: Tensor) -> Tensor:
        """The batched input with the module's padding applied (``a`` itself without any)."""
        m = self.module
        if self._explicit_pad:
            mode = "constant" if m.padding_mode == "zeros" else m.padding_mode
            return F.pad(a, self._pad, mode=mode)
        if any(self._sym_pad):
            ph, pw = self._sym_pad
            return F.pad(a, (pw, pw, ph, ph))
        return a

    def _patch_view(self, a: Tensor) -> Tensor:
        """``(C_in, kh, kw, N, Ho, Wo)``: a strided view of the (padded) input, no copy."""
        m = self.module
        x = self._padded(a)
        (kh, kw), (sh, sw), (dh, dw) = m.kernel_size, m.stride, m.dilation
        n, c = x.shape[:2]
        ho, wo = self._out_hw(*a.shape[-2:])
        s_n, s_c, s_h, s_w = x.stride()
        return x.as_strided(
            (c, kh, kw, n, ho, wo),
            (s_c, s_h * dh, s_w * dw, s_n, s_h * sh, s_w * sw),
            x.storage_offset(),
        )

    def input_rows(self, a: Tensor, *, homogeneous: bool = True) -> Tensor:
        a = _batched(a)
        cols = self.patch_columns(a)  # (C k k, N·T), one strided copy
        p = cols.t().reshape(a.shape[0], -1, cols.shape[0])  # (N, T, C k k), a view
        return self._append_ones(p) if self.has_bias and homogeneous else p

    def output_rows(self, g: Tensor, *, scaled: bool = True) -> Tensor:
        g = _batched(g)
        rows = g.flatten(2).transpose(1, 2)  # (N, T, C_out)
        return rows * float(g.shape[0]) if scaled else rows

    def reduced_rows(self, a: Tensor, g: Tensor) -> tuple[Tensor, Tensor, int]:
        """As :meth:`LayerHelper.reduced_rows`, ``ĝ`` a spatial sum.  The patch sum is
        separable: per kernel row ``i`` the input rows ``i·dh + sh·t`` are summed (a strided
        slice with a contiguous inner dim), then per kernel column the same along the width,
        so no patch matrix is built (measured ~3x faster on CPU than reducing the 6-d strided
        patch view, whose innermost stride is not 1)."""
        a, gb = _batched(a), _batched(g)
        m = self.module
        (kh, kw), (sh, sw), (dh, dw) = m.kernel_size, m.stride, m.dilation
        ho, wo = self._out_hw(*a.shape[-2:])
        if m.padding_mode == "zeros":  # zero padding adds nothing: clip the ranges instead
            x, (left, _, top, _) = a, self._pad_amounts()
        else:
            x, left, top = self._padded(a), 0, 0
        rows = torch.stack(
            [_strided_sum(x, 2, i * dh - top, sh, ho) for i in range(kh)], 2
        )  # (N, C, kh, W)
        cols = torch.stack(
            [_strided_sum(rows, 3, j * dw - left, sw, wo) for j in range(kw)], -1
        )  # (N, C, kh, kw): the patch sums in weight.view(C_out, -1) order
        x_mean = cols.reshape(x.shape[0], -1) / (ho * wo)
        return x_mean, gb.sum((2, 3)) * self.grad_multiplier(gb), ho * wo

    def _pad_amounts(self) -> tuple[int, int, int, int]:
        """``(left, right, top, bottom)`` padding of the input."""
        if self._explicit_pad:
            left, right, top, bottom = (int(p) for p in self._pad)
            return left, right, top, bottom
        ph, pw = self._sym_pad
        return pw, pw, ph, ph

    def grad_multiplier(self, g: Tensor) -> float:
        return float(g.shape[0]) if g.dim() == 4 else 1.0

    def output_gram(self, g: Tensor, *, dtype: torch.dtype) -> tuple[Tensor, int, int]:
        """As :meth:`LayerHelper.output_gram`, from ``g``'s own ``(N, C_out, H·W)`` layout a
        few examples at a time (no transposed copy of the whole gradient), scaled once."""
        g = _batched(g)
        mult = self.grad_multiplier(g)
        flat = g.flatten(2)  # (N, m, T)
        n, m, t = flat.shape
        step = max(1, self.GRAM_CHUNK_ELEMENTS // max(1, m * t)) if g.device.type == "cpu" else n
        acc = torch.zeros(m, m, dtype=dtype, device=g.device)
        for i in range(0, n, step):
            gt = flat[i : i + step].transpose(0, 1).reshape(m, -1).to(dtype)
            add_gram_(acc, gt, complete=False)
        return complete_gram_(acc).mul_(mult * mult), n * t, n

    #: patch (and gradient) elements per chunk in :meth:`input_gram` / :meth:`output_gram`
    #: (~4 MB in float32: cache-sized)
    GRAM_CHUNK_ELEMENTS = 1 << 20

    def input_gram(self, a: Tensor, *, dtype: torch.dtype) -> tuple[Tensor, Tensor, int]:
        """As :meth:`LayerHelper.input_gram`, a few examples at a time (:meth:`patch_columns`):
        the whole batch's patches (``C·kh·kw`` times the input) are never materialised, and the
        small chunks stay in cache (measured on 2 CPU threads, small-CNN convs: 1.6x faster
        than unfold-all + one GEMM)."""
        a = _batched(a)
        k = self.in_dim - int(self.has_bias)
        acc = torch.zeros(k, k, dtype=dtype, device=a.device)
        colsum = torch.zeros(k, dtype=dtype, device=a.device)
        n, rows = a.shape[0], 0
        step = n  # one big GEMM on an accelerator
        if a.device.type == "cpu":
            ho, wo = self._out_hw(*a.shape[-2:])
            step = max(1, self.GRAM_CHUNK_ELEMENTS // max(1, k * ho * wo))
        for i in range(0, n, step):
            xt = self.patch_columns(a[i : i + step]).to(dtype)  # (k, c·T)
            add_gram_(acc, xt, complete=False)
            colsum += xt.sum(1)
            rows += xt.shape[1]
        return complete_gram_(acc), colsum, rows


def _strided_sum(x: Tensor, dim: int, start: int, step: int, count: int) -> Tensor:
    """``Σ_t x[..., start + step·t, ...]`` over ``t < count`` along ``dim``, positions outside
    ``[0, x.shape[dim])`` counting as zeros (the zero padding)."""
    size = x.shape[dim]
    first = -(start // step) if start < 0 else 0  # first t with start + step·t >= 0
    last = min(count - 1, (size - 1 - start) // step)  # last t with start + step·t < size
    if last < first:
        shape = list(x.shape)
        del shape[dim]
        return x.new_zeros(shape)
    lo = start + step * first
    return x.narrow(dim, lo, step * (last - first) + 1)[
        (slice(None),) * dim + (slice(None, None, step),)
    ].sum(dim)


class EmbeddingHelper(LayerHelper):
    """``nn.Embedding`` as a Linear layer on one-hot inputs: ``A`` is diagonal (token counts).

    PyTorch stores the weight as ``V × d``; the gradient matrix here is its transpose
    (``m = d`` rows, ``n = V`` columns), the Linear convention.  There is no bias.
    ``input_rows`` returns the token ids ``(N, T)`` (long) instead of one-hot rows.
    """

    kind = "embedding"
    module: nn.Embedding
    diagonal_input = True

    @property
    def out_dim(self) -> int:
        return self.module.embedding_dim

    @property
    def in_dim(self) -> int:
        return self.module.num_embeddings

    def input_rows(self, a: Tensor, *, homogeneous: bool = True) -> Tensor:
        idx = a.detach()
        if idx.dim() == 0:
            return idx.reshape(1, 1)
        if idx.dim() == 1:
            return idx.unsqueeze(1).clone()
        if self.loss_average == "tokens":
            return idx.reshape(-1, 1).clone()
        return idx.reshape(idx.shape[0], -1).clone()

    def output_rows(self, g: Tensor, *, scaled: bool = True) -> Tensor:
        g = g.detach()
        if g.dim() == 1:
            rows = g.reshape(1, 1, -1)
        elif g.dim() == 2:
            rows = g.unsqueeze(1)
        elif self.loss_average == "tokens":
            rows = g.reshape(-1, 1, g.shape[-1])
        else:
            rows = g.reshape(g.shape[0], -1, g.shape[-1])
        return rows * self.grad_multiplier(g) if scaled else rows

    def one_hot_rows(self, idx: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
        """Dense ``(N, T, V)`` one-hot inputs (tests and small vocabularies only)."""
        return F.one_hot(idx, self.in_dim).to(dtype)

    def _weight_to_matrix(self, w: Tensor) -> Tensor:
        return w.t()

    def _matrix_to_weight(self, mat: Tensor) -> Tensor:
        return mat.t()


def unsupported_reason(module: nn.Module) -> str | None:
    """``None`` when :func:`make_helper` supports ``module``, else why not."""
    if isinstance(module, nn.Linear):
        return None
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            return f"Conv2d with groups={module.groups} (grouped/depthwise) is not supported"
        return None
    if isinstance(module, nn.Embedding):
        if module.sparse:
            return "Embedding(sparse=True) is not supported (dense gradients needed)"
        return None
    return f"{type(module).__name__} has no curvature helper (Linear, Conv2d, Embedding only)"


def make_helper(name: str, module: nn.Module, *, loss_average: str = "batch") -> LayerHelper:
    """The helper for ``module``; raises :class:`UnsupportedLayerError` with the reason."""
    reason = unsupported_reason(module)
    if reason is not None:
        raise UnsupportedLayerError(f"layer {name!r}: {reason}")
    if isinstance(module, nn.Conv2d):
        return Conv2dHelper(name, module, loss_average=loss_average)
    if isinstance(module, nn.Embedding):
        return EmbeddingHelper(name, module, loss_average=loss_average)
    return LinearHelper(name, module, loss_average=loss_average)
