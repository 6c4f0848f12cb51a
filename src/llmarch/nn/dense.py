"""Dense projections: ``nn.Linear`` with the fp32 CPU matrix products sent to oneDNN.

torch sends fp32 CPU matmuls to its BLAS (MKL); oneDNN, which torch already uses for bf16, ran the training
shapes of this library about 2x faster on the benchmark machine (an AMD EPYC, one thread: [2048, 512] x
[512, 2752] 87 -> 200 GFLOP/s, and the transposed products of the backward alike; batch-8 decode through the
50257 x 768 GPT-2 head 3-4 -> 8-10 GB/s). A single row (batch-1 decoding) keeps torch's BLAS unless the weight
has >= 2^24 elements: with every one-row product on oneDNN, LLaMA-style batch-1 decoding ran 8-17 % slower in
each of three interleaved A/Bs (its 512 x 512 .. 2752 x 512 products do not pay oneDNN's per-call cost); for
GPT-2's 50257 x 768 head the A/Bs were within the noise (-13 % .. +25 %). Same function, fp32 rounding order aside: tests hold values and
gradients to ``F.linear``. Everything else (other devices and dtypes, autocast, compiled regions, tensor
subclasses such as sharded DTensors) takes ``F.linear`` unchanged.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils import flop_counter

_OPS = getattr(torch.ops, "mkldnn", None)
ONEDNN = torch.backends.mkldnn.is_available() and _OPS is not None and hasattr(_OPS, "_linear_pointwise")
_PLAIN = (torch.Tensor, nn.Parameter)
MATVEC_MIN_ELEMENTS = 1 << 24  # a one-row product goes to oneDNN only for weights this large (see above)


if ONEDNN and _OPS._linear_pointwise not in flop_counter.flop_registry:  # FLOP counts (analysis, benchmarks) see it

    @flop_counter.register_flop_formula(_OPS._linear_pointwise)
    def _linear_flops(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
        return 2 * math.prod(x_shape[:-1]) * x_shape[-1] * w_shape[0]


def _mm(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """x [N, in] @ w[out, in]^T (+ b) through oneDNN -> [N, out] (any strides of x and w)."""
    return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")


def onednn_applies(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> bool:
    """Whether :func:`linear` takes the oneDNN path for these operands."""
    return (ONEDNN and x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32
            and type(x) in _PLAIN and type(weight) in _PLAIN and (bias is None or type(bias) in _PLAIN)
            and x.numel() > 0 and (x.numel() > x.shape[-1] or weight.numel() >= MATVEC_MIN_ELEMENTS)
            and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling())


class _OneDNNLinear(torch.autograd.Function):
    """y = x W^T + b with both backward products through oneDNN too (dx = g W, dW = g^T x)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])  # [N, in]
        ctx.save_for_backward(x2, weight)
        ctx.x_shape, ctx.has_bias = x.shape, bias is not None
        return _mm(x2, weight, bias).view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        x2, weight = ctx.saved_tensors
        g2 = g.reshape(-1, g.shape[-1])  # [N, out]
        dx = _mm(g2, weight.t(), None).view(ctx.x_shape) if ctx.needs_input_grad[0] else None
        dw = None
        if ctx.needs_input_grad[1]:  # oneDNN copies a transposed input to rows: transpose the narrower of g and x
            dw = _mm(x2.t(), g2.t(), None).t() if x2.shape[1] < g2.shape[1] else _mm(g2.t(), x2.t(), None)
        db = g2.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return dx, dw, db


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear``: x [..., in], weight [out, in] -> [..., out]; oneDNN for fp32 CPU tensors (see the module)."""
    if not onednn_applies(x, weight, bias):
        return F.linear(x, weight, bias)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        return _OneDNNLinear.apply(x, weight, bias)
    return _mm(x.reshape(-1, x.shape[-1]), weight, bias).view(*x.shape[:-1], weight.shape[0])


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters, names and state dict) whose forward is :func:`linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
