"""Cost model of the optimizer step: the arithmetic each method needs, priced at this machine's
measured rates, so ``ngbench bench`` can print a *floor* beside each measured step time.

For every curvature layer the bench's batch reaches (``Linear``/``Conv2d``/``Embedding``: output
rows ``m``, input columns ``n`` incl. the bias, ``N`` examples, ``T`` locations per example),
each method's essential kernels per phase are listed from ALGORITHMS.md's cost sections (§1.6
K-FAC, §2.5 EKFAC, §3.4 TKFAC/TEKFAC, §4.6 NG+, §6.3 MBF, §7.3-7.4 Shampoo/SOAP) and
each kernel is *timed at its exact shape in this process* (:class:`Rates`: GEMMs, batched GEMMs,
``eigh``, batched inverses, elementwise passes, and the per-call overhead of a tiny op), then
amortised over the method's schedule (statistics every ``stat_every`` steps, refresh every
``inv_every`` ...).  The floor of a step is SGD's measured step plus the predicted extra phases
of the method; the bench reports ``floor_ratio = floor / SGD step`` beside the measured ratio
and names the phase whose measured time exceeds its prediction most.

What the floor leaves out (so a method can sit above it for a stated reason): the symmetric
halves of Gram products are priced as full GEMMs (a ``syrk`` floor would be half); forward and
backward hooks beyond the statistics kernels; Python bookkeeping beyond ``CALLS`` tiny ops per
layer; communication (one process: zero).  Methods without a model here (SNGD: its
per-unit/shared metric choice per layer is not modelled yet) get no floor.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["LayerShape", "Rates", "layer_shapes", "memory_floor", "predict", "settings_of"]

#: tiny Python-side ops per layer and step that any per-layer preconditioner issues
#: (grad matrix, write-back, clip contribution, ...), priced at the measured per-call overhead
CALLS = 8
PHASES = ("statistics", "inverse", "precondition", "update")


@dataclass(frozen=True)
class LayerShape:
    name: str
    kind: str  # linear | conv2d | embedding
    m: int  # output rows
    n: int  # input columns, bias included (embedding: vocabulary size)
    N: int  # examples
    T: int  # locations per example sharing the weight
    k2: int = 1  # kernel area (conv)
    bias: bool = False

    @property
    def c_in(self) -> int:
        return (self.n - int(self.bias)) // self.k2


def layer_shapes(model: nn.Module, run_forward: Callable[[], Any]) -> list[LayerShape]:
    """The curvature layers of ``model`` with the shapes one call of ``run_forward`` (a forward
    pass on the bench batch, run here without gradients) gives them."""
    found: list[LayerShape] = []
    handles = []

    def hook(name: str, mod: nn.Module) -> Callable[..., None]:
        def fn(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
            a = inputs[0]
            bias = getattr(module, "bias", None) is not None
            if isinstance(module, nn.Conv2d):
                n_ex = a.shape[0] if a.dim() == 4 else 1
                t = output.shape[-1] * output.shape[-2]
                k2 = module.kernel_size[0] * module.kernel_size[1]
                found.append(LayerShape(name, "conv2d", module.out_channels,
                                        module.in_channels * k2 + int(bias), n_ex, t, k2, bias))
            elif isinstance(module, nn.Embedding):
                n_ex = a.shape[0] if a.dim() >= 1 else 1
                found.append(LayerShape(name, "embedding", module.embedding_dim,
                                        module.num_embeddings, n_ex, max(1, a.numel() // n_ex)))
            else:
                if not isinstance(module, nn.Linear):  # only these three kinds are hooked below
                    raise TypeError(f"layer_shapes: unexpected layer {type(module).__name__}")
                n_ex = a.shape[0] if a.dim() >= 2 else 1
                t = max(1, a.numel() // max(1, a.shape[-1]) // n_ex)
                found.append(LayerShape(name, "linear", module.out_features,
                                        module.in_features + int(bias), n_ex, t, 1, bias))

        return fn

    for name, mod in model.named_modules():
        if isinstance(mod, (nn.Linear, nn.Conv2d, nn.Embedding)):
            handles.append(mod.register_forward_hook(hook(name, mod)))
    try:
        with torch.no_grad():
            run_forward()
    finally:
        for h in handles:
            h.remove()
    seen: dict[str, LayerShape] = {}
    for s in found:  # a module called twice keeps its first call's shape, N·T summed
        if s.name in seen:
            p = seen[s.name]
            seen[s.name] = LayerShape(p.name, p.kind, p.m, p.n, p.N, p.T + s.T, p.k2, p.bias)
        else:
            seen[s.name] = s
    return list(seen.values())


class Rates:
    """Kernel times measured in this process on ``device`` (median of ``reps`` after one
    warm-up call), cached per shape."""

    def __init__(self, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 reps: int = 3) -> None:
        self.device = torch.device(device)
        self.dtype = dtype
        self.reps = reps
        self._cache: dict[tuple, float] = {}
        self.call = self._measure(("call",), self._call_fn())

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _time(self, fn: Callable[[], Any]) -> float:
        fn()
        self._sync()
        out = []
        for _ in range(self.reps):
            t0 = time.perf_counter()
            fn()
            self._sync()
            out.append(time.perf_counter() - t0)
        return statistics.median(out)

    def _measure(self, key: tuple, fn: Callable[[], Any]) -> float:
        if key not in self._cache:
            self._cache[key] = self._time(fn)
        return self._cache[key]

    def _rand(self, *shape: int, dtype: torch.dtype | None = None) -> Tensor:
        return torch.randn(*shape, device=self.device, dtype=dtype or self.dtype)

    def _call_fn(self) -> Callable[[], Any]:
        x = self._rand(1)
        return lambda: x.add_(1.0)

    def gemm(self, m: int, k: int, n: int, dtype: torch.dtype | None = None) -> float:
        """``(m × k) @ (k × n)`` (in ``dtype``, default the rates' own)."""
        if min(m, k, n) <= 0:
            return 0.0
        key = ("gemm", m, k, n, dtype or self.dtype)
        if key not in self._cache:
            a, b = self._rand(m, k, dtype=dtype), self._rand(k, n, dtype=dtype)
            self._measure(key, lambda: a @ b)
        return self._cache[key]

    def bmm(self, b: int, m: int, k: int, n: int, dtype: torch.dtype | None = None) -> float:
        if min(b, m, k, n) <= 0:
            return 0.0
        key = ("bmm", b, m, k, n, dtype or self.dtype)
        if key not in self._cache:
            x, y = self._rand(b, m, k, dtype=dtype), self._rand(b, k, n, dtype=dtype)
            self._measure(key, lambda: torch.bmm(x, y))
        return self._cache[key]

    def eigh(self, n: int) -> float:
        if n <= 1:
            return self.call
        key = ("eigh", n)
        if key not in self._cache:
            x = self._rand(n, n)
            s = x @ x.t() + n * torch.eye(n, device=self.device, dtype=self.dtype)
            self._measure(key, lambda: torch.linalg.eigh(s))
        return self._cache[key]

    def qr(self, n: int) -> float:
        """QR decomposition of an ``n × n`` matrix."""
        if n <= 1:
            return self.call
        key = ("qr", n)
        if key not in self._cache:
            x = self._rand(n, n)
            self._measure(key, lambda: torch.linalg.qr(x))
        return self._cache[key]

    def binv(self, b: int, n: int) -> float:
        """Batched inverse of ``b`` SPD ``n × n`` matrices, by Cholesky as the methods invert
        them (``_linalg.safe_inv``, ``mbf.batched_spd_inverse``; a batched LU ``inv`` of 64
        matrices of 257 × 257 made MKL's SLASWP fail and hang, on the Transformer's SNGD)."""
        if b <= 0 or n <= 0:
            return 0.0
        key = ("binv", b, n)
        if key not in self._cache:
            x = self._rand(b, n, n)
            s = x @ x.transpose(1, 2) + n * torch.eye(n, device=self.device, dtype=self.dtype)
            self._measure(key, lambda: torch.cholesky_inverse(torch.linalg.cholesky(s)))
        return self._cache[key]

    def passes(self, numel: int, k: float = 1.0) -> float:
        """``k`` elementwise read-modify-write passes over ``numel`` elements."""
        if numel <= 0 or k <= 0:
            return 0.0
        size = 1 << max(10, (int(numel) - 1).bit_length())  # cached per power of two
        key = ("pass", size)
        if key not in self._cache:
            a, b = self._rand(size), self._rand(size)
            self._measure(key, lambda: a.add_(b))
        return k * self._cache[key] * numel / size

    def summary(self) -> dict[str, float | str]:
        """A few headline rates (GFLOP/s of a 512³ GEMM, ms of a 256 eigh, µs per call)."""
        t = self.gemm(512, 512, 512)
        return {"gemm512_gflops": 2 * 512**3 / t / 1e9, "eigh256_ms": 1e3 * self.eigh(256),
                "call_us": 1e6 * self.call, "device": str(self.device)}


# ----------------------------------------------------------------------------- methods
def _every(value: Any, default: int) -> int:
    if isinstance(value, bool):
        return default
    if isinstance(value, int):
        return max(1, value)
    if isinstance(value, (list, tuple)) and value:  # a schedule: its first frequency
        first = value[0]
        return _every(first[-1] if isinstance(first, (list, tuple)) else first, default)
    return default


def settings_of(opt: Any) -> dict[str, Any]:
    """Schedule settings the model needs, read from a built optimizer."""
    d = dict(getattr(opt, "defaults", {}) or {})
    cfg = getattr(opt, "config", None)  # the optimizer's config dataclass (optimizers/_config)
    out: dict[str, Any] = {}
    for key in ("stat_every", "inv_every", "scale_every", "precondition_frequency",
                "max_preconditioner_dim", "max_precond_dim", "approx", "scalings", "max_block",
                "linear_block", "precondition_1d", "damping_form", "smw"):
        v = getattr(opt, key, None)
        if v is None:
            v = getattr(cfg, key, d.get(key))
        if v is not None:
            out[key] = v
    kinds = {n: b.kind for n, b in (getattr(opt, "blocks", None) or {}).items()
             if isinstance(getattr(b, "kind", None), str)}
    if kinds:  # SNGD's metric per layer: input (shared), unit (per output unit) or diag
        out["block_kinds"] = kinds
    for b in (getattr(opt, "blocks", None) or {}).values():
        choice = getattr(b, "projection_dtype", None)
        if choice is not None:  # EKFAC/TEKFAC: the dtype the projections are multiplied in
            from ngbench.optimizers._eigencorrect import resolve_projection_dtype

            out["projection_dtype"] = resolve_projection_dtype(str(choice), b.stat_dtype,
                                                               b.device)
            break
    return out


def _gram(r: Rates, k: int, rows: int) -> float:
    """``X Xᵀ`` of a ``k × rows`` matrix as optimizers/_linalg.py's ``gram`` forms it: from
    ``GRAM_SPLIT`` rows of ``X`` on, the two diagonal blocks and one off-diagonal block."""
    from ngbench.optimizers._linalg import GRAM_SPLIT

    if k < GRAM_SPLIT:
        return r.gemm(k, rows, k)
    h = k // 2
    return r.gemm(h, rows, h) + r.gemm(k - h, rows, h) + r.gemm(k - h, rows, k - h)


def _kron_stats(r: Rates, s: LayerShape, approx: str) -> float:
    rows = s.N * (1 if approx == "reduce" else s.T)
    t = _gram(r, s.m, rows) + r.call * 3
    if s.kind == "embedding":
        return t + r.passes(s.N * s.T)  # bincount of the token ids
    t += _gram(r, s.n - int(s.bias), rows)  # the bias row and column: a column sum
    if s.T > 1 and approx == "reduce":  # separable patch sums: ~kh row sums per output row
        t += r.passes(s.N * s.T * s.c_in * max(1, math.isqrt(s.k2)))
    elif s.T > 1:  # the patch copy behind the Gram over N·T rows
        t += r.passes(s.N * s.T * (s.n - int(s.bias)))
    return t


def _kron_inverse(r: Rates, s: LayerShape, eigen: bool) -> float:
    """``eigen``: both factors' eigendecompositions; the inverse damping forms
    (``factored_tikhonov``, ``inverse``): two damped inverses (optimizers/_kronecker.py)."""
    factor = r.eigh if eigen else (lambda n: r.binv(1, n))
    return factor(s.m) + (r.passes(s.n) if s.kind == "embedding" else factor(s.n))


def _kron_precondition(r: Rates, s: LayerShape, eigen: bool) -> float:
    """``eigen``: ``Q_G [(Q_Gᵀ V Q_A) ⊘ S] Q_Aᵀ``, four products and a scaling pass; the
    inverse forms: ``G⁻¹ V A⁻¹``, two products."""
    k = 2 if eigen else 1
    if s.kind == "embedding":
        t = r.gemm(s.m, s.m, s.n) * k
    else:
        t = (r.gemm(s.m, s.m, s.n) + r.gemm(s.m, s.n, s.n)) * k
    return t + r.passes(s.m * s.n, 3 if eigen else 1) + CALLS * r.call


def _projections(r: Rates, s: LayerShape, dtype: torch.dtype | None = None) -> float:
    """EKFAC's exact scalings ``Σ_n (Q_Gᵀ ∇W_n Q_A)²`` as ``projected_second_moment``
    (optimizers/_eigencorrect.py) forms them; ``dtype``: the projections' multiply dtype."""
    N, T, m, n = s.N, s.T, s.m, s.n
    x = n - int(s.bias)  # rows without the bias column: ā Q_A = a Q_A[:-1] + Q_A[-1]
    if T == 1:  # rank-one gradients: (g Q_G)²ᵀ (ā Q_A)², the last product in the factor dtype
        return (r.gemm(N, x, n, dtype) + r.gemm(N, m, m, dtype) + r.gemm(m, N, n)
                + r.passes(N * (m + n), 2))
    from ngbench.optimizers._eigencorrect import rows_path_is_cheaper

    if rows_path_is_cheaper(T, m, n):  # project the rows
        return (r.gemm(N * T, x, n, dtype) + r.gemm(N * T, m, m, dtype)
                + r.bmm(N, m, T, n, dtype) + r.passes(N * m * n, 2))
    # per-example gradients, then Q_Gᵀ G_n Q_A (in the factor dtype)
    return (r.bmm(N, m, T, x) + r.bmm(N, m, m, n) + r.bmm(N, m, n, n)
            + r.passes(N * m * n, 2))


def _tensor_blocks(name: str, settings: dict[str, Any],
                   param_shapes: list[tuple[int, ...]] | None) -> list[tuple[int, tuple]]:
    """``(count, dims)`` of the preconditioned blocks of Shampoo (optimizers/shampoo.py's own
    dim merging and blocking) or SOAP (one factor per dim up to ``max_precond_dim``, 1-D
    parameters left out, the default ``merge_dims=False``)."""
    from ngbench.optimizers.shampoo import _block_slices, merge_dims

    out: list[tuple[int, tuple]] = []
    for shape in param_shapes or []:
        if name == "shampoo":
            max_dim = _every(settings.get("max_preconditioner_dim"), 1 << 30)
            merged = merge_dims(tuple(shape), max_dim)
            if len(shape) <= 1 and not settings.get("precondition_1d"):
                continue
            by: dict[tuple, int] = {}
            for sl in _block_slices(merged, max_dim):
                dims = tuple(x.stop - x.start for x in sl)
                by[dims] = by.get(dims, 0) + 1
            out += [(c, d) for d, c in by.items()]
        else:
            max_dim = _every(settings.get("max_precond_dim"), 1 << 30)
            if len(shape) <= 1 and not settings.get("precondition_1d"):
                continue
            out.append((1, tuple(d if d <= max_dim else 1 for d in shape)))
    return out


def predict(name: str, settings: dict[str, Any], shapes: list[LayerShape], rates: Rates,
            params: int, param_shapes: list[tuple[int, ...]] | None = None
            ) -> dict[str, float] | None:
    """Predicted seconds per step of each phase the method adds to SGD with momentum
    (amortised over its schedule), or ``None`` when there is no model for ``name``.
    ``shapes``: the layers the method registers; ``param_shapes``: every trainable
    parameter's shape (Shampoo and SOAP precondition parameters, not layers)."""
    r = rates
    out = dict.fromkeys(PHASES, 0.0)
    if name == "sgd":
        return out
    if name == "adamw":
        out["update"] = r.passes(params, 3)  # second moment, sqrt/divide, decoupled decay
        return out
    stat = _every(settings.get("stat_every"), 1)
    inv = _every(settings.get("inv_every"), 1)
    if name in ("kfac", "ekfac", "tkfac", "tekfac"):
        approx = settings.get("approx", "expand") if name in ("kfac", "ekfac") else "expand"
        scale = _every(settings.get("scale_every"), stat)
        # the exact scalings' projections: on scale steps that do not refresh the basis
        proj_rate = 1 / scale - (1 / inv if inv % scale == 0 else 1 / math.lcm(scale, inv))
        # EKFAC/TEKFAC precondition in the eigenbasis, TKFAC with two damped inverses
        # (optimizers/tkfac.py), K-FAC as its damping_form says
        eigen = name in ("ekfac", "tekfac") or (
            name == "kfac" and str(settings.get("damping_form", "eigen")) == "eigen")
        for s in shapes:
            out["statistics"] += _kron_stats(r, s, approx) / stat
            out["inverse"] += _kron_inverse(r, s, eigen) / inv
            out["precondition"] += _kron_precondition(r, s, eigen)
            if name in ("ekfac", "tekfac") and s.kind != "embedding":
                out["statistics"] += (_projections(r, s, settings.get("projection_dtype"))
                                      * proj_rate)
            if name in ("tkfac", "tekfac"):  # per-example norms: O(N) extra work
                out["statistics"] += r.passes(s.N * s.T * (s.m + s.n)) / stat
        return out
    if name in ("shampoo", "soap"):
        freq = _every(settings.get("precondition_frequency"), 1)
        # SOAP projects the gradient and the first moment in, the direction back out
        k = 1 if name == "shampoo" else 3
        for count, dims in _tensor_blocks(name, settings, param_shapes):
            numel = math.prod(dims)
            for d in dims:
                if d <= 1:
                    continue
                rest = numel // d
                out["statistics"] += count * r.gemm(d, rest, d)
                if name == "shampoo":  # eigh, then Q diag(λ^-1/p) Qᵀ
                    refresh = r.eigh(d) + r.gemm(d, d, d)
                else:  # one power iteration: diag(QᵀPQ) for the order, then qr(P Q)
                    refresh = 3 * r.gemm(d, d, d) + r.qr(d)
                out["inverse"] += count * refresh / freq
                out["precondition"] += count * k * r.gemm(d, d, rest)
            out["update"] += r.passes(count * numel, 3 if name == "shampoo" else 5)
            out["precondition"] += CALLS * r.call
        return out
    if name == "ngplus":
        for s in shapes:
            for phase, t in _ngplus_layer(r, s, str(settings.get("smw", "auto"))).items():
                out[phase] += t / {"statistics": stat, "inverse": inv}.get(phase, 1)
        return out
    if name == "sngd":
        for s in shapes:
            kind = _sngd_kind(s, settings)
            rows = s.N * s.T
            if kind == "diag":  # token frequencies
                out["statistics"] += r.passes(rows) / stat
                out["inverse"] += r.passes(s.n) / inv
                out["precondition"] += r.passes(s.m * s.n)
            elif kind == "input":  # M = E[x̃x̃ᵀ] over the (unfolded) input rows
                copy = r.passes(rows * s.n) if s.T > 1 else 0.0
                x = s.n - int(s.bias)  # the bias row and column: a column sum
                out["statistics"] += (r.gemm(x, rows, x) + copy) / stat
                out["inverse"] += r.binv(1, s.n) / inv
                out["precondition"] += r.gemm(s.m, s.n, s.n)
            else:  # unit: M_j = E[ψ_j x̃x̃ᵀ], the upper triangles of all m units in one GEMM
                tri = s.n * (s.n + 1) // 2
                out["statistics"] += (r.gemm(rows, s.n, s.m) + r.passes(rows * tri)
                                      + r.gemm(s.m, rows, tri)) / stat
                out["inverse"] += r.binv(s.m, s.n) / inv
                out["precondition"] += r.bmm(s.m, s.n, s.n, 1)
            out["precondition"] += CALLS * r.call
        return out
    if name == "mbf" and settings.get("linear_block", "row") == "row":
        for s in shapes:
            if s.kind == "embedding":
                continue
            b, k = _mini_blocks(s, settings)
            # per-example gradients (the bias column: a sum over locations)
            grads = (r.bmm(s.N, s.m, s.T, s.n - int(s.bias)) if s.T > 1
                     else r.passes(s.N * s.m * s.n))
            out["statistics"] += (grads + r.bmm(b, k, s.N, k)) / stat
            out["inverse"] += r.binv(b, k) / inv
            out["precondition"] += r.bmm(b, k, k, 1) + CALLS * r.call
        return out
    return None


def memory_floor(name: str, settings: dict[str, Any], shapes: list[LayerShape],
                 params: int, param_shapes: list[tuple[int, ...]] | None = None,
                 bytes_per: int = 4) -> int | None:
    """Bytes of state the method cannot do without (``None``: no model): SGD's momentum,
    AdamW's two moments, and for curvature methods their factors/decompositions plus the
    momentum buffer of their SGD/Adam base step."""
    if name == "sgd":
        return params * bytes_per
    if name == "adamw":
        return 2 * params * bytes_per
    total = 0
    if name in ("kfac", "ekfac", "tkfac", "tekfac"):
        for s in shapes:
            n2 = s.n if s.kind == "embedding" else s.n * s.n
            total += 2 * (s.m * s.m + n2)  # factors and their eigenbases (or inverses)
            if name in ("kfac", "ekfac", "tekfac"):
                total += s.m * s.n  # the precomputed 1/(T·d_G d_Aᵀ + λ) of the eigen form
            if name in ("ekfac", "tekfac"):
                total += s.m * s.n  # the corrected scalings
        return (total + params) * bytes_per
    if name in ("shampoo", "soap"):
        for count, dims in _tensor_blocks(name, settings, param_shapes):
            total += count * sum(2 * d * d for d in dims if d > 1)  # factors and roots/bases
        return (total + 2 * params) * bytes_per  # + grafting/Adam second moment, momentum
    if name == "ngplus":  # the m×m GFIM and its inverse, or SMW's U (m×k) and kernel (k×k)
        mode = str(settings.get("smw", "auto"))
        for s in shapes:
            k = _ngplus_smw(s, mode)
            total += s.m * k + k * k if k else 2 * s.m * s.m
        return (total + params) * bytes_per
    if name == "sngd":  # each metric and its inverse
        for s in shapes:
            kind = _sngd_kind(s, settings)
            total += 2 * (s.n if kind == "diag" else s.n * s.n * (s.m if kind == "unit" else 1))
        return (total + params) * bytes_per
    if name == "mbf" and settings.get("linear_block", "row") == "row":
        for s in shapes:
            if s.kind != "embedding":
                b, k = _mini_blocks(s, settings)
                total += 2 * b * k * k  # running blocks and their inverses
        return (total + params) * bytes_per
    return None


def _ngplus_smw(s: LayerShape, mode: str) -> int:
    """The width ``k`` of NG+'s snapshot factor ``U`` (``m × k``) when the layer takes the
    Sherman–Morrison–Woodbury path, else 0 (optimizers/ngplus.py: Linear layers, ``auto``:
    when ``k < m`` on the first statistic batch)."""
    k = s.N if s.T == 1 else s.N * s.n
    if s.kind != "linear" or mode == "never" or (mode == "auto" and k >= s.m):
        return 0
    return k


def _ngplus_layer(r: Rates, s: LayerShape, mode: str) -> dict[str, float]:
    """NG+'s work on one layer per statistic / refresh / step, as optimizers/ngplus.py does it:
    the GFIM ``Σ_n G_n G_nᵀ`` (rank-one rows, per-example ``G_n`` or the location kernel,
    whichever its own rule picks), its damped inverse, ``F⁻¹ V``; or the SMW path."""
    from ngbench.optimizers.ngplus import direct_gram_is_cheaper

    N, T, m, n = s.N, s.T, s.m, s.n
    out = {"precondition": CALLS * r.call}
    k = _ngplus_smw(s, mode)
    if k:
        out["statistics"] = (r.passes(N * (m + n)) if T == 1
                             else r.bmm(N, m, T, n) + r.passes(N * m * n))
        out["inverse"] = r.gemm(k, m, k) + r.binv(1, k)
        out["precondition"] += (r.gemm(k, m, n) + r.gemm(k, k, n) + r.gemm(m, k, n)
                                + r.passes(m * n, 2))
        return out
    if s.kind == "embedding":
        out["statistics"] = (r.gemm(m, N, m) if T == 1
                             else r.bmm(N, T, T, m) + r.gemm(m, N * T, m) + r.passes(N * T * T))
    elif T == 1:
        out["statistics"] = r.passes(N * (m + n)) + r.gemm(m, N, m)
    elif direct_gram_is_cheaper(T, m, n):  # per-example G_n
        out["statistics"] = r.bmm(N, m, T, n) + r.gemm(m, N * n, m)
    else:  # the location kernel g_nᵀ (ā_n ā_nᵀ) g_n
        out["statistics"] = r.bmm(N, T, n, T) + r.bmm(N, T, T, m) + r.gemm(m, N * T, m)
    out["inverse"] = r.binv(1, m)
    out["precondition"] += r.gemm(m, m, n)
    return out


def _sngd_kind(s: LayerShape, settings: dict[str, Any]) -> str:
    """The metric SNGD built for a layer (``block_kinds`` read from the optimizer by
    :func:`settings_of`; the shared input metric when unknown)."""
    if s.kind == "embedding":
        return "diag"
    return str(settings.get("block_kinds", {}).get(s.name, "input"))


def _mini_blocks(s: LayerShape, settings: dict[str, Any]) -> tuple[int, int]:
    """MBF's ``(number, size)`` of mini-blocks of a layer: one ``k²`` block per (output,
    input channel) kernel of a conv; per output row of a Linear the fewest equal chunks of at
    most ``max_block`` weights (optimizers/mbf.py, ``linear_block="row"``)."""
    if s.kind == "conv2d":
        return s.m * s.c_in, s.k2
    max_block = _every(settings.get("max_block"), 1 << 30)
    chunks = -(-s.n // max_block)
    return s.m * chunks, -(-s.n // chunks)
