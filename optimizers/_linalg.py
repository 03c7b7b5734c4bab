"""Robust symmetric eigendecomposition / inverse for curvature factors.

Factors are decomposed in at least float32 (kfac-pytorch's ``inv_dtype`` convention, ALGORITHMS.md
§0.3); on failure (an exception or a non-finite result) the computation is retried in float64;
if that fails too the helpers return ``None`` and the caller keeps its previous decomposition.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "add_gram_", "columns", "gram", "compute_dtype", "safe_eigh", "safe_inv", "symmetrize",
]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """At least float32: float16/bfloat16 factors are decomposed in float32."""
    return torch.promote_types(dtype, torch.float32)


#: from this many columns on, :func:`add_gram_` multiplies only the lower blocks
GRAM_SPLIT = 256


def add_gram_(out: Tensor, xt: Tensor, *, complete: bool = True) -> Tensor:
    """``out += xt @ xt.T`` in place (``xt``: ``k × M``).

    For ``k >= GRAM_SPLIT`` only the two diagonal blocks and the lower off-diagonal block are
    multiplied (3/4 of the flops of the full product; torch has no symmetric rank-k update).
    ``complete=False`` leaves the upper off-diagonal block stale, for accumulating over many
    chunks; call :func:`complete_gram_` once at the end.
    """
    k = xt.shape[0]
    if k < GRAM_SPLIT:
        return out.addmm_(xt, xt.t())
    h = k // 2
    top, bot = xt[:h], xt[h:]
    out[:h, :h].addmm_(top, top.t())
    out[h:, :h].addmm_(bot, top.t())
    out[h:, h:].addmm_(bot, bot.t())
    return complete_gram_(out) if complete else out


def gram(xt: Tensor) -> Tensor:
    """``xt @ xt.T``, out of place below ``GRAM_SPLIT`` columns (so it works under vmap)."""
    k = xt.shape[0]
    if k < GRAM_SPLIT:
        return xt @ xt.t()
    return add_gram_(xt.new_zeros(k, k), xt)


def complete_gram_(out: Tensor) -> Tensor:
    """Copy the lower off-diagonal block of an :func:`add_gram_` accumulation to the upper."""
    k = out.shape[0]
    if k >= GRAM_SPLIT:
        h = k // 2
        out[:h, h:] = out[h:, :h].t()
    return out


def symmetrize(m: Tensor) -> Tensor:
    return (m + m.transpose(-1, -2)) * 0.5


def _finite(*ts: Tensor) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in ts)


def safe_eigh(m: Tensor, *, clamp_min: float | None = 0.0) -> tuple[Tensor, Tensor] | None:
    """``(eigenvalues, eigenvectors)`` of the symmetric ``m`` in ``m``'s compute dtype.

    Eigenvalues are clamped at ``clamp_min`` (PSD factors).  Returns ``None`` when both the
    compute-dtype and the float64 attempt fail.
    """
    if not _finite(m):
        return None
    out_dtype = compute_dtype(m.dtype)
    for dtype in dict.fromkeys((out_dtype, torch.float64)):
        try:
            d, q = torch.linalg.eigh(symmetrize(m.to(dtype)))
        except (RuntimeError, ValueError):  # LinAlgError is a RuntimeError
            continue
        if not _finite(d, q):
            continue
        if clamp_min is not None:
            d = d.clamp_min(clamp_min)
        return d.to(out_dtype), q.to(out_dtype)
    return None


def safe_inv(m: Tensor) -> Tensor | None:
    """Inverse of the symmetric positive-definite ``m`` (Cholesky, then LU, then float64)."""
    if not _finite(m):
        return None
    out_dtype = compute_dtype(m.dtype)
    for dtype in dict.fromkeys((out_dtype, torch.float64)):
        x = symmetrize(m.to(dtype))
        try:
            chol, info = torch.linalg.cholesky_ex(x)
            inv = torch.cholesky_inverse(chol) if int(info) == 0 else torch.linalg.inv(x)
        except (RuntimeError, ValueError):
            continue
        if _finite(inv):
            return inv.to(out_dtype)
    return None


def columns(x: Tensor, dtype: torch.dtype) -> Tensor:
    """``(N, T, k)`` rows -> ``(k, N·T)`` columns in ``dtype`` (one copy at most)."""
    k = x.shape[-1]
    return x.permute(2, 0, 1).reshape(k, -1).to(dtype)
