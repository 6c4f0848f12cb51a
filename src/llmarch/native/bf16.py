"""bf16-weight products for few rows (decoding) through llmarch's native AVX-512 / AVX2 kernel (``gemv.c``).

For CPUs without bf16 products (``llmarch.nn.dense.ONEDNN_BF16`` false), where torch's generic bf16 kernel
streams a weight at a few GB/s: ``llmarch.nn.dense.pack`` keeps a bf16 weight's copy in the kernel's blocked
layout (:class:`llmarch.native.fp32.Blocked`, bf16 elements: half the bytes of the fp32 copy), and products of up
to :data:`MAX_ROWS` rows run here. Each weight is widened to fp32 (exact) and multiplied by the activations in
fp32 (bf16 activations widen exactly too), and the result is rounded to bf16 once: torch's bf16 product up to
summation order. On CPUs with AVX-512 BF16, bf16 activations multiply the bf16 weights on VDPBF16PS instead (exact
products, fp32 sums; the same values up to summation order), as the native bf16 decode layers do there.
"""
from __future__ import annotations

import ctypes

import torch

from llmarch import native
from llmarch.native.fp32 import Blocked

MAX_ROWS = 32  # more rows are widened to fp32 (llmarch.nn.widened): the tenth round's cut, not re-measured since

__all__ = ["MAX_ROWS", "available", "dp_available", "mm", "reset"]


def _checked(call):
    """A self-check of a kernel called through ``call`` (:func:`_call` or :func:`_call_dp`) against float64."""
    def check(fn) -> bool:
        g = torch.Generator().manual_seed(0)
        w, b = torch.randn(37, 21, generator=g).bfloat16(), torch.randn(37, generator=g).bfloat16()
        x = torch.randn(3, 21, generator=g).bfloat16()
        want = (x.double() @ w.double().T + b.double()).float()
        y = call(fn, x, Blocked(w), b)
        return y is not None and torch.allclose(y, want, rtol=1e-5, atol=1e-5)
    return check


def _call(fn, x: torch.Tensor, w: Blocked, bias: torch.Tensor | None, dp: bool = False) -> torch.Tensor | None:
    """The widening kernel (``fn(x, w, scale, bias, y, M, N, K)``), or with ``dp`` the VDPBF16PS one (no scale;
    None when it could not allocate its packed activations)."""
    x, b = x.float().contiguous(), None if bias is None else bias.float().contiguous()  # held during the call
    y = torch.empty(x.shape[0], w.out_features)
    ptrs = [x.data_ptr(), w.data.data_ptr()] + ([] if dp else [None]) + [None if b is None else b.data_ptr()]
    rc = fn(*ptrs, y.data_ptr(), x.shape[0], w.out_features, x.shape[1])
    return None if dp and rc else y


def _call_dp(fn, x: torch.Tensor, w: Blocked, bias: torch.Tensor | None) -> torch.Tensor | None:
    return _call(fn, x, w, bias, dp=True)


_KERNEL = native.Kernel("gemv", "llmarch_bf16_gemv", [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 3, _checked(_call))
available = _KERNEL.available
# bf16 activations times bf16 weights on VDPBF16PS (CPUs with AVX-512 BF16; elsewhere not built): 1.1-1.6x the
# widening kernel at 4-32 rows on a Zen 5 EPYC, level at 1-2 (docs/performance.md, seventeenth round)
_DP = native.Kernel("gemv", "llmarch_bf16_gemv_dp", [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 3,
                    _checked(_call_dp), ctypes.c_int)


def reset() -> None:  # tests flip ``LLMARCH_NATIVE``
    _KERNEL.reset()
    _DP.reset()


def dp_available() -> bool:
    return _DP.available()


def mm(x: torch.Tensor, w: Blocked, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] (bf16 or fp32, CPU) @ the blocked bf16 weight (+ bias [N], added in fp32) -> [M, N] bf16, rounded
    once: bf16 x on VDPBF16PS where :func:`dp_available`, else (and fp32 x) widened. Needs :func:`available`."""
    if x.dtype == torch.bfloat16 and _DP.available() and (y := _call_dp(_DP.fn(), x, w, bias)) is not None:
        return y.to(torch.bfloat16)
    return _call(_KERNEL.fn(), x, w, bias).to(torch.bfloat16)
