"""Multi-head latent attention (DeepSeek-AI 2024, "DeepSeek-V2", section 2.1).

Keys and values of all heads come from one compressed latent c = norm(x W_DKV) of R numbers per token; a small
head-shared key k_R = RoPE(x W_KR) carries position. Per head, the key is [c W_UK | k_R] and the value c W_UV;
the query is [q_C | RoPE(q_R)], from x directly or through its own latent (q_lora_rank). Only c and k_R are cached.

Two equal ways to attend: *naive* expands c into per-head keys/values; *absorbed* folds W_UK into the query
(q_C W_UK^T is scored against c directly) and W_UV into the output, so attention runs as multi-query attention
with head width R + Dr over the cache itself — the cheap way to decode.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from llmarch.nn.cache import LatentCache
from llmarch.nn.dense import Linear
from llmarch.nn.execution import EXECUTIONS
from llmarch.nn.kernels import KERNELS
from llmarch.nn.norm import RMSNorm
from llmarch.nn.patterns import Pattern


class LowRankQuery(nn.Module):
    """q = up(norm(down(x))). [B, T, D] -> [B, T, out] through a [B, T, q_lora_rank] latent."""

    def __init__(self, d_model: int, q_lora_rank: int, out_features: int, eps: float, bias: bool = False):
        super().__init__()
        self.down = Linear(d_model, q_lora_rank, bias=bias)
        self.norm = RMSNorm(q_lora_rank, eps=eps)
        self.up = Linear(q_lora_rank, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.norm(self.down(x)))


class LatentAttention(nn.Module):
    """MLA. x [B, T, D] -> [B, T, D]; q [B, H, T, Dn + Dr]; cache: latent [B, 1, S, R] and rope key [B, 1, S, Dr].

    ``kv_down`` rows are [latent (R) | rope key (Dr)]; ``kv_up`` rows are per head [key no-pe (Dn) | value (Dv)].
    ``absorb``: never | decode (absorbed when new queries attend a filled cache) | always.
    """

    def __init__(self, d_model: int, n_heads: int, *, kv_lora_rank: int, q_lora_rank: int | None,
                 qk_nope_head_dim: int, qk_rope_head_dim: int, v_head_dim: int, layer_idx: int, pattern: Pattern,
                 latent_norm_eps: float = 1e-6, qkv_bias: bool = False, out_bias: bool = False,
                 scale: float | None = None, absorb: str = "decode", kernel: str = "sdpa", dropout: float = 0.0,
                 execution: str = "mask", block: int = 64):
        super().__init__()
        H, R, Dn, Dr, Dv = n_heads, kv_lora_rank, qk_nope_head_dim, qk_rope_head_dim, v_head_dim
        self.n_heads, self.kv_lora_rank, self.q_lora_rank = H, R, q_lora_rank
        self.qk_nope_head_dim, self.qk_rope_head_dim, self.v_head_dim = Dn, Dr, Dv
        self.layer_idx, self.pattern, self.absorb, self.dropout = layer_idx, pattern, absorb, dropout
        self.scale = 1.0 / math.sqrt(Dn + Dr) if scale is None else scale
        self.kernel_name, self.kernel = kernel, KERNELS[kernel]
        self.execution_name, self.execution, self.block = execution, EXECUTIONS[execution], block
        if q_lora_rank is None:
            self.q = Linear(d_model, H * (Dn + Dr), bias=False)
        else:
            self.q = LowRankQuery(d_model, q_lora_rank, H * (Dn + Dr), latent_norm_eps, bias=qkv_bias)
        self.kv_down = Linear(d_model, R + Dr, bias=qkv_bias)
        self.kv_norm = RMSNorm(R, eps=latent_norm_eps)
        self.kv_up = Linear(R, H * (Dn + Dv), bias=False)
        self.out = Linear(H * Dv, d_model, bias=out_bias)

    def forward(self, x: torch.Tensor, ctx, cache: LatentCache | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        H, R, Dn, Dr, Dv = self.n_heads, self.kv_lora_rank, self.qk_nope_head_dim, self.qk_rope_head_dim, \
            self.v_head_dim
        q = self.q(x).view(B, T, H, Dn + Dr).transpose(1, 2)  # [B, H, T, Dn + Dr]
        q_nope, q_rope = q.split([Dn, Dr], dim=-1)
        latent, k_rope = self.kv_down(x).split([R, Dr], dim=-1)
        latent = self.kv_norm(latent)[:, None]  # [B, 1, T, R]
        q_rope, k_rope = ctx.rotation.apply(q_rope, k_rope[:, None])  # k_rope [B, 1, T, Dr]
        k_start = ctx.q_start
        if cache is not None:
            if not isinstance(cache, LatentCache):
                raise ValueError("cache: latent attention stores a LatentCache; create it with model.new_cache()")
            latent, k_rope, k_start = cache.update(self.layer_idx, latent, k_rope, self.pattern.lookback)
        absorbed = self.absorb == "always" or (self.absorb == "decode" and cache is not None and ctx.q_start > 0)
        attend = self._absorbed if absorbed else self._naive
        y = attend(q_nope, q_rope, latent, k_rope, ctx, k_start)  # [B, H, T, Dv]
        return self.out(y.transpose(1, 2).reshape(B, T, H * Dv))

    def _run(self, q, k, v, ctx, k_start):
        return self.execution(q, k, v, ctx, self.pattern, k_start, kernel=self.kernel, scale=self.scale,
                              dropout_p=self.dropout if self.training else 0.0, block=self.block)

    def _naive(self, q_nope, q_rope, latent, k_rope, ctx, k_start):
        """Expand the latent into per-head keys [B, H, S, Dn + Dr] and values [B, H, S, Dv]."""
        B, H, S = latent.shape[0], self.n_heads, latent.shape[2]
        kv = self.kv_up(latent[:, 0]).view(B, S, H, -1).transpose(1, 2)
        k_nope, v = kv.split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)
        k = torch.cat([k_nope, k_rope.expand(B, H, S, -1)], dim=-1)
        return self._run(torch.cat([q_nope, q_rope], dim=-1), k, v, ctx, k_start)

    def _absorbed(self, q_nope, q_rope, latent, k_rope, ctx, k_start):
        """Score against the latent itself: q_C W_UK^T [B, H, T, R]; one shared key/value head (MQA) of width
        R + Dr over the cache; W_UV applied to the attended latent [B, H, T, R] afterwards."""
        up = self.kv_up  # a quantized projection (llmarch.infer.quantize) holds no float weight: its dequantized one
        w = up.weight if hasattr(up, "weight") else up.dequantize().to(q_nope.dtype)
        w = w.view(self.n_heads, self.qk_nope_head_dim + self.v_head_dim, self.kv_lora_rank)
        w_uk, w_uv = w.split([self.qk_nope_head_dim, self.v_head_dim], dim=1)  # [H, Dn, R], [H, Dv, R]
        q_latent = torch.einsum("bhtn,hnr->bhtr", q_nope, w_uk)
        y_latent = self._run(torch.cat([q_latent, q_rope], dim=-1), torch.cat([latent, k_rope], dim=-1), latent,
                             ctx, k_start)  # [B, H, T, R]
        return torch.einsum("bhtr,hvr->bhtv", y_latent, w_uv)
