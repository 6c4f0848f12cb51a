"""int8-weight products for few rows (decoding) through llmarch's native AVX-512 / AVX2 kernel (``gemv.c``).

The kernel reads the weight in a blocked layout, [ceil(N/16), K, 16]: each block of 16 outputs is one
contiguous run that the prefetcher streams, where torch's ``_weight_int8pack_mm`` reads 16 short rows at once
(1.5-1.9x faster at one row, 1.2-1.8x at eight; ``benchmarks/decode.py --int8-kernels``). It widens each weight
to fp32 and multiplies the fp32 activations, so the result is the dequantized fp32 product up to summation order
(torch's kernel rounds the activations to bf16 first).

The blocked copy is derived from ``qweight`` / ``scales`` on first use and kept while both stay the same tensors
(same storage and version), so ``load_state_dict`` or an in-place edit re-derives it; it costs the int8 weight's
bytes once more. :func:`available` is False where :mod:`llmarch.native` cannot build the kernel; callers then use
torch's kernel.
"""
from __future__ import annotations

import ctypes
import weakref

import torch

from llmarch import native

_blocked: dict[int, tuple[tuple, tuple[torch.Tensor, torch.Tensor]]] = {}


def _check(fn) -> bool:
    g = torch.Generator().manual_seed(0)
    q = torch.randint(-127, 128, (37, 21), dtype=torch.int8, generator=g)
    s, x = torch.rand(37, generator=g), torch.randn(3, 21, generator=g)
    want = (x.double() @ q.double().T * s.double()).float()
    return torch.allclose(_call(fn, x, *block(q, s), 37), want, rtol=1e-5, atol=1e-5)


_KERNEL = native.Kernel("gemv", "llmarch_int8_gemv", [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 3, _check)
available, reset = _KERNEL.available, _KERNEL.reset  # reset: tests flip ``LLMARCH_NATIVE``


def block(qweight: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """qweight [N, K] int8, scales [N] -> the kernel's weight [ceil(N/16), K, 16] and scales [ceil(N/16) * 16]
    (zero-padded)."""
    return native.block_rows(qweight), torch.nn.functional.pad(scales.float(), (0, -len(scales) % native.BLOCK))


def cached(store: dict, qweight: torch.Tensor, scales: torch.Tensor, make):
    """``make(qweight, scales)``, kept in ``store`` and derived again only when either tensor is no longer the same
    tensor at the same version."""
    key = (qweight.data_ptr(), native.version(qweight), scales.data_ptr(), native.version(scales))
    entry = store.get(id(qweight))
    if entry is None or entry[0] != key:
        if entry is None:  # the entry goes when the weight does, before its id can be reused
            weakref.finalize(qweight, store.pop, id(qweight), None)
        entry = store[id(qweight)] = (key, make(qweight, scales))
    return entry[1]


def blocked(qweight: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`block` of these tensors, derived once while they stay the same tensors at the same versions."""
    return cached(_blocked, qweight, scales, block)


def _call(fn, x: torch.Tensor, w: torch.Tensor, s: torch.Tensor, n: int,
          bias: torch.Tensor | None = None) -> torch.Tensor:
    x, b = x.float().contiguous(), None if bias is None else bias.float().contiguous()  # held during the call
    y = torch.empty(x.shape[0], n)
    fn(x.data_ptr(), w.data_ptr(), s.data_ptr(), None if b is None else b.data_ptr(), y.data_ptr(), x.shape[0], n,
       x.shape[1])
    return y


def mm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
       bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] (any float, CPU) @ (qweight [N, K] * scales [N])ᵀ (+ bias [N], added in fp32) -> [M, N] fp32.
    Needs :func:`available`."""
    return _call(_KERNEL.fn(), x, *blocked(qweight, scales), qweight.shape[0], bias)
