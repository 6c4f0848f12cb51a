"""fp32 products for few rows (decoding) through llmarch's native AVX-512 / AVX2 kernel (``gemv.c``).

``llmarch.nn.dense.pack`` keeps a :class:`Blocked` copy of an fp32 weight here, [ceil(N/16), K, 16], instead of
oneDNN's packed copy when the kernel builds: :func:`llmarch.nn.dense.linear` sends inference products of up to
:data:`MAX_ROWS` rows to it, and more rows (a prefill) to oneDNN or BLAS over the plain weight. Measured at one
thread:
- on an AVX-512 EPYC (``benchmarks/decode.py --kernels``): the blocked copy streamed as fast as oneDNN's packed
  copy at one row (1.0-1.25x on the small LLaMA-style matrices) and 1.1-1.35x faster at eight; equal at 32 rows;
  oneDNN over the plain weight 5-15 % behind its packed copy at 64-128 rows. There ``MAX_ROWS`` is 32.
- on an AVX2 EPYC (6-row tiles): 1.05-2.06x torch's BLAS over the plain weight at every row count from 16 to 128
  on the LLaMA-style matrices (each call reading its own weight from a 96 MB pool; 1.26-1.34x at 128 rows on
  2752 x 512 and 8192 x 512, 1.05-1.14x on the narrow ones). There ``MAX_ROWS`` is 128.
Values: the fp32 product, summation order aside.
"""
from __future__ import annotations

import ctypes

import torch

from llmarch import native

MAX_ROWS = 32 if "avx512f" in native._cpu()[1] else 128  # see the module


def _check(fn) -> bool:
    g = torch.Generator().manual_seed(0)
    w, b, x = torch.randn(37, 21, generator=g), torch.randn(37, generator=g), torch.randn(3, 21, generator=g)
    want = (x.double() @ w.double().T + b.double()).float()
    return torch.allclose(_call(fn, x, Blocked(w), b), want, rtol=1e-5, atol=1e-5)


_KERNEL = native.Kernel("gemv", "llmarch_f32_gemv", [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 3, _check)
available, reset = _KERNEL.available, _KERNEL.reset  # reset: tests flip ``LLMARCH_NATIVE``


class Blocked:
    """An fp32 weight [N, K] copied to the kernel's layout [ceil(N/16), K, 16] (zero-padded)."""

    def __init__(self, weight: torch.Tensor):
        self.data, self.out_features = native.block_rows(weight), weight.shape[0]


def _call(fn, x: torch.Tensor, w: Blocked, bias: torch.Tensor | None) -> torch.Tensor:
    x, b = x.contiguous(), None if bias is None else bias.contiguous()  # held while the kernel reads them
    y = torch.empty(x.shape[0], w.out_features)
    fn(x.data_ptr(), w.data.data_ptr(), None, None if b is None else b.data_ptr(), y.data_ptr(), x.shape[0],
       w.out_features, x.shape[1])
    return y


def mm(x: torch.Tensor, w: Blocked, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] fp32 (CPU) @ the blocked weight (+ bias [N] fp32) -> [M, N]. Needs :func:`available`."""
    return _call(_KERNEL.fn(), x, w, bias)
