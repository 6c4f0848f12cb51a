"""Transformer blocks: a mixer (attention) and an FFN, each wrapped in a residual with a norm placed before
(pre-norm, GPT-2 onwards) or after (post-norm, Vaswani et al. 2017 / BERT). The layout is the ``norm_placement``
config value.
``fp16_clamp`` (T5) clamps the residual stream after every sublayer under fp16, so that one overflowing activation
does not turn the whole stream into inf."""
from __future__ import annotations

import torch
from torch import nn

from llmarch.registry import Registry

BLOCKS: Registry[type[nn.Module]] = Registry("norm_placement")


class Fp16Clamp(nn.Module):
    """T5's overflow guard: an fp16 tensor holding an inf anywhere is clamped to +-(fp16 max - 1000) everywhere
    (to +-fp16 max otherwise, which changes nothing); other dtypes pass through. The bound is a 0-dim tensor,
    so the check is no host sync."""

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if h.dtype != torch.float16:
            return h
        big = torch.finfo(torch.float16).max
        bound = torch.where(torch.isinf(h).any(), big - 1000, big)
        return torch.clamp(h, min=-bound, max=bound)


def _guard(clamp: bool) -> nn.Module:
    return Fp16Clamp() if clamp else nn.Identity()


class _Block(nn.Module):
    """Holds the parts; subclasses give the residual wiring. x [B, T, D] -> [B, T, D]."""

    def __init__(self, attn: nn.Module, ffn: nn.Module, attn_norm: nn.Module, ffn_norm: nn.Module,
                 dropout: float = 0.0, clamp: bool = False):
        super().__init__()
        self.attn, self.ffn = attn, ffn
        self.attn_norm, self.ffn_norm = attn_norm, ffn_norm
        self.dropout = nn.Dropout(dropout)
        self.guard = _guard(clamp)


@BLOCKS.register("pre")
class PreNormBlock(_Block):
    """x + attn(norm(x)), then h + ffn(norm(h))."""

    def attn_input(self, x: torch.Tensor) -> torch.Tensor:
        """What the mixer sees for block input x (early exit fills skipped layers' caches from it)."""
        return self.attn_norm(x)

    def forward(self, x: torch.Tensor, ctx, cache=None) -> torch.Tensor:
        h = self.guard(x + self.dropout(self.attn(self.attn_norm(x), ctx, cache)))
        return self.guard(h + self.dropout(self.ffn(self.ffn_norm(h))))


@BLOCKS.register("post")
class PostNormBlock(_Block):
    """norm(x + attn(x)), then norm(h + ffn(h))."""

    def attn_input(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def forward(self, x: torch.Tensor, ctx, cache=None) -> torch.Tensor:
        h = self.attn_norm(self.guard(x + self.dropout(self.attn(x, ctx, cache))))
        return self.ffn_norm(self.guard(h + self.dropout(self.ffn(h))))


# Decoder blocks of an encoder-decoder: self-attention, then cross-attention to the encoder output, then the FFN,
# each in its own residual with its own norm. Keyed by ``norm_placement`` like the blocks above.
CROSS_BLOCKS: Registry[type[nn.Module]] = Registry("norm_placement (cross-attention block)")


class _CrossBlock(nn.Module):
    """Holds the parts; subclasses give the residual wiring. x [B, T, D] -> [B, T, D]."""

    def __init__(self, attn: nn.Module, cross: nn.Module, ffn: nn.Module, attn_norm: nn.Module,
                 cross_norm: nn.Module, ffn_norm: nn.Module, dropout: float = 0.0, clamp: bool = False):
        super().__init__()
        self.attn, self.cross, self.ffn = attn, cross, ffn
        self.attn_norm, self.cross_norm, self.ffn_norm = attn_norm, cross_norm, ffn_norm
        self.dropout = nn.Dropout(dropout)
        self.guard = _guard(clamp)


@CROSS_BLOCKS.register("pre")
class PreNormCrossBlock(_CrossBlock):
    """x + attn(norm(x)), h + cross(norm(h)), then h + ffn(norm(h)) (T5)."""

    def forward(self, x: torch.Tensor, ctx, cache=None) -> torch.Tensor:
        h = self.guard(x + self.dropout(self.attn(self.attn_norm(x), ctx, cache)))
        h = self.guard(h + self.dropout(self.cross(self.cross_norm(h), ctx, cache)))
        return self.guard(h + self.dropout(self.ffn(self.ffn_norm(h))))


@CROSS_BLOCKS.register("post")
class PostNormCrossBlock(_CrossBlock):
    """norm(x + attn(x)), norm(h + cross(h)), then norm(h + ffn(h)) (Vaswani et al. 2017)."""

    def forward(self, x: torch.Tensor, ctx, cache=None) -> torch.Tensor:
        h = self.attn_norm(self.guard(x + self.dropout(self.attn(x, ctx, cache))))
        h = self.cross_norm(self.guard(h + self.dropout(self.cross(h, ctx, cache))))
        return self.ffn_norm(self.guard(h + self.dropout(self.ffn(h))))
