"""int8 weights times int8 activations (dynamic W8A8): integer dot products in llmarch's native kernel
(``w8a8.c``), or the same arithmetic in torch.

What ``quantize(model, "int8", activations="int8")`` runs (:class:`~llmarch.infer.quantize.Int8Linear`). The
weight is the int8 layer's own (per output channel, symmetric); the activations are quantized at each product, per
row and block of :data:`KB` inputs (absmax, symmetric, ties to even): ``sx = amax / 127``, ``qx = rint(x · 127 /
amax)``. A block's dot product is exact in integers, so the product is ``Σ_b sx[m, b] · (qx[m, b] · qw[n, b]) ·
scale[n] + bias[n]``, up to the fp32 summation of the blocks' terms. The fp32-activation int8 path
(:mod:`llmarch.native.int8`) multiplies the same weights in fp32: it is the more accurate one; this one rounds each
activation to within ``amax / 254`` of its block, and on CPUs with AVX-512 VNNI / AVX-VNNI runs four multiply-adds
per 32-bit lane and instruction (VPDPBUSD) where that path runs one per fp32 lane, so it is not bound by arithmetic
at 8 rows (``benchmarks/decode.py``; figures in docs/performance.md). Without VNNI (VPMADDUBSW / VPMADDWD) it was
only level with that path from 4 rows.

:func:`quantize_rows` and :func:`reference_mm` are the torch form (any device; the kernel's fallback and the tests'
reference); :func:`mm` the kernel (:func:`available`: it builds and passes its self-check). The kernel's weight,
:func:`block`, holds each weight offset by 128 as an unsigned byte, four inputs of 16 outputs per 64-byte line; it
is derived on first use and kept while the weight and scales stay the same tensors (:func:`blocked`).
"""
from __future__ import annotations

import ctypes

import torch

from llmarch import native
from llmarch.native import int8 as native_int8

KB = 32  # inputs per activation scale
_blocked: dict = {}


def padded(k: int) -> int:
    return -(-k // KB) * KB


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] (any float) -> (qx [M, Kp] int8, sx [M, Kp / KB] fp32), K zero-padded to a multiple of KB. A block of
    zeros gets sx 0; a block with a NaN or an infinity gets sx NaN (and qx 0), so the outputs it reaches are NaN."""
    x = x.float()
    M, K = x.shape
    xb = torch.nn.functional.pad(x, (0, padded(K) - K)).view(M, -1, KB)
    amax = xb.abs().amax(-1)
    finite = torch.isfinite(xb).all(-1)
    usable = finite & (amax > 0)
    inv = 127.0 / torch.where(usable, amax, torch.ones_like(amax))
    q = (xb * inv[..., None]).round().clamp(-127, 127)
    q = torch.where(usable[..., None], q, torch.zeros_like(q)).to(torch.int8).view(M, -1)
    s = torch.where(finite, amax / 127.0, torch.full_like(amax, float("nan")))
    return q, s


def reference_mm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                 bias: torch.Tensor | None = None) -> torch.Tensor:
    """The W8A8 product in torch ops, on x's device: x [M, K] @ (qweight [N, K] int8 * scales [N])ᵀ (+ bias) ->
    [M, N] fp32. The blocks' integer products run as fp32 matmuls, exact (each sum is below 2^24), a few blocks at a
    time."""
    q, s = quantize_rows(x)
    M, N, nk = x.shape[0], qweight.shape[0], s.shape[1]
    qw = torch.nn.functional.pad(qweight, (0, q.shape[1] - qweight.shape[1])).float().view(N, nk, KB).transpose(0, 1)
    qx = q.float().view(M, nk, KB).transpose(0, 1)  # [nk, M, KB]
    y = x.new_zeros(M, N, dtype=torch.float32)
    step = max(1, (1 << 22) // max(1, M * N))
    for b in range(0, nk, step):
        part = torch.bmm(qx[b:b + step], qw[b:b + step].transpose(1, 2))  # [c, M, N], integers
        y += (part * s.T[b:b + step, :, None]).sum(0)
    y = y * scales.float()
    return y if bias is None else y + bias.float()


def block(qweight: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """qweight [N, K] int8, scales [N] -> the kernel's weight [ceil(N/16), Kp/4, 16, 4] uint8 (qweight + 128; padding
    holds 128, a zero weight) and scales padded to the blocks. The weights must lie in [-127, 127], as
    :class:`~llmarch.infer.quantize.Int8Linear` makes them (the kernel's sign flip without VNNI cannot hold -128)."""
    if (qweight == -128).any():
        raise ValueError("w8a8: an int8 weight holds -128; int8 weights with int8 activations must lie in [-127, 127] "
                         "(requantize with llmarch.infer.quantize.Int8Linear.from_weight)")
    N, K = qweight.shape
    w = torch.nn.functional.pad(qweight.detach().to(torch.int16) + 128, (0, padded(K) - K, 0, -N % native.BLOCK),
                                value=128)
    w = w.to(torch.uint8).view(-1, native.BLOCK, padded(K) // 4, 4).transpose(1, 2).contiguous()
    return w, native_int8.block(qweight, scales)[1]


def blocked(qweight: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`block` of these tensors, derived once while they stay the same tensors at the same versions."""
    return native_int8.cached(_blocked, qweight, scales, block)


def _check(fn) -> bool:
    g = torch.Generator().manual_seed(0)
    qw = torch.randint(-127, 128, (37, 70), dtype=torch.int8, generator=g)
    s, b, x = torch.rand(37, generator=g), torch.randn(37, generator=g), torch.randn(3, 70, generator=g)
    y = _call(fn, x, *block(qw, s), 37, b)
    return y is not None and torch.allclose(y, reference_mm(x, qw, s, b), rtol=1e-5, atol=1e-5)


_KERNEL = native.Kernel("w8a8", "llmarch_w8a8_gemm", [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 3, _check,
                        ctypes.c_int)
_QUANTIZE = native.Kernel("w8a8", "llmarch_w8a8_quantize", [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 2,
                          lambda fn: True)
available = _KERNEL.available


def reset() -> None:
    _KERNEL.reset()
    _QUANTIZE.reset()


def _call(fn, x: torch.Tensor, w: torch.Tensor, s: torch.Tensor, n: int,
          bias: torch.Tensor | None = None) -> torch.Tensor | None:
    x, b = x.float().contiguous(), None if bias is None else bias.float().contiguous()  # held during the call
    y = torch.empty(x.shape[0], n)
    rc = fn(x.data_ptr(), w.data_ptr(), s.data_ptr(), None if b is None else b.data_ptr(), y.data_ptr(), x.shape[0],
            n, x.shape[1])
    return None if rc else y


def mm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
       bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] (any float, CPU) @ (qweight [N, K] * scales [N])ᵀ (+ bias [N]) -> [M, N] fp32, the activations
    quantized per row and block of KB. Needs :func:`available`."""
    y = _call(_KERNEL.fn(), x, *blocked(qweight, scales), qweight.shape[0], bias)
    if y is None:
        raise MemoryError(f"w8a8: could not allocate the quantized activations of a {tuple(x.shape)} input")
    return y


def quantize_native(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The kernel's own quantization of x [M, K] fp32: (qx [M, Kp] int8, sx [M, Kp / KB], -128 · each block's sum
    of qx [M, Kp / KB] int32). Needs :func:`available`; for tests."""
    x = x.float().contiguous()
    M, K = x.shape
    q = torch.empty(M, padded(K), dtype=torch.int8)
    s = torch.empty(M, padded(K) // KB)
    c = torch.empty(M, padded(K) // KB, dtype=torch.int32)
    _QUANTIZE.fn()(x.data_ptr(), q.data_ptr(), s.data_ptr(), c.data_ptr(), M, K)
    return q, s, c
