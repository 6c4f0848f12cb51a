"""Few-row fp32 products over a plain weight (row-major, no packed copy), forward and backward, through llmarch's
native AVX2 kernels (``plain.c``), and a non-temporal zero fill.

Training an expert bank (:class:`llmarch.nn.banks`) multiplies each expert's few rows by its [in, out] matrix,
then takes the input gradient through the same matrix and the weight gradient as a sum of a few outer products.
On an AVX2 EPYC torch's BLAS writes a 4 MB weight gradient of 2-8 rows at ~5 GB/s, and reads a 512 x 2048
expert's weight for 2-12 rows at a half to two thirds of the speed these kernels reach. They read the weight as
sequential streams and write the gradient with non-temporal stores (``benchmarks/train_rows.py``). On AVX-512
hosts the same entry points run register tiles of several rows past a few (an expert of a training batch at 128
tokens, top-2 of 8, sees ~32 rows), which reach 150-200 GFLOP/s on one Zen 5 core where oneDNN's products of these
shapes reach 100-140: the forward and the weight gradient as 6 x 64 tiles over a copied panel, the input gradient as
12 x 32 (or 6 x 64) tiles of W g^T over g transposed, so that W is read once. Each applies to fp32 CPU tensors whose
rows are contiguous, for the row counts in :data:`ROWS` (measured there); every function returns None where it does
not apply, and the caller runs torch's product. Values: the fp32 product, summation order aside (one fused
multiply-add per term, in order; the register tiles sum 256 terms at a time, then add the partial sums).

bf16 operands (all bf16: an expert bank trained in bf16) go to ``plain_bf16.c`` on CPUs with AVX-512 BF16
(:func:`bf16_available`), for the row counts in :data:`ROWS_BF16`. Each product is a sum in fp32 of exact products
of pairs (``VDPBF16PS``, denormals flushed, as in oneDNN's bf16 products): ``mm`` and ``mm_t`` round it to bf16
once, ``outer`` writes the bf16 weight gradient. The products a column-major bf16 bank takes (its forward is the
``mm_t`` form, its input gradient the ``mm`` form) from memory at 1-8 rows, on a Zen 5 EPYC against torch's (oneDNN's)
bf16 products: forward 1.2-1.9x, input gradient 1.4-2.5x, weight gradient 1.6-2.6x; at 12 rows 0.9-1.8x
(``benchmarks/train_rows.py --dtype bf16``). Past a few rows they too run register tiles over pairs of the shared
index (``plain_bf16.c``'s ``bmany_*``): 1.0-1.5x oneDNN at 16-64 rows.

``mm_t`` past a few rows (both dtypes) is W g^T over g's rows in vectors of 16, or, where that would leave the last
vector largely empty (past 32 rows but at multiples of 16, and fp32 at 17-24: ``tiles.c``'s ``by_panel``), ``mm``'s
tiles over W's rows transposed into their panel. :func:`bank_mm` and :func:`bank_outer` run a whole expert bank's
products (each expert's slice of a sorted batch) with one Python check: a per-expert call cost ~10 us of checks.
"""
from __future__ import annotations

import ctypes

import torch

from llmarch import native

# the fewest and most rows each product takes (benchmarks/train_rows.py, AVX2 EPYC, one thread, weights from
# memory): on an expert's 512 x 2048, x @ W 1.2-2.0x torch's BLAS at 2-12 rows, g @ W^T 1.1-1.4x at 2-8, the
# weight gradient 2.2-4.3x at 2-8; on its 1024 x 512 the two products 1.0-1.3x (memory-bound), the gradient
# 2.1-2.6x; from 12-16 rows level or behind; at one row BLAS's matrix-vector products are level or ahead there.
# On a Zen 5 EPYC (AVX-512; the kernels prefetching) one row was 1.05-1.27x (x @ W) and 1.26-1.46x (g @ W^T) the
# one-row products of BLAS and oneDNN, and an MoE layer's forward + backward 1.18-1.22x faster at 1-4 tokens with
# the kernels taking it: from one row on AVX-512 hosts (as native_fp32.MAX_ROWS, the CPU stands for the host)
_FIRST = 1 if "avx512f" in native._cpu()[1] else 2
ROWS = {"mm": (_FIRST, 12), "mm_t": (_FIRST, 8), "outer": (1, 8)}
# AVX-512 hosts: register tiles of several rows past a few (plain.c's many_* kernels) against oneDNN's products,
# Zen 5 EPYC, one thread, an expert's gate_up and down: x @ W 1.16-1.6x at 12-128 rows, 1.08-1.13x at 256;
# g @ W^T 1.04-1.4x at 12-128, 0.96-1.02x at 192-256; the weight gradient 1.2-3.7x at 12-128, 1.15-1.28x at 256.
# Since the input gradient's transposed panel (twentieth round), an MoE layer's fp32 forward + backward (top-2 of 8,
# llmarch's benchmarks/moe.py layer) ran 1.05-1.15x faster with the input and weight gradients up to 1024 rows than
# with oneDNN's past 128 / 256 (512 and 2048 tokens: ~128 and ~512 rows per expert); the forward past 256: level
if "avx512f" in native._cpu()[1]:
    ROWS = {"mm": (1, 256), "mm_t": (1, 1024), "outer": (1, 1024)}
# bf16 (benchmarks/train_rows.py --dtype bf16, Zen 5 EPYC, one thread, weights from memory): 1.2-2.6x torch's bf16
# products at 1-8 rows, 0.94-1.77x at 12, 0.76-1.33x at 16
ROWS_BF16 = {"mm": (1, 12), "mm_t": (1, 12), "outer": (1, 12)}
# with plain_bf16.c's register tiles past a few rows, against oneDNN's bf16 products of an expert's gate_up and down
# from memory: mm (the input gradient) 1.0-1.5x at 16-64 rows, 1.0-1.15x at 128; mm_t (the forward) 1.1-1.45x at
# 16-64, 0.97-1.03x at 128; outer 1.04-1.8x at 16-256. With the forward's prefetch and transposed panel (twentieth
# round) an MoE layer's bf16 forward + backward ran 1.01-1.06x faster at 192-256 tokens (48-64 rows per expert on
# average, many past 64) with the forward up to 128 rows; sending it to oneDNN past 16 rows cost 1.21x at 128 tokens
ROWS_BF16 = {"mm": (1, 128), "mm_t": (1, 128), "outer": (1, 256)}
_I64 = ctypes.c_int64
_BF16 = torch.bfloat16


def _ptr(t: torch.Tensor) -> int:
    return t.data_ptr()


def _check_products(fn_mm, fn_mm_t, fn_outer) -> bool:
    g = torch.Generator().manual_seed(0)
    x, w, d = torch.randn(5, 19, generator=g), torch.randn(19, 37, generator=g), torch.randn(5, 37, generator=g)
    want = [(x.double() @ w.double()).float(), (d.double() @ w.double().T).float(), (x.double().T @ d.double()).float()]
    got = [_mm(fn_mm, x, w, torch.empty(5, 37)), _mm_t(fn_mm_t, d, w, torch.empty(5, 19)),
           _outer(fn_outer, x, d, torch.empty(19, 37))]
    return all(torch.allclose(a, b, rtol=1e-5, atol=1e-5) for a, b in zip(got, want))


def _mm(fn, x: torch.Tensor, w: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    fn(_ptr(y), _ptr(x), _ptr(w), x.shape[0], x.shape[1], w.shape[1], w.stride(0), x.stride(0))
    return y


def _mm_t(fn, g: torch.Tensor, w: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    fn(_ptr(y), _ptr(g), _ptr(w), g.shape[0], w.shape[0], g.shape[1], w.stride(0), g.stride(0))
    return y


def _outer(fn, x: torch.Tensor, g: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    fn(_ptr(out), _ptr(x), _ptr(g), x.shape[0], x.shape[1], g.shape[1], x.stride(0), g.stride(0))
    return out


def _check_bf16(fn_mm, fn_mm_t, fn_outer) -> bool:
    """The bf16 kernels against the float64 products of the same bf16 values, rounded to bf16 (within one rounding:
    fp32 sums), over odd sizes that reach every tail and the vector loops (70 columns: 64 + 6 for the gradient)."""
    g = torch.Generator().manual_seed(0)
    x, w, d = (torch.randn(*shape, generator=g).to(_BF16) for shape in ((5, 19), (19, 70), (5, 70)))
    want = [x.double() @ w.double(), d.double() @ w.double().T, x.double().T @ d.double()]
    got = [_mm(fn_mm, x, w, torch.empty(5, 70)), _mm_t(fn_mm_t, d, w, torch.empty(5, 19)),
           _outer(fn_outer, x, d, torch.empty(19, 70, dtype=_BF16))]
    return all(torch.allclose(a.double(), b, rtol=2 ** -7, atol=1e-6) for a, b in zip(got, want))


_ARGS = [ctypes.c_void_p] * 3 + [_I64] * 5
_KERNELS = {name: native.Kernel("plain", f"llmarch_plain_{name}", _ARGS, lambda fn: True)
            for name in ("mm", "mm_t", "outer")}
# and mm_round / mm_t_round: the same two products with their sums rounded to bf16 in the call (arguments: the
# bf16 output, then mm's / mm_t's, whose fp32 output is the scratch for the sums)
_KERNELS_BF16 = {name: native.Kernel("plain_bf16", f"llmarch_plain_bf16_{name}",
                                     [ctypes.c_void_p] * name.endswith("_round") + _ARGS, lambda fn: True)
                 for name in ("mm", "mm_t", "outer", "mm_round", "mm_t_round")}
_ZERO = native.Kernel("plain", "llmarch_plain_zero", [ctypes.c_void_p, _I64], lambda fn: True)
_checked: list[bool] = []
_checked_bf16: list[bool] = []


def _fn(name: str):
    return _KERNELS[name].fn()


def available() -> bool:
    """Whether the kernels built here and passed their check against a float64 product (once per process)."""
    if not _checked:
        fns = [_fn(name) for name in ("mm", "mm_t", "outer")]
        _checked.append(all(f is not None for f in fns) and _ZERO.fn() is not None and _check_products(*fns))
    return _checked[0]


def bf16_available() -> bool:
    """Whether the bf16 kernels built here (a CPU with AVX-512 BF16) and passed their check (once per process)."""
    if not _checked_bf16:
        fns = [_KERNELS_BF16[name].fn() for name in ("mm", "mm_t", "outer")]
        _checked_bf16.append(all(f is not None for f in fns) and _check_bf16(*fns))
    return _checked_bf16[0]


def reset() -> None:
    """Forget the kernels and their check (tests flip ``LLMARCH_NATIVE`` or the cache directory)."""
    for kernel in (*_KERNELS.values(), *_KERNELS_BF16.values(), _ZERO):
        kernel.reset()
    _checked.clear()
    _checked_bf16.clear()


def _takes(kernel: str, rows: int, dtype: torch.dtype) -> bool:
    lo, hi = (ROWS_BF16 if dtype == _BF16 else ROWS)[kernel]
    return lo <= rows <= hi


def _kernel(name: str, dtype: torch.dtype):
    """The kernel for this dtype, or None where it is not available here."""
    if dtype == _BF16:
        return _KERNELS_BF16[name].fn() if bf16_available() else None
    return _fn(name) if available() else None


def _traced() -> bool:
    """Under compilation, or under a Python dispatch mode (``torch.utils.flop_counter.FlopCounterMode``, fake or meta
    tensors): a ctypes call is invisible there, so torch's products run."""
    return torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0


def _rows_ok(*ts: torch.Tensor) -> bool:
    """2-D CPU tensors, all fp32 or all bf16, with contiguous rows."""
    dtype = ts[0].dtype
    return dtype in (torch.float32, _BF16) and all(
        t.dim() == 2 and t.dtype == dtype and t.device.type == "cpu" and t.stride(1) == 1
        and t.stride(0) >= t.shape[1] for t in ts) and not _traced()


def _out_ok(out: torch.Tensor | None, rows: int, cols: int, dtype: torch.dtype) -> bool:
    return out is None or (out.shape == (rows, cols) and out.is_contiguous() and out.dtype == dtype)


def _result(y: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """A bf16 product's fp32 sums rounded to bf16 (into ``out`` if given)."""
    return y.to(_BF16) if out is None else out.copy_(y)


def mm(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor | None:
    """x [R, K] @ w [K, N] -> [R, N] (into ``out`` if given), or None where the kernel does not apply."""
    R, N, dtype = x.shape[0], w.shape[-1], x.dtype
    if (not _rows_ok(x, w) or not _takes("mm", R, dtype) or w.shape[0] != x.shape[1] or not x.shape[1]
            or not _out_ok(out, R, N, dtype) or (fn := _kernel("mm", dtype)) is None):
        return None
    if dtype == _BF16:
        return _result(_mm(fn, x, w, torch.empty(R, N)), out)
    return _mm(fn, x, w, torch.empty(R, N) if out is None else out)


def mm_t(g: torch.Tensor, w: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor | None:
    """g [R, O] @ w [I, O]^T -> [R, I] (into ``out`` if given), or None where the kernel does not apply."""
    R, I, dtype = g.shape[0], w.shape[0], g.dtype
    if (not _rows_ok(g, w) or not _takes("mm_t", R, dtype) or w.shape[1] != g.shape[1] or not g.shape[1]
            or not _out_ok(out, R, I, dtype) or (fn := _kernel("mm_t", dtype)) is None):
        return None
    if dtype == _BF16:
        return _result(_mm_t(fn, g, w, torch.empty(R, I)), out)
    return _mm_t(fn, g, w, torch.empty(R, I) if out is None else out)


def outer(x: torch.Tensor, g: torch.Tensor, out: torch.Tensor) -> torch.Tensor | None:
    """x [n, I]^T @ g [n, O] written into ``out`` [I, O] (contiguous, of x's dtype), or None where the kernel does
    not apply."""
    dtype = x.dtype
    if (not _rows_ok(x, g) or not _takes("outer", x.shape[0], dtype) or g.shape[0] != x.shape[0]
            or not _out_ok(out, x.shape[1], g.shape[1], dtype) or (fn := _kernel("outer", dtype)) is None):
        return None
    return _outer(fn, x, g, out)


def _bank_ok(a: torch.Tensor, bank: torch.Tensor) -> bool:
    """``a`` 2-D rows and ``bank`` [E, ., .] of one kernel dtype on the CPU, a's rows contiguous."""
    return (a.dim() == 2 and bank.dim() == 3 and a.dtype in (torch.float32, _BF16) and bank.dtype == a.dtype
            and a.device.type == "cpu" and bank.device.type == "cpu" and a.stride(1) == 1
            and a.stride(0) >= a.shape[1] and not _traced())


def bank_mm(a: torch.Tensor, mats: torch.Tensor, counts: list[int], out: torch.Tensor) -> list[bool] | None:
    """For each expert e, its ``counts[e]`` rows of ``a`` [A, k] (sorted by expert) times ``mats[e]`` [k, n], into
    the same rows of ``out`` [A, n] (contiguous; fp32: the kernels' sums, or, for bf16 operands, bf16: the sums
    rounded expert by expert in the kernels' call, while in cache), one Python check for the whole bank. ``mats``
    is a bank or a bank transposed: ``mm`` over matrices whose rows are contiguous, ``mm_t`` over those whose
    columns are (a column-major bank). Returns which experts the kernels took (by :data:`ROWS` /
    :data:`ROWS_BF16`; the caller computes the others), or None where they do not apply."""
    rounded = out.dtype == _BF16
    if (not _bank_ok(a, mats) or mats.shape[1] != a.shape[1] or not a.shape[1]
            or out.dtype not in (torch.float32, a.dtype)):
        return None
    E, k, n = mats.shape
    if out.shape != (a.shape[0], n) or not out.is_contiguous() or len(counts) != E:
        return None
    if mats.stride(2) == 1 and mats.stride(1) >= n:  # rows of each matrix contiguous
        name, ws = "mm", mats.stride(1)
    elif mats.stride(1) == 1 and mats.stride(2) >= k:  # columns contiguous: mm_t over each matrix transposed
        name, ws = "mm_t", mats.stride(2)
    else:
        return None
    if (fn := _kernel(name + "_round" if rounded else name, a.dtype)) is None:
        return None
    done = [R > 0 and _takes(name, R, a.dtype) for R in counts]
    scratch = torch.empty(max((R for R, d in zip(counts, done) if d), default=0), n) if rounded else None
    size, row0, sums = a.element_size(), 0, [_ptr(scratch)] if rounded else []
    pa, pw, py, sa, se = _ptr(a), _ptr(mats), _ptr(out), a.stride(0), mats.stride(0)
    for e, R in enumerate(counts):
        if done[e]:  # mm: (y, x, w, R, K, N, ws, xs), mm_t: (y, g, w, R, I, O, ws, gs); rounded: (out, y, ...)
            fn(py + row0 * n * out.element_size(), *sums, pa + row0 * sa * size, pw + e * se * size, R,
               *((k, n) if name == "mm" else (n, k)), ws, sa)
        row0 += R
    return done


def bank_outer(x: torch.Tensor, g: torch.Tensor, counts: list[int], grad: torch.Tensor) -> list[bool] | None:
    """For each expert e, x_e^T g_e of its ``counts[e]`` rows of ``x`` [A, I] and ``g`` [A, O] written into
    ``grad[e]`` [I, O] (x's dtype; each expert's matrix contiguous in either layout, a bank's gradient), one Python
    check for the whole bank. Returns which experts the kernel took (the caller writes the others), or None where
    it does not apply."""
    if not _bank_ok(x, grad) or not _bank_ok(g, grad) or grad.shape[1:] != (x.shape[1], g.shape[1]):
        return None
    E, I, O = grad.shape
    if x.shape[0] != g.shape[0] or len(counts) != E or (fn := _kernel("outer", x.dtype)) is None:
        return None
    if grad.stride(2) == 1 and grad.stride(1) == O:  # out [I, O] = x^T g
        first, second, cols = x, g, (I, O)
    elif grad.stride(1) == 1 and grad.stride(2) == I:  # a column-major bank's: out^T [O, I] = g^T x
        first, second, cols = g, x, (O, I)
    else:
        return None
    size, row0, done = x.element_size(), 0, []
    p1, p2, po, s1, s2, se = _ptr(first), _ptr(second), _ptr(grad), first.stride(0), second.stride(0), grad.stride(0)
    for e, n in enumerate(counts):
        done.append(n > 0 and _takes("outer", n, x.dtype))
        if done[-1]:  # (out, x, g, n, I, O, xs, gs)
            fn(po + e * se * size, p1 + row0 * s1 * size, p2 + row0 * s2 * size, n, *cols, s1, s2)
        row0 += n
    return done


def zero(t: torch.Tensor) -> bool:
    """Zero a CPU tensor in place with non-temporal stores: contiguous, or so once its last two dimensions are swapped
    (a column-major expert bank's gradient); False (nothing done) where the kernel is not
    available or the tensor does not qualify (call ``t.zero_()``). For a new buffer (a gradient being made): the
    write bypasses autograd's version counter."""
    dense = t.is_contiguous() or (t.dim() >= 2 and t.transpose(-1, -2).is_contiguous())  # one block of memory
    if t.device.type != "cpu" or not dense or _traced() or not available():
        return False
    _ZERO.fn()(_ptr(t), t.numel() * t.element_size())
    return True
