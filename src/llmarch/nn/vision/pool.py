"""Pooling heads of a vision tower (the ``pool`` value): the class token (CLIP, Radford et al. 2021), multi-head
attention pooling with a learned probe (SigLIP, Zhai et al. 2023; "MAP" of Lee et al. 2019), or none."""
from __future__ import annotations

import torch
from torch import nn

from llmarch.nn.ffn import MLP
from llmarch.nn.kernels import KERNELS
from llmarch.nn.norm import LayerNorm
from llmarch.registry import Registry

POOLS: Registry[type[nn.Module]] = Registry("vision.pool")


@POOLS.register("class_token")
class ClassTokenPool(nn.Module):
    """h [B, N, D] -> h[:, 0] [B, D] (the class token's final state)."""

    def __init__(self, **_: object):
        super().__init__()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h[:, 0]


@POOLS.register("none")
class NoPool(nn.Module):
    """No pooled output."""

    def __init__(self, **_: object):
        super().__init__()

    def forward(self, h: torch.Tensor) -> None:
        return None


@POOLS.register("attention")
class AttentionPool(nn.Module):
    """A learned probe [1, 1, D] attends h [B, N, D] (H heads; one fused in-projection ``qkv`` [3D, D] with bias,
    rows [q | k | v]), then y + mlp(norm(y)). -> [B, D]."""

    def __init__(self, d_model: int, n_heads: int, d_ff: int, activation: str, norm_eps: float, **_: object):
        super().__init__()
        self.n_heads, self.kernel = n_heads, KERNELS["sdpa"]
        self.probe = nn.Parameter(torch.zeros(1, 1, d_model))
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)
        self.norm = LayerNorm(d_model, norm_eps)
        self.mlp = MLP(d_model, d_ff, activation, bias=True)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        B, N, D = h.shape
        H, Dh = self.n_heads, D // self.n_heads
        wq, wkv = self.qkv.weight.split([D, 2 * D])
        bq, bkv = self.qkv.bias.split([D, 2 * D])
        q = nn.functional.linear(self.probe, wq, bq).view(1, 1, H, Dh).transpose(1, 2).expand(B, H, 1, Dh)
        k, v = nn.functional.linear(h, wkv, bkv).view(B, N, 2, H, Dh).permute(2, 0, 3, 1, 4)  # [B, H, N, Dh]
        y = self.kernel(q, k, v, mask=None, bias=None, scale=Dh ** -0.5, causal=False, dropout_p=0.0)
        y = self.out(y.transpose(1, 2).reshape(B, 1, D))  # [B, 1, D]
        y = y + self.mlp(self.norm(y))
        return y[:, 0]
