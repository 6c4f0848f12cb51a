"""bf16 products on CPUs without bf16 matrix instructions: computed in fp32 by torch's BLAS, rounded to bf16 once.

Where oneDNN's bf16 products are missing (``llmarch.nn.dense.ONEDNN_BF16`` false: no AVX-512 BW/VL/DQ or
AVX-NE-CONVERT, e.g. an AVX2-only EPYC), torch multiplies bf16 CPU tensors with a generic kernel. Its values are
the fp32 product of the bf16 operands rounded to bf16 once (fp32 accumulation), but it is slow: on such a host, one
thread, ``F.linear`` of [128, 512] x [2048, 512]^T took 28 ms in bf16 against 3.8 ms in fp32, and ``x @ w`` over a
row-major [512, 2048] (an expert bank's layout) 471 ms; bf16 autocast training ran every product there. Widening
the operands to fp32 (exact), multiplying with torch's BLAS and rounding the result gives the same values, the
summation order aside: 1.6-3.6x faster than the generic kernel at 16 rows on the LLaMA-style and GPT-2 matrices,
3.2-5.4x at 64, ~100x over row-major banks (``benchmarks/bf16_cpu.py``). Fewer than :data:`MIN_ROWS` rows of an
inference product stay on torch's kernel: widening the whole weight costs more than a few rows' products (weights
streamed from memory: 0.3-0.6x at one row; at four rows 0.6-1.2x, the large ones behind). Few-row products of
packed weights run on the native bf16 kernel instead (``llmarch.native.bf16``).

:func:`applies` says when :func:`linear` (``llmarch.nn.dense.linear``'s bf16 route) takes it: bf16 operands on the
CPU, or fp32 ones under CPU bf16 autocast (cast to bf16 first, as autocast would), eager, at least
:data:`MIN_ROWS` rows or a gradient to compute. Gradients (input, weight, bias) are widened alike and rounded to
bf16, as torch's bf16 backward rounds them; autocast's casts keep their own backward (fp32 gradients for fp32
weights). Expert banks use :func:`mm` (``llmarch.nn.banks``), attention the same idea
(``llmarch.nn.kernels.sdpa_attention``: torch's fp32 kernel, one rounding). ``LLMARCH_WIDEN_BF16=0`` turns the
route off.
"""
from __future__ import annotations

import os
import warnings

import torch
import torch.nn.functional as F

from llmarch.nn import dense

BF16 = torch.bfloat16
_ENV = os.environ.get("LLMARCH_WIDEN_BF16", "")
if _ENV not in ("", "0", "1"):
    warnings.warn(f"LLMARCH_WIDEN_BF16={_ENV!r} is neither 0 nor 1: ignored (on where the CPU lacks bf16 products)")
ROUTE = not dense.ONEDNN_BF16 and _ENV != "0"
MIN_ROWS = 8  # fewer rows of an inference product stay on torch's kernel (crossover 3-8 rows, large weights last)


def _autocast_bf16() -> bool:
    return torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == BF16


def takes(t: torch.Tensor) -> bool:
    """A bf16 CPU tensor whose products (and attention) this route serves here: the route on, eager, no CPU
    autocast other than bf16's."""
    return (t.dtype == BF16 and t.device.type == "cpu" and ROUTE and not torch.compiler.is_compiling()
            and (not torch.is_autocast_enabled("cpu") or _autocast_bf16()))


def applies(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> bool:
    """Whether :func:`linear` serves ``F.linear(x, weight, bias)`` here (see the module)."""
    if x.dtype != BF16 and not torch.is_autocast_enabled("cpu"):
        return False
    if not ROUTE or torch.compiler.is_compiling() or x.device.type != "cpu" or weight.device.type != "cpu":
        return False
    tensors = (x, weight) if bias is None else (x, weight, bias)
    if any(type(t) not in dense._PLAIN for t in tensors) or x.numel() == 0:
        return False
    if torch.is_autocast_enabled("cpu"):  # bf16 autocast casts fp32 operands; another autocast dtype is not ours
        dtypes_ok = _autocast_bf16() and all(t.dtype in (torch.float32, BF16) for t in tensors)
    else:
        dtypes_ok = all(t.dtype == BF16 for t in tensors)
    return dtypes_ok and (x.numel() >= MIN_ROWS * x.shape[-1] or dense._needs_grad(x, weight, bias))


def mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b for bf16 matrices, in fp32, rounded to bf16 once."""
    return torch.mm(a.float(), b.float()).to(BF16)


def _forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear of bf16 operands in fp32, rounded once; [..., in] -> [..., out]."""
    with torch.autocast("cpu", enabled=False):
        y = F.linear(x.reshape(-1, x.shape[-1]).float(), weight.float(), None if bias is None else bias.float())
    return y.to(BF16).view(*x.shape[:-1], weight.shape[0])


class _Linear(torch.autograd.Function):
    """y = x W^T + b for bf16 x, W, b: each product (forward, dx = g W, dW = g^T x) widened to fp32 and rounded."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x.reshape(-1, x.shape[-1]), weight)
        ctx.x_shape, ctx.has_bias = x.shape, bias is not None
        return _forward(x, weight, bias)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        x2, weight = ctx.saved_tensors
        with torch.autocast("cpu", enabled=False):
            g2 = g.reshape(-1, g.shape[-1]).float()
            dx = (g2 @ weight.float()).to(BF16).view(ctx.x_shape) if ctx.needs_input_grad[0] else None
            dw = (g2.t() @ x2.float()).to(BF16) if ctx.needs_input_grad[1] else None
            db = g2.sum(0).to(BF16) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return dx, dw, db


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` in bf16 through fp32 products (needs :func:`applies`); under CPU bf16 autocast the operands
    are cast to bf16 first (autocast's own casts, so their backward returns fp32 gradients to fp32 weights)."""
    if _autocast_bf16():
        x, weight = x.to(BF16), weight.to(BF16)
        bias = None if bias is None else bias.to(BF16)
    return _Linear.apply(x, weight, bias) if dense._needs_grad(x, weight, bias) else _forward(x, weight, bias)
