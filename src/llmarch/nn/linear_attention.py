"""Causal linear attention (Katharopoulos et al. 2020, "Transformers are RNNs"): softmax(q kᵀ) replaced by the
feature map φ(x) = elu(x) + 1, so y_t = φ(q_t)ᵀ S_t / (φ(q_t)ᵀ z_t + eps) with S_t = Σ_{s≤t} φ(k_s) v_sᵀ and the
normaliser z_t = Σ_{s≤t} φ(k_s). That is the SSD scan with no decay (A = 0, dt = 1) over values with a column of
ones appended (the normaliser is that column's output), so the three forms are :data:`llmarch.nn.ssd.SSD_FORMS`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llmarch.nn.mamba2 import new_tokens_mask
from llmarch.nn.ssd import SSD_FORMS


def elu_feature_map(x: torch.Tensor) -> torch.Tensor:
    """φ(x) = elu(x) + 1 > 0."""
    return F.elu(x) + 1.0


def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, form: str, state: torch.Tensor | None = None,
                     real: torch.Tensor | None = None, chunk_size: int = 256,
                     eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """φ(q), φ(k) [B, T, H, Dk] (features already applied), v [B, T, H, Dv]; ``real`` [B, T] (False: padding,
    which adds nothing to the state). -> y [B, T, H, Dv] and the state [B, H, Dv + 1, Dk]: Σ [v | 1] φ(k)ᵀ
    (its last row is the normaliser z). fp32 inside."""
    B, T, H, _ = q.shape
    ones = v.new_ones(B, T, H, 1)
    dt = v.new_ones(B, T, H) if real is None else real[..., None].expand(B, T, H).to(v.dtype)
    y, state = SSD_FORMS[form](torch.cat([v, ones], dim=-1), dt, v.new_zeros(H), k, q, state, chunk_size=chunk_size)
    return (y[..., :-1] / (y[..., -1:] + eps)).to(v.dtype), state


class LinearAttention(nn.Module):
    """x [B, T, D] -> [B, T, D]. q [H·Dh], k and v [G·Dh] from one fused ``qkv`` projection (k/v heads shared by
    H/G query heads as in GQA), φ = elu + 1, no position scheme (order comes from causality alone), ``out``
    projection. Cache (StateCache): ``state[layer]`` [B, H, Dh + 1, Dh], constant in the context length."""

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int, head_dim: int, *, layer_idx, form: str = "chunked",
                 chunk_size: int = 256, qkv_bias: bool = False, out_bias: bool = False, eps: float = 1e-6):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.layer_idx, self.form, self.chunk_size, self.eps = layer_idx, form, chunk_size, eps
        self.qkv = nn.Linear(d_model, (n_heads + 2 * n_kv_heads) * head_dim, bias=qkv_bias)
        self.out = nn.Linear(n_heads * head_dim, d_model, bias=out_bias)

    def forward(self, x: torch.Tensor, ctx, cache=None) -> torch.Tensor:
        B, T, _ = x.shape
        H, G, Dh = self.n_heads, self.n_kv_heads, self.head_dim
        q, k, v = self.qkv(x).view(B, T, H + 2 * G, Dh).split([H, G, G], dim=2)  # [B, T, H|G, Dh]
        k, v = k.repeat_interleave(H // G, dim=2), v.repeat_interleave(H // G, dim=2)
        state = cache.state.get(self.layer_idx) if cache is not None else None
        form = "recurrent" if cache is not None and T == 1 else self.form  # decoding: the O(1) step
        y, state = linear_attention(elu_feature_map(q), elu_feature_map(k), v, form, state,
                                    new_tokens_mask(ctx, T), self.chunk_size, self.eps)
        if cache is not None:
            cache.state[self.layer_idx] = state
        return self.out(y.reshape(B, T, H * Dh))
