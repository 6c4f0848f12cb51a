"""Weight layouts for decoding. A decode step multiplies a few rows by every weight matrix, so its speed is how
fast the matrix-vector product streams the weights. For nn.Linear's [N, K] layout torch (MKL) streams the
50257x768 GPT-2 head at about half the rate it reaches on the same matrix stored [K, N] (benchmarks/decode.py
measures both), so :func:`transpose_linears` stores chosen layers as Wᵀ and multiplies x @ Wᵀ. Inference only:
the weights are copies (a tied head no longer shares the embedding's storage)."""
from __future__ import annotations

import torch
from torch import nn

from llmarch.nn.heads import swap_projection


class TransposedLinear(nn.Module):
    """y = x @ weight_t + bias with weight_t = Wᵀ [K, N] contiguous. x [*, K] -> [*, N]."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight_t", linear.weight.detach().t().contiguous())
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x @ self.weight_t
        return y if self.bias is None else y + self.bias


def transpose_linears(model: nn.Module, names: tuple[str, ...] = ("lm_head",)) -> nn.Module:
    """Replace the nn.Linear layers whose qualified name ends with one of ``names`` ("" = all), in place."""
    targets = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.endswith(names)]
    for name, linear in targets:
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr,
                swap_projection(linear, TransposedLinear(linear)))
    return model
