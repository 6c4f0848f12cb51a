"""The token mixer of each block (the ``mixer`` config value): multi-head attention with grouped kv heads, the
same with a second projection set for global rows (Longformer), or multi-head latent attention. Each entry builds
its module from the config and names the cache it fills."""
from __future__ import annotations

from torch import nn

from llmarch.nn.attention import Attention
from llmarch.nn.cache import KVCache, LatentCache, StateCache
from llmarch.nn.global_attention import GlobalProjectionAttention
from llmarch.nn.latent_attention import LatentAttention
from llmarch.nn.mamba2 import Mamba2Mixer
from llmarch.nn.mixture import build_mixture, linear_component
from llmarch.nn.patterns import Pattern
from llmarch.registry import Registry

MIXERS: Registry[type["Mixer"]] = Registry("mixer")


class Mixer:
    cache: type[KVCache] = KVCache

    @staticmethod
    def build(cfg, layer: int, pattern: Pattern) -> nn.Module:
        raise NotImplementedError


def layer_scale(cfg, layer: int) -> float | None:
    """The score scale of layer ``layer``: ``attn_scale`` (None = 1/sqrt(Dh)), divided by layer + 1 when
    ``attn_scale_by_layer`` (GPT-2's option for training stability: deeper layers get flatter scores)."""
    if not cfg.attn_scale_by_layer:
        return cfg.attn_scale
    base = cfg.dh ** -0.5 if cfg.attn_scale is None else cfg.attn_scale
    return base / (layer + 1)


@MIXERS.register("attention")
class AttentionMixer(Mixer):
    """MHA / GQA / MQA (``n_kv_heads``)."""

    @staticmethod
    def build(cfg, layer, pattern):
        return Attention(cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.dh, layer_idx=layer, pattern=pattern,
                         qkv_bias=cfg.qkv_bias, out_bias=cfg.out_bias, scale=layer_scale(cfg, layer),
                         kernel=cfg.attn_kernel,
                         dropout=cfg.attn_dropout, execution=cfg.sparse.execution, block=cfg.sparse.block)


@MIXERS.register("longformer")
class LongformerMixer(Mixer):
    """MHA / GQA whose global rows (the pattern's global tokens) use their own ``qkv_global`` projections."""

    @staticmethod
    def build(cfg, layer, pattern):
        return GlobalProjectionAttention(cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.dh, layer_idx=layer,
                                         pattern=pattern, qkv_bias=cfg.qkv_bias, out_bias=cfg.out_bias,
                                         scale=cfg.attn_scale, kernel=cfg.attn_kernel, dropout=cfg.attn_dropout,
                                         execution=cfg.sparse.execution, block=cfg.sparse.block)


@MIXERS.register("latent")
class LatentMixer(Mixer):
    """MLA (``mla`` sub-config); the softmax scale grows by the yarn mscale^2 when ``mla.mscale_all_dim`` is set."""

    cache = LatentCache

    @staticmethod
    def build(cfg, layer, pattern):
        m = cfg.mla
        scale = cfg.attn_scale
        if scale is None:
            scale = m.qk_head_dim ** -0.5
            if m.mscale_all_dim and cfg.rope.scaling != "none" and cfg.rope.factor > 1:
                import math

                mscale = 0.1 * m.mscale_all_dim * math.log(cfg.rope.factor) + 1.0
                scale = scale * mscale * mscale
        return LatentAttention(cfg.d_model, cfg.n_heads, kv_lora_rank=m.kv_lora_rank, q_lora_rank=m.q_lora_rank,
                               qk_nope_head_dim=m.qk_nope_head_dim, qk_rope_head_dim=m.qk_rope_head_dim,
                               v_head_dim=m.v_head_dim, layer_idx=layer, pattern=pattern,
                               latent_norm_eps=m.latent_norm_eps, qkv_bias=cfg.qkv_bias, out_bias=cfg.out_bias,
                               scale=scale, absorb=m.absorb, kernel=cfg.attn_kernel, dropout=cfg.attn_dropout,
                               execution=cfg.sparse.execution, block=cfg.sparse.block)


@MIXERS.register("mamba2")
class Mamba2Entry(Mixer):
    """Mamba-2 SSD (``ssm`` sub-config); a fixed-size conv + SSM state per layer."""

    cache = StateCache

    @staticmethod
    def build(cfg, layer, pattern):
        s = cfg.ssm
        return Mamba2Mixer(cfg.d_model, d_state=s.d_state, n_groups=s.n_groups, expand=s.expand,
                           head_dim=s.head_dim, conv_kernel=s.conv_kernel, layer_idx=layer, form=s.form,
                           chunk_size=s.chunk_size, proj_bias=s.proj_bias, conv_bias=s.conv_bias,
                           norm_eps=cfg.norm_eps, time_step_limit=s.time_step_limit,
                           time_step_range=(s.time_step_min, s.time_step_max, s.time_step_floor))


@MIXERS.register("linear")
class LinearEntry(Mixer):
    """Causal linear attention, φ = elu + 1 (heads of the attention fields; form and chunk from ``ssm``)."""

    cache = StateCache

    @staticmethod
    def build(cfg, layer, pattern):
        return linear_component(cfg, layer, pattern)


@MIXERS.register("mixture")
class MixtureEntry(Mixer):
    """Several mixers weighted per token by a softmax controller (``mixture`` sub-config)."""

    cache = StateCache

    @staticmethod
    def build(cfg, layer, pattern):
        return build_mixture(cfg, layer, pattern)
