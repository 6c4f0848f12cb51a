"""bf16-weight products for few rows (decoding) through llmarch's native AVX-512 / AVX2 kernel (``gemv.c``).

For CPUs without bf16 products (``llmarch.nn.dense.ONEDNN_BF16`` false), where torch's generic bf16 kernel
streams a weight at a few GB/s: ``llmarch.nn.dense.pack`` keeps a bf16 weight's copy in the kernel's blocked
layout (:class:`llmarch.native.fp32.Blocked`, bf16 elements: half the bytes of the fp32 copy), and products of up
to :data:`MAX_ROWS` rows run here. Each weight is widened to fp32 (exact) and multiplied by the activations in
fp32 (bf16 activations widen exactly too), and the result is rounded to bf16 once: torch's bf16 product up to
summation order.
"""
from __future__ import annotations

import ctypes

import torch

from llmarch import native
from llmarch.native.fp32 import Blocked

MAX_ROWS = 32  # more rows are widened to fp32 (llmarch.nn.widened): the tenth round's cut, not re-measured since

__all__ = ["MAX_ROWS", "available", "mm", "reset"]


def _check(fn) -> bool:
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(37, 21, generator=g).bfloat16(), torch.randn(37, generator=g).bfloat16()
    x = torch.randn(3, 21, generator=g).bfloat16()
    want = (x.double() @ w.double().T + b.double()).float()
    return torch.allclose(_call(fn, x, Blocked(w), b), want, rtol=1e-5, atol=1e-5)


_KERNEL = native.Kernel("gemv", "llmarch_bf16_gemv", [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 3, _check)
available, reset = _KERNEL.available, _KERNEL.reset  # reset: tests flip ``LLMARCH_NATIVE``


def _call(fn, x: torch.Tensor, w: Blocked, bias: torch.Tensor | None) -> torch.Tensor:
    x, b = x.float().contiguous(), None if bias is None else bias.float().contiguous()  # held during the call
    y = torch.empty(x.shape[0], w.out_features)
    fn(x.data_ptr(), w.data.data_ptr(), None, None if b is None else b.data_ptr(), y.data_ptr(), x.shape[0],
       w.out_features, x.shape[1])
    return y


def mm(x: torch.Tensor, w: Blocked, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] (bf16 or fp32, CPU) @ the blocked bf16 weight (+ bias [N], added in fp32) -> [M, N] bf16, rounded
    once. Needs :func:`available`."""
    return _call(_KERNEL.fn(), x, w, bias).to(torch.bfloat16)
