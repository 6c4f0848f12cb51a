"""The ``cross_blocks`` fusion (Llama 3.2 Vision; transformers' ``MllamaCrossAttentionDecoderLayer``): decoder
layers of ``vision.cross_layers`` are replaced by blocks of cross-attention to the image tokens (RMS-normed
queries and keys) and an FFN, each branch scaled by a tanh gate that starts at zero. A text token sees the tiles
its ``cross_attention_mask`` row allows; a token that sees none attends all of them but its FFN branch is zeroed.
With no image in the context the blocks are skipped."""
from __future__ import annotations

import torch
from torch import nn

from llmarch.nn.cache import CrossMemory, EncoderDecoderCache
from llmarch.nn.cross_attention import CrossAttention
from llmarch.nn.norm import make_norm
from llmarch.nn.vision.fusion import FUSIONS, Fusion, memory_of


class TiledMemory(CrossMemory):
    """Image tokens ``states`` [B, S, D], S = groups x ``group`` (groups = images x tiles, ``group`` tokens each),
    and per text token the groups it sees: ``rows`` [B, T, groups] (bool) for the current queries. A step without
    a mask repeats the last row seen (what generation does)."""

    def __init__(self, states: torch.Tensor, group: int):
        super().__init__(states)
        self.group = group
        self.rows: torch.Tensor | None = None
        self.last: torch.Tensor | None = None

    def select_rows(self, cross_attention_mask: torch.Tensor | None, past: int, T: int) -> None:
        """cross_attention_mask [B, T or past + T, images, tiles] (1 = the token sees the tile) or None."""
        if cross_attention_mask is None:
            self.rows = None if self.last is None else self.last.expand(-1, T, -1)
            return
        m = cross_attention_mask
        groups = self.states.shape[1] // self.group
        if m.dim() != 4 or m.shape[0] != self.states.shape[0] or m.shape[2] * m.shape[3] != groups \
                or m.shape[1] not in (T, past + T):
            raise ValueError(f"cross_attention_mask must be [batch {self.states.shape[0]}, tokens ({T} or cached + "
                             f"new {past + T}), images, tiles] with images x tiles = {groups}; got {tuple(m.shape)}")
        m = m.flatten(2).bool()
        self.rows = m[:, -T:] if m.shape[1] == T else m[:, past:past + T]
        self.last = self.rows[:, -1:]

    def mask(self) -> torch.Tensor | None:
        """[B, 1, T, S] (True = attend); a row that sees no tile sees every token."""
        if self.rows is None:
            return None
        m = self.rows.repeat_interleave(self.group, dim=-1)[:, None]
        return m | ~m.any(-1, keepdim=True)

    def row_gate(self) -> torch.Tensor | None:
        """[B, T, 1]: 1 where the token sees some tile, 0 where it sees none (None: no mask)."""
        return None if self.rows is None else self.rows.any(-1, keepdim=True)

    def reorder(self, index: torch.Tensor) -> None:
        super().reorder(index)
        self.rows = None if self.rows is None else self.rows[index]
        self.last = None if self.last is None else self.last[index]


class NormedCrossAttention(CrossAttention):
    """Cross-attention with RMSNorm over each head's query and key (``q_norm``, ``k_norm`` [Dh])."""

    def __init__(self, *args, norm_eps: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.q_norm = make_norm("rmsnorm", self.head_dim, norm_eps, False)
        self.k_norm = make_norm("rmsnorm", self.head_dim, norm_eps, False)

    def query(self, x: torch.Tensor) -> torch.Tensor:
        return self.q_norm(super().query(x))

    def project_kv(self, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = super().project_kv(states)
        return self.k_norm(k), v


class GatedCrossBlock(nn.Module):
    """h = x + tanh(attn_gate) cross(norm x); h + tanh(ffn_gate) row_gate * ffn(norm h). x [B, T, D] ->
    [B, T, D]; x unchanged when ``ctx.memory`` is None (no image)."""

    def __init__(self, cross: nn.Module, ffn: nn.Module, attn_norm: nn.Module, ffn_norm: nn.Module):
        super().__init__()
        self.cross, self.ffn, self.attn_norm, self.ffn_norm = cross, ffn, attn_norm, ffn_norm
        self.attn_gate = nn.Parameter(torch.zeros(1))
        self.ffn_gate = nn.Parameter(torch.zeros(1))

    def after_init(self) -> None:
        nn.init.zeros_(self.attn_gate)
        nn.init.zeros_(self.ffn_gate)

    def forward(self, x: torch.Tensor, ctx, cache=None) -> torch.Tensor:
        memory = getattr(ctx, "memory", None)
        if memory is None:
            return x
        h = x + self.attn_gate.tanh() * self.cross(self.attn_norm(x), ctx, cache)
        y = self.ffn(self.ffn_norm(h))
        rows = memory.row_gate() if isinstance(memory, TiledMemory) else None
        if rows is not None:
            y = y * rows.to(y.dtype)
        return h + self.ffn_gate.tanh() * y


@FUSIONS.register("cross_blocks")
class CrossBlockFusion(Fusion):
    """Blocks of ``vision.cross_layers`` replaced by :class:`GatedCrossBlock`; every row holds its images'
    tiles' tokens (features [B, images x tiles x N, D]), whose k/v are projected once into the cache."""

    cache = EncoderDecoderCache
    per_row = True

    @staticmethod
    def text_tokens(vision) -> int:
        """One image token per image: the cross-attention mask starts each image's span there."""
        return 1

    @staticmethod
    def block_for(cfg):
        from llmarch.model import cross_attention_for, ffn_for, norm_for

        def block(i: int) -> nn.Module | None:
            if i not in cfg.vision.cross_layers:
                return None
            cross = cross_attention_for(cfg, i, NormedCrossAttention, norm_eps=cfg.norm_eps)
            return GatedCrossBlock(cross, ffn_for(cfg, i), norm_for(cfg), norm_for(cfg))

        return block

    @staticmethod
    def enter(model, features, cache, attention_mask, cross_attention_mask, T):
        """New features become a :class:`TiledMemory` (kept in the cache); its rows for the T new tokens come
        from ``cross_attention_mask``."""
        group = model.config.vision.tile_tokens
        memory = memory_of(features, cache, lambda f: TiledMemory(f, group))
        if memory is not None:
            memory.select_rows(cross_attention_mask, cache.length if cache is not None else 0, T)
        return cache, memory, attention_mask


__all__ = ["CrossBlockFusion", "GatedCrossBlock", "NormedCrossAttention", "TiledMemory"]
