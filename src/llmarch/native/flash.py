"""Attention of many queries at once on the CPU without the [T, S] scores (``flash.c``, AVX-512): the forward of a
prefill, or of an encoder without padding, where no gradient is needed. torch's CPU flash kernel runs such a
forward at ~43 GFLOP/s on a Zen 5 core (fp32 or bf16, causal, 8 heads of 64); this one keeps each block of 48
queries' scores, weights and outputs in L1 and runs both products as register tiles (docs/performance.md,
twenty-first round). fp32 only, causal (a query sees the keys up to its place at the end of the keys) or over all
keys, grouped-query heads; values: the fp32 attention up to summation order and a 2-ulp exp.

:func:`forward` returns None where it does not apply (the caller runs torch's kernel).
"""
from __future__ import annotations

import ctypes

import torch

from llmarch import native

# the fewest queries per sequence that take the kernel: a decode step's single query has its own path
# (llmarch.nn.kernels._single_query); a few queries are cheap either way
MIN_QUERIES = 16
_I64 = ctypes.c_int64
_ARGS = [ctypes.c_void_p] * 4 + [_I64] * 7 + [ctypes.c_void_p] * 3 + [ctypes.c_float, _I64]


def _call(fn, q, k, v, scale: float, causal: bool) -> torch.Tensor | None:
    B, H, T, Dh = q.shape
    G, S, Dv = k.shape[1], k.shape[2], v.shape[-1]
    out = torch.empty(B, H, T, Dv)
    strides = [(_I64 * 3)(*t.stride()[:3]) for t in (q, k, v)]
    rc = fn(out.data_ptr(), q.data_ptr(), k.data_ptr(), v.data_ptr(), B, H, G, T, S, Dh, Dv, *strides, scale,
            int(causal))
    return None if rc else out


def _check(fn) -> bool:
    """Against float64 attention: causal after a cache (T < S), grouped heads, odd sizes past one block of each."""
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(2, 4, 53, 19, generator=g), torch.randn(2, 2, 70, 19, generator=g), \
        torch.randn(2, 2, 70, 67, generator=g)
    kd, vd = k.double().repeat_interleave(2, 1), v.double().repeat_interleave(2, 1)
    s = q.double() @ kd.transpose(-1, -2) * 0.3
    s = s.masked_fill(~torch.ones(53, 70, dtype=torch.bool).tril(70 - 53), float("-inf"))
    want = s.softmax(-1) @ vd
    got = _call(fn, q, k, v, 0.3, True)
    return got is not None and torch.allclose(got.double(), want, rtol=1e-5, atol=1e-5)


_KERNEL = native.Kernel("flash", "llmarch_flash_fwd", _ARGS, _check, ctypes.c_int)


def available() -> bool:
    """Whether the kernel built here (AVX-512) and passed its check against float64 (once per process)."""
    return _KERNEL.available()


def reset() -> None:  # tests flip ``LLMARCH_NATIVE``
    _KERNEL.reset()


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool) -> torch.Tensor | None:
    """softmax(q k^T * scale) v for q [B, H, T, Dh], k [B, G, S, Dh], v [B, G, S, Dv] (G dividing H), causal (T <= S:
    query t sees keys up to t + S - T) or over all keys -> [B, H, T, Dv]; or None where the kernel does not apply:
    fp32 CPU tensors whose last dimension is contiguous, at least :data:`MIN_QUERIES` queries, no gradient wanted,
    outside compilation and dispatch modes."""
    if not (q.dim() == k.dim() == v.dim() == 4 and all(t.dtype == torch.float32 and t.device.type == "cpu"
                                                       and t.stride(-1) == 1 for t in (q, k, v))):
        return None
    (B, H, T, Dh), (Bk, G, S, Dk), (Bv, Gv, Sv, Dv) = q.shape, k.shape, v.shape
    if (T < MIN_QUERIES or (Bk, Dk) != (B, Dh) or (Bv, Gv, Sv) != (B, G, S) or not G or H % G or not S or not Dv
            or not Dh or (causal and T > S)):
        return None
    if (torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))) or torch.compiler.is_compiling() \
            or torch._C._len_torch_dispatch_stack() > 0 or not available():
        return None
    return _call(_KERNEL.fn(), q, k, v, scale, causal)
