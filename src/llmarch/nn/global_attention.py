"""Attention whose global rows have their own projections: Longformer (Beltagy et al. 2020, section 3.1, "linear
projections for global attention"), the ``longformer`` mixer.

Every query first attends as its pattern says with the usual ``qkv`` projection: a local query sees its window
and the global keys. The rows of the global tokens are then recomputed from a second projection ``qkv_global``
(laid out like ``qkv``: [q (H*Dh) | k (G*Dh) | v (G*Dh)]): each global query attends every real key (every earlier
one in a causal stack). The pattern names the global slots through ``global_slots(n, global_mask, device)``.
"""
from __future__ import annotations

import torch
from torch import nn

from llmarch.nn.attention import Attention, AttnContext
from llmarch.nn.block_sparse import _flag_list
from llmarch.nn.cache import KVCache


class GlobalProjectionAttention(Attention):
    """x [B, T, D] -> [B, T, D]. The global rows cost O(n_global * T); the rest is the pattern's execution."""

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int, head_dim: int, *, layer_idx: int, pattern,
                 qkv_bias: bool = False, **kwargs):
        if not hasattr(pattern, "global_slots"):
            raise ValueError(f"mixer: 'longformer' needs a pattern with global tokens (longformer); layer "
                             f"{layer_idx} has {type(pattern).__name__}")
        super().__init__(d_model, n_heads, n_kv_heads, head_dim, layer_idx=layer_idx, pattern=pattern,
                         qkv_bias=qkv_bias, **kwargs)
        self.qkv_global = nn.Linear(d_model, (n_heads + 2 * n_kv_heads) * head_dim, bias=qkv_bias)

    def forward(self, x: torch.Tensor, ctx: AttnContext, cache: KVCache | None = None) -> torch.Tensor:
        if cache is not None or ctx.q_start != 0:
            raise ValueError("cache: mixer 'longformer' recomputes global rows over the whole sequence; run it "
                             "without an incremental cache")
        B, T, _ = x.shape
        y = self.attend(x, ctx)  # [B, H, T, Dh]
        flags = self.pattern.global_slots(T, ctx.global_mask, x.device).expand(B, T)
        if ctx.key_padding is not None:
            flags = flags & ctx.key_padding[:, :T]  # a padding slot is never a global query
        if bool(flags.any()):
            y = self.global_rows(x, ctx, y, flags)
        return self.out(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))

    def global_rows(self, x: torch.Tensor, ctx: AttnContext, y: torch.Tensor, flags: torch.Tensor) -> torch.Tensor:
        """Replace the rows of y [B, H, T, Dh] flagged in ``flags`` [B, T] by global attention."""
        B, T, _ = x.shape
        H, G, Dh = self.n_heads, self.n_kv_heads, self.head_dim
        q, k, v = self.qkv_global(x).split([H * Dh, G * Dh, G * Dh], dim=-1)
        q = q.view(B, T, H, Dh).transpose(1, 2)  # [B, H, T, Dh]
        k = k.view(B, T, G, Dh).transpose(1, 2)  # [B, G, T, Dh]
        v = v.view(B, T, G, Dh).transpose(1, 2)  # [B, G, T, Dh]
        q, k = ctx.rotation.apply(q, k)
        rows, ok = _flag_list(flags)  # [B, R]: global slots (T where a batch row has fewer), validity
        R, idx = rows.shape[1], rows.clamp(max=T - 1)
        qr = q.gather(2, idx[:, None, :, None].expand(B, H, R, Dh))  # [B, H, R, Dh]
        k_idx = torch.arange(T, device=x.device)
        mask = ok[:, :, None].expand(B, R, T)  # [B, R, T]
        if ctx.key_padding is not None:
            mask = mask & ctx.key_padding[:, None, :T]
        if ctx.causal:
            mask = mask & (k_idx[None, None, :] <= idx[:, :, None])
        mask = mask | ~mask.any(-1, keepdim=True)  # unused rows attend everything; their output is dropped
        bias = ctx.bias(0, T)  # [B|1, H, T, T] or None
        if bias is not None:
            bias = bias.expand(B, H, T, T).gather(2, idx[:, None, :, None].expand(B, H, R, T))
        yr = self.kernel(qr, k, v, mask=mask[:, None], bias=bias, scale=self.scale, causal=False,
                         dropout_p=self.dropout if self.training else 0.0)  # [B, H, R, Dh]
        placed = y.new_zeros(B, H, T + 1, Dh).scatter(2, rows[:, None, :, None].expand(B, H, R, Dh), yr)
        return torch.where(flags[:, None, :, None], placed[:, :, :T], y)
