"""Normalisation layers: LayerNorm (Ba et al. 2016) and RMSNorm (Zhang & Sennrich 2019)."""
from __future__ import annotations

import torch
from torch import nn

from llmarch.native import rows as native_rows
from llmarch.registry import Registry

NORMS: Registry[type[nn.Module]] = Registry("norm")


def rounded_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of a lower-precision x: normalised in fp32, rounded to x's dtype once, then times the gain (as
    LLaMA does)."""
    h = x.float()
    return weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


@NORMS.register("layernorm")
class LayerNorm(nn.Module):
    """LayerNorm over the last dim. [..., D] -> [..., D]; statistics in fp32, output in the input dtype."""

    def __init__(self, dim: int, eps: float = 1e-5, bias: bool = True):
        super().__init__()
        self.dim, self.eps = dim, eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.layer_norm(x, (self.dim,), self.weight, self.bias, self.eps)


@NORMS.register("rmsnorm")
class RMSNorm(nn.Module):
    """RMSNorm: x / rms(x) * weight, no mean, no bias. [..., D] -> [..., D]; computed in fp32 (as T5/LLaMA do)."""

    def __init__(self, dim: int, eps: float = 1e-6, bias: bool = False):
        super().__init__()
        if bias:
            raise ValueError("norm_bias: RMSNorm has no bias; set norm_bias=False")
        self.dim, self.eps = dim, eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            if native_rows.applies(x, self.weight, limit=None):  # inference: one native call (llmarch.native.rows)
                y = native_rows.rms_norm(x, self.weight, self.eps)
                if y is not None:
                    return y
            return nn.functional.rms_norm(x, (self.dim,), self.weight, self.eps)  # the same math in one call
        # lower precision: rounded_rms_norm; bf16 inference in one native call with the same roundings (within a
        # bf16 ulp: the mean is summed in double there)
        if x.dtype == torch.bfloat16 and native_rows.applies(x, self.weight, limit=None):
            y = native_rows.rms_norm(x, self.weight, self.eps)
            if y is not None:
                return y
        return rounded_rms_norm(x, self.weight, self.eps)


@NORMS.register("rmsnorm_zero")
class ZeroCenteredRMSNorm(RMSNorm):
    """RMSNorm whose gain is stored zero-centred: x / rms(x) * (1 + weight), weight starting at 0 (Gemma,
    Qwen3-Next). [..., D] -> [..., D]; computed in fp32, rounded to the input dtype last."""

    def after_init(self) -> None:
        nn.init.zeros_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (h * (1.0 + self.weight.float())).to(x.dtype)


def make_norm(kind: str, dim: int, eps: float, bias: bool) -> nn.Module:
    """Build a norm from the registry; ``bias`` only applies to norms that have one."""
    cls = NORMS[kind]
    return cls(dim, eps=eps, bias=bias and cls is LayerNorm)
