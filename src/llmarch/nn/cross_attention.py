"""Encoder-decoder (cross) attention, Vaswani et al. 2017 sec. 3.2.3: queries come from the decoder, keys and values
from the encoder output. No causality and no positions; only the encoder's padding masks keys."""
from __future__ import annotations

import math

import torch
from torch import nn

from llmarch.nn.dense import Linear
from llmarch.nn.kernels import KERNELS


class CrossAttention(nn.Module):
    """x [B, T, D] attends ``ctx.memory.states`` [B, S, D] -> [B, T, D]; q [B, H, T, Dh], k/v [B, G, S, Dh].

    ``q`` projects the decoder stream; ``kv`` projects the encoder output with its rows laid out
    [k (G*Dh) | v (G*Dh)]. With an :class:`~llmarch.nn.cache.EncoderDecoderCache` the k/v are projected once."""

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int, head_dim: int, *, layer_idx: int,
                 qkv_bias: bool = False, out_bias: bool = False, scale: float | None = None, kernel: str = "sdpa",
                 dropout: float = 0.0):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim, self.layer_idx = n_heads, n_kv_heads, head_dim, layer_idx
        self.scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
        self.kernel_name, self.kernel = kernel, KERNELS[kernel]
        self.dropout = dropout
        self.q = Linear(d_model, n_heads * head_dim, bias=qkv_bias)
        self.kv = Linear(d_model, 2 * n_kv_heads * head_dim, bias=qkv_bias)
        self.out = Linear(n_heads * head_dim, d_model, bias=out_bias)

    def project_kv(self, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoder output [B, S, D] -> k, v [B, G, S, Dh]."""
        B, S, _ = states.shape
        k, v = self.kv(states).view(B, S, 2, self.n_kv_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return k, v

    def query(self, x: torch.Tensor) -> torch.Tensor:
        """Decoder stream [B, T, D] -> q [B, H, T, Dh]."""
        B, T, _ = x.shape
        return self.q(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor, ctx, cache=None) -> torch.Tensor:
        memory = ctx.memory
        if memory is None:
            raise ValueError("cross-attention needs the encoder output: call the model with input_ids (encoder) "
                             "and decoder_input_ids, or pass a cache that holds the encoded memory")
        B, T, _ = x.shape
        H, Dh = self.n_heads, self.head_dim
        q = self.query(x)  # [B, H, T, Dh]
        if cache is None:
            k, v = self.project_kv(memory.states)
        else:
            k, v = cache.cross(self.layer_idx, self.project_kv, memory.states)
        y = self.kernel(q, k, v, mask=memory.mask(), bias=None, scale=self.scale, causal=False,
                        dropout_p=self.dropout if self.training else 0.0)  # [B, H, T, Dh]
        return self.out(y.transpose(1, 2).reshape(B, T, H * Dh))
