"""Mixer entries of the hybrid models (Qwen3-Next): ``gated_delta`` (sizes from the ``linear`` sub-config; a
:class:`~llmarch.nn.cache.StateCache`) and ``gated_attention`` (attention with an output gate and q/k norms of the
model's ``norm`` kind)."""
from __future__ import annotations

from llmarch.nn.cache import StateCache
from llmarch.nn.gated_attention import GatedAttention
from llmarch.nn.linear.gated_delta import GatedDeltaNet
from llmarch.nn.mixers import MIXERS, Mixer


@MIXERS.register("gated_delta")
class GatedDeltaMixer(Mixer):
    """Gated delta rule (Yang et al. 2024), linear time, constant state per layer."""

    cache = StateCache

    @staticmethod
    def build(cfg, layer, pattern):
        m = cfg.linear
        return GatedDeltaNet(cfg.d_model, m.n_k_heads, m.n_v_heads, m.k_head_dim, m.v_head_dim,
                             conv_kernel=m.conv_kernel, layer_idx=layer, chunk_size=m.chunk_size, eps=cfg.norm_eps)


@MIXERS.register("gated_attention")
class GatedAttentionMixer(Mixer):
    """MHA / GQA with a sigmoid output gate and per-head q/k norms (Qiu et al. 2025)."""

    @staticmethod
    def build(cfg, layer, pattern):
        return GatedAttention(cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.dh, norm=cfg.norm, norm_eps=cfg.norm_eps,
                              layer_idx=layer, pattern=pattern, qkv_bias=cfg.qkv_bias, out_bias=cfg.out_bias,
                              scale=cfg.attn_scale, kernel=cfg.attn_kernel, dropout=cfg.attn_dropout,
                              execution=cfg.sparse.execution, block=cfg.sparse.block)
