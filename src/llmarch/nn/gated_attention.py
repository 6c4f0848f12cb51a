"""Attention with an output gate and per-head q/k norms (Qiu et al. 2025, "Gated Attention for Large Language
Models"; Qwen3-Next's full-attention layers): the q projection is doubled to give a per-channel gate, the heads'
output is multiplied by sigmoid(gate) before the output projection, and q and k are RMS-normalised per head before
the rotation. Positions, masks, kernels and caches are those of :class:`~llmarch.nn.attention.Attention`."""
from __future__ import annotations

import torch
from torch import nn

from llmarch.nn.attention import Attention, AttnContext
from llmarch.nn.cache import KVCache
from llmarch.nn.norm import make_norm


class GatedAttention(Attention):
    """x [B, T, D] -> [B, T, D]. ``qkv`` [D -> (2H + 2G)·Dh] laid out [q (H·Dh) | gate (H·Dh) | k | v];
    ``q_norm`` / ``k_norm`` (kind ``norm``) over Dh; out = o(attention(q, k, v) ⊙ sigmoid(gate))."""

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int, head_dim: int, *, norm: str, norm_eps: float,
                 **attention):
        super().__init__(d_model, n_heads, n_kv_heads, head_dim, **attention)
        self.qkv = nn.Linear(d_model, (2 * n_heads + 2 * n_kv_heads) * head_dim, bias=self.qkv.bias is not None)
        self.q_norm = make_norm(norm, head_dim, norm_eps, False)
        self.k_norm = make_norm(norm, head_dim, norm_eps, False)

    def forward(self, x: torch.Tensor, ctx: AttnContext, cache: KVCache | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        H, G, Dh = self.n_heads, self.n_kv_heads, self.head_dim
        q, gate, k, v = self.qkv(x).view(B, T, 2 * H + 2 * G, Dh).split([H, H, G, G], dim=2)  # [B, T, H|G, Dh]
        qk = torch.cat([self.q_norm(q), self.k_norm(k)], dim=2).transpose(1, 2)  # [B, H+G, T, Dh]
        q, k = ctx.rotation.rotate(qk).split([H, G], dim=1)
        v = v.transpose(1, 2)  # [B, G, T, Dh]
        k_start = ctx.q_start
        if cache is not None:
            k, v, k_start = cache.update(self.layer_idx, k, v, self.pattern.lookback)
        y = self.execution(q, k, v, ctx, self.pattern, k_start, kernel=self.kernel, scale=self.scale,
                           dropout_p=self.dropout if self.training else 0.0, block=self.block)  # [B, H, T, Dh]
        y = y.transpose(1, 2).reshape(B, T, H * Dh) * torch.sigmoid(gate.reshape(B, T, H * Dh))
        return self.out(y)
