"""Decode-sized row operations through llmarch's native kernels (``rows.c``): RMSNorm and the half-split
rotary embedding, each one call where torch runs 5-10 small ops.

At one token these ops cost more in per-op dispatch than in arithmetic: on an AVX2 EPYC host, ``torch.rms_norm``
of one 512-wide row took ~35 us and the rotation of 8 heads ~65 us, ~1 ms of a 12 ms LLaMA-style decode step in
all (``benchmarks/decode_overhead.py``); in bf16 (torch's bf16 forms, each operation rounded as torch rounds
it) 51 and 54 us against 17 and 22 in fp32. :func:`applies` says when a call qualifies: plain fp32 or bf16 CPU
tensors of one dtype, no gradient needed, eager, and for the rotation at most :data:`MAX_ELEMENTS` elements (a
decode step or a short prefill; larger inputs keep torch's multi-threaded kernel). Values: the rotation gives the
same bits as :func:`llmarch.nn.rope._half_rotation` (tests), so its size limit changes nothing; RMSNorm is within
an ulp of torch's (the mean is summed in double), so it takes every gradient-free CPU call, whatever its size: a row's
result then never depends on what else is in the batch (a padded or a longer batch gives the same bits).
"""
from __future__ import annotations

import ctypes

import torch

from llmarch import native

MAX_ELEMENTS = 1 << 16
_PLAIN = (torch.Tensor, torch.nn.Parameter)


def _check_norm(fn, dtype=torch.float32) -> bool:
    from llmarch.nn.norm import rounded_rms_norm

    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(3, 37, generator=g).to(dtype), torch.randn(37, generator=g).to(dtype)
    if dtype == torch.bfloat16:  # within a bf16 ulp of the torch form (the mean is summed in double here)
        return torch.allclose(_norm(fn, x, w, 1e-6).float(), rounded_rms_norm(x, w, 1e-6).float(), rtol=2 ** -7,
                              atol=0)
    want = (x.double() * torch.rsqrt(x.double().pow(2).mean(-1, keepdim=True) + 1e-6) * w.double()).float()
    return torch.allclose(_norm(fn, x, w, 1e-6), want, rtol=1e-5, atol=1e-6)


def _check_rotation(fn, dtype=torch.float32) -> bool:
    from llmarch.nn.rope import _half_rotation

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 5, 8, generator=g).to(dtype)
    c, s = torch.randn(2, 1, 5, 8, generator=g).to(dtype), torch.randn(2, 1, 5, 8, generator=g).to(dtype)
    return torch.equal(_rotation(fn, x, c, s), _half_rotation(x, c, s))


_NORM_ARGS = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 2 + [ctypes.c_float]
_ROTATION_ARGS = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 9
_NORM = native.Kernel("rows", "llmarch_rms_norm", _NORM_ARGS, _check_norm)
_ROTATION = native.Kernel("rows", "llmarch_rotate_half", _ROTATION_ARGS, _check_rotation)
_NORM16 = native.Kernel("rows", "llmarch_rms_norm_bf16", _NORM_ARGS, lambda fn: _check_norm(fn, torch.bfloat16))
_ROTATION16 = native.Kernel("rows", "llmarch_rotate_half_bf16", _ROTATION_ARGS,
                            lambda fn: _check_rotation(fn, torch.bfloat16))
_KERNELS = {torch.float32: (_NORM, _ROTATION), torch.bfloat16: (_NORM16, _ROTATION16)}


def reset() -> None:
    """Forget the loaded kernels (tests flip ``LLMARCH_NATIVE`` or the cache directory)."""
    for kernel in (_NORM, _ROTATION, _NORM16, _ROTATION16):
        kernel.reset()


def applies(*tensors: torch.Tensor, limit: int | None = MAX_ELEMENTS) -> bool:
    """Plain fp32 or bf16 CPU tensors of one dtype, none needing a gradient here, eager, the first at most
    ``limit`` elements."""
    grad, dtype = torch.is_grad_enabled(), tensors[0].dtype
    if dtype not in _KERNELS:
        return False
    for t in tensors:  # a plain loop: this runs ~25 times per decode step
        if type(t) not in _PLAIN or t.dtype != dtype or t.device.type != "cpu" or (grad and t.requires_grad):
            return False
    return (limit is None or tensors[0].numel() <= limit) and not torch.compiler.is_compiling()


def _norm(fn, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x, w = x.contiguous(), weight.contiguous()
    y = torch.empty_like(x)
    fn(x.data_ptr(), w.data_ptr(), y.data_ptr(), x.numel() // x.shape[-1], x.shape[-1], eps)
    return y


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
    """RMSNorm of x [..., D] with gain weight [D] (fp32, or bf16 with ``llmarch.nn.norm.rounded_rms_norm``'s
    roundings); None where the kernel is not available (call torch's)."""
    fn = _KERNELS[x.dtype][0].fn()
    return None if fn is None else _norm(fn, x, weight, eps)


def _rotation(fn, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    B, N, T, R = x.shape
    cos, sin = cos.expand(B, 1, T, R), sin.expand(B, 1, T, R)
    y = torch.empty(B, N, T, R, dtype=x.dtype)
    fn(x.data_ptr(), cos.data_ptr(), sin.data_ptr(), y.data_ptr(), B, N, T, R, *x.stride()[:3],
       cos.stride(0), cos.stride(2))
    return y


def rotate_half(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor | None:
    """``x * cos + rotate_half(x) * sin`` for x [B, N, T, R] (last dim contiguous) and cos/sin [B or 1, 1, T, R]
    with the same strides (last dim contiguous); None where the kernel or the layout does not serve (call the
    torch form)."""
    if (x.dim() != 4 or cos.shape != sin.shape or cos.stride() != sin.stride() or cos.dim() != 4
            or cos.shape[1] != 1 or cos.shape[0] not in (1, x.shape[0]) or tuple(cos.shape[2:]) != x.shape[2:]
            or x.stride(-1) != 1 or cos.stride(-1) != 1 or x.shape[-1] % 2):
        return None
    fn = _KERNELS[x.dtype][1].fn()
    return None if fn is None else _rotation(fn, x, cos, sin)
