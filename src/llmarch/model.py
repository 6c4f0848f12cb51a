"""Assembly: embeddings, a stack of blocks, the final norm and the LM head, all chosen from the config."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from llmarch.config import ModelConfig
from llmarch.nn.attention import Attention, AttnContext
from llmarch.nn.block import BLOCKS
from llmarch.nn.cache import KVCache
from llmarch.nn.ffn import FFNS
from llmarch.nn.moe import MoE, aux_loss
from llmarch.nn.norm import make_norm
from llmarch.nn.patterns import build_pattern
from llmarch.nn.position import build_positions


@dataclass
class ModelOutput:
    logits: torch.Tensor  # [B, T, V]
    hidden_states: torch.Tensor  # [B, T, D] after the final norm
    aux_loss: torch.Tensor  # scalar; MoE balance losses, 0 when dense
    cache: KVCache | None = None


def norm_for(cfg: ModelConfig, dim: int | None = None) -> nn.Module:
    return make_norm(cfg.norm, dim or cfg.d_model, cfg.norm_eps, cfg.norm_bias)


def ffn_for(cfg: ModelConfig, layer: int) -> nn.Module:
    """The FFN of layer ``layer``; with ``cfg.moe``, MoE on the schedule's layers and ``moe.expert_ffn`` elsewhere."""
    if cfg.moe is not None:
        if cfg.moe.is_moe_layer(layer):
            return MoE(cfg.d_model, cfg.moe.expert_d_ff(cfg.d_ff), cfg.activation, dropout=cfg.dropout, moe=cfg.moe)
        return FFNS[cfg.moe.expert_ffn](cfg.d_model, cfg.d_ff, cfg.activation, dropout=cfg.dropout)
    return FFNS[cfg.ffn](cfg.d_model, cfg.d_ff, cfg.activation, bias=cfg.ffn_bias, dropout=cfg.dropout)


class Embeddings(nn.Module):
    """Token embedding (+ absolute positions) (+ norm) + dropout. ids [B, T] -> [B, T, D]."""

    def __init__(self, vocab_size: int, d_model: int, norm: nn.Module, dropout: float):
        super().__init__()
        self.vocab_size = vocab_size
        self.tokens = nn.Embedding(vocab_size, d_model)
        self.norm = norm
        self.dropout = nn.Dropout(dropout)

    def forward(self, input_ids: torch.Tensor, positions: nn.Module, position_ids: torch.Tensor) -> torch.Tensor:
        x = self.tokens(input_ids)
        absolute = positions.embed(position_ids)
        if absolute is not None:
            x = x + absolute.to(x.dtype)
        return self.dropout(self.norm(x))


class Stack(nn.Module):
    """L blocks and the final norm, sharing one position scheme. x [B, T, D] -> [B, T, D]."""

    def __init__(self, cfg: ModelConfig, causal: bool):
        super().__init__()
        self.causal = causal
        patterns = {name: build_pattern(name, window=cfg.window) for name in set(cfg.pattern)}
        self.positions = build_positions(cfg.position, d_model=cfg.d_model, n_heads=cfg.n_heads, head_dim=cfg.dh,
                                         max_seq_len=cfg.max_seq_len, rope=cfg.rope)
        block = BLOCKS[cfg.norm_placement]
        self.layers = nn.ModuleList(
            block(
                Attention(cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.dh, layer_idx=i,
                          pattern=patterns[cfg.layer_pattern(i)], qkv_bias=cfg.qkv_bias, out_bias=cfg.out_bias,
                          scale=cfg.attn_scale, kernel=cfg.attn_kernel, dropout=cfg.attn_dropout),
                ffn_for(cfg, i), norm_for(cfg), norm_for(cfg), dropout=cfg.dropout)
            for i in range(cfg.n_layers))
        self.final_norm = norm_for(cfg) if cfg.final_norm else nn.Identity()

    def forward(self, x: torch.Tensor, ctx: AttnContext, cache: KVCache | None) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, ctx, cache)
        return self.final_norm(x)


def position_ids_from_mask(attention_mask: torch.Tensor, T: int) -> torch.Tensor:
    """Positions that skip left padding: cumsum(mask) - 1 over the whole (cached + new) mask, last T kept.
    [B, S_total] -> [B, T]."""
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.clamp(min=0)[:, -T:]


class Model(nn.Module):
    """A decoder-only language model built from a :class:`ModelConfig`."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embed = Embeddings(cfg.vocab_size, cfg.d_model,
                                norm_for(cfg) if cfg.embed_norm else nn.Identity(), cfg.dropout)
        self.decoder = Stack(cfg, causal=True)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=cfg.head_bias)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.tokens.weight

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache: KVCache | None = None,
                use_cache: bool = False) -> ModelOutput:
        """input_ids [B, T] (long); attention_mask [B, S_total] over cached + new tokens (1 = real, 0 = padding);
        position_ids [B, T] (default: from the mask, skipping left padding)."""
        B, T = check_input_ids(input_ids, self.config.vocab_size)
        if cache is None and use_cache:
            cache = KVCache()
        past = cache.length if cache is not None else 0
        key_padding = None
        if attention_mask is not None:
            if attention_mask.shape != (B, past + T):
                raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}; expected "
                                 f"{(B, past + T)} = (batch, cached {past} + new {T} tokens)")
            key_padding = attention_mask.bool()
            if bool(key_padding.all()):
                key_padding = None
        if position_ids is None:
            if attention_mask is not None:
                position_ids = position_ids_from_mask(attention_mask, T)
            else:
                position_ids = torch.arange(past, past + T, device=input_ids.device).expand(B, T)
        positions = self.decoder.positions
        x = self.embed(input_ids, positions, position_ids)
        ctx = AttnContext(past, T, positions, position_ids, key_padding, causal=True, device=input_ids.device)
        h = self.decoder(x, ctx, cache)
        if cache is not None:
            cache.advance(T)
        return ModelOutput(self.lm_head(h), h, aux_loss(self, h), cache)


def check_input_ids(input_ids: torch.Tensor, vocab_size: int) -> tuple[int, int]:
    """Validate token ids [B, T]: integer dtype and inside the vocabulary."""
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, seq]; got shape {tuple(input_ids.shape)}")
    if input_ids.dtype not in (torch.long, torch.int, torch.int16, torch.uint8):
        raise ValueError(f"input_ids must hold integer token ids; got dtype {input_ids.dtype}")
    if input_ids.numel() and input_ids.device.type != "meta":
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= vocab_size:
            raise ValueError(f"input_ids: token id {hi if hi >= vocab_size else lo} is outside the vocabulary "
                             f"[0, {vocab_size}); check the tokenizer matches the model")
    return input_ids.shape[0], input_ids.shape[1]


def init_weights(model: nn.Module, std: float, n_layers: int) -> None:
    """Normal(0, std) for matrices and embeddings, zeros for biases, ones for norm gains; output projections of
    residual branches get std / sqrt(2L) (GPT-2's scaled init)."""
    residual_std = std / math.sqrt(2 * n_layers)
    for name, p in model.named_parameters():
        if p.dim() >= 2:
            is_residual_out = name.endswith(("attn.out.weight", "ffn.down.weight", "experts.down"))
            nn.init.normal_(p, 0.0, residual_std if is_residual_out else std)
        elif name.endswith("bias"):
            nn.init.zeros_(p)
        else:
            nn.init.ones_(p)


def build(cfg: ModelConfig, dtype: torch.dtype | None = None, device: str | torch.device | None = None) -> Model:
    """Build and initialise a model. ``device="meta"`` allocates nothing (for counting and analysis)."""
    if not isinstance(cfg, ModelConfig):
        raise TypeError(f"build() takes a ModelConfig, got {type(cfg).__name__}; use llmarch.preset(name)")
    with torch.device(device or "cpu"):
        model = Model(cfg)
    if str(device) != "meta":
        with torch.no_grad():
            init_weights(model, cfg.init_std, cfg.n_layers)
    if dtype is not None:
        model = model.to(dtype)
    return model
