"""model_types "deepseek_v2" and "deepseek_v3": multi-head latent attention, RMSNorm, SwiGLU, RoPE (optionally
yarn, whose ``mscale_all_dim`` also scales the softmax). Checkpoints store the rope dims of each query head and of
the shared rope key as interleaved pairs (2i, 2i+1); ours rotates half-split pairs (i, i + Dr/2), so those rows
are permuted on the way in and back on the way out. Only dense-FFN layers are supported for now
(``first_k_dense_replace = num_hidden_layers``): the MoE layers arrive with the mixture-of-experts FFN."""
from __future__ import annotations

import torch

from llmarch.config import ModelConfig
from llmarch.hf.base import FAMILIES, Family, activation_from_hf, activation_to_hf, require, rope_from_hf, \
    rope_to_hf, tokens_from_hf, tokens_to_hf
from llmarch.hf.convert import cat_rows, rule, split_rows

DEEPSEEK_FIXED = dict(kind="decoder", mixer="latent", norm="rmsnorm", norm_bias=False, norm_placement="pre",
                      ffn="glu", position="rope", embed_norm=False, final_norm=True, head_bias=False, attn_scale=None,
                      pattern=("dense",), window=None, n_kv_heads=None, head_dim=None)
HF_LATENT_NORM_EPS = 1e-6  # the q/kv latent RMSNorms in transformers take no eps from the config


def rope_pairs_to_halves(groups: int, rope_dim: int):
    """Rows laid out per group as [.. | rope (Dr) interleaved] -> [.. | rope half-split], and back."""
    perm = torch.cat([torch.arange(0, rope_dim, 2), torch.arange(1, rope_dim, 2)])
    inverse = torch.argsort(perm)

    def apply(t: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
        g = t.reshape(groups, -1, *t.shape[1:]).clone()
        g[:, -rope_dim:] = g[:, -rope_dim:][:, order]
        return g.reshape(t.shape).contiguous()

    return dict(to_ours=lambda ts: apply(ts[0], perm), to_theirs=lambda t: [apply(t, inverse)])


class DeepseekLike(Family):
    prefixes = ("model.",)
    # rotary_emb.inv_freq: a recomputed buffer stored by some older checkpoints
    ignore = (r"rotary_emb\.inv_freq$",)

    def to_config(self, hf):
        vocab, d, L, H, F, n_pos = require(hf, "vocab_size", "hidden_size", "num_hidden_layers",
                                           "num_attention_heads", "intermediate_size", "max_position_embeddings")
        R, Dr, Dn, Dv = require(hf, "kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim")
        if hf.get("rope_interleave", True) is False:
            raise ValueError("config.json rope_interleave=false is not supported (only interleaved rope pairs)")
        dense_layers = hf.get("first_k_dense_replace", 0)
        if dense_layers < L and hf.get("n_routed_experts"):
            raise ValueError(f"config.json first_k_dense_replace={dense_layers} < num_hidden_layers={L}: MoE layers "
                             "are not supported yet (they come with the mixture-of-experts FFN)")
        if hf.get("num_key_value_heads") not in (None, H):
            raise ValueError("config.json num_key_value_heads must equal num_attention_heads for latent attention")
        rope = rope_from_hf(hf)
        params = {**(hf.get("rope_scaling") or {}), **(hf.get("rope_parameters") or {})}
        mscale_all_dim = float(params.get("mscale_all_dim") or 0.0)
        if rope["scaling"] == "yarn" and "attention_factor" not in rope:
            mscale = params.get("mscale")
            if mscale and mscale_all_dim:  # transformers: cos/sin scale = mscale(factor, mscale) / mscale(.., all)
                rope["attention_factor"] = _mscale(rope["factor"], mscale) / _mscale(rope["factor"], mscale_all_dim)
        bias = bool(hf.get("attention_bias", False))
        return ModelConfig(**DEEPSEEK_FIXED, vocab_size=vocab, d_model=d, n_layers=L, n_heads=H, d_ff=F,
                           max_seq_len=n_pos, norm_eps=hf.get("rms_norm_eps", 1e-6),
                           activation=activation_from_hf(hf.get("hidden_act", "silu")), rope=rope,
                           tie_embeddings=bool(hf.get("tie_word_embeddings", False)), qkv_bias=bias, out_bias=bias,
                           ffn_bias=bool(hf.get("mlp_bias", False)),
                           mla=dict(kv_lora_rank=R, q_lora_rank=hf.get("q_lora_rank"), qk_rope_head_dim=Dr,
                                    qk_nope_head_dim=Dn, v_head_dim=Dv, mscale_all_dim=mscale_all_dim,
                                    latent_norm_eps=HF_LATENT_NORM_EPS),
                           **tokens_from_hf(hf, vocab))

    def from_config(self, cfg):
        m = cfg.mla
        rope = rope_to_hf(cfg)
        if m.mscale_all_dim:
            rope["mscale_all_dim"] = m.mscale_all_dim
        return dict(model_type=self.model_type, architectures=[self.architecture], vocab_size=cfg.vocab_size,
                    hidden_size=cfg.d_model, intermediate_size=cfg.d_ff, num_hidden_layers=cfg.n_layers,
                    num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_heads,
                    max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps,
                    hidden_act=activation_to_hf(cfg.activation), rope_parameters=rope,
                    tie_word_embeddings=cfg.tie_embeddings, attention_bias=cfg.qkv_bias, mlp_bias=cfg.ffn_bias,
                    attention_dropout=0.0, kv_lora_rank=m.kv_lora_rank, q_lora_rank=m.q_lora_rank,
                    qk_rope_head_dim=m.qk_rope_head_dim, qk_nope_head_dim=m.qk_nope_head_dim,
                    v_head_dim=m.v_head_dim, first_k_dense_replace=cfg.n_layers, **self.extra(cfg),
                    **tokens_to_hf(cfg))

    def extra(self, cfg) -> dict:
        return {}

    def accepts(self, cfg):
        for k, v in DEEPSEEK_FIXED.items():
            if getattr(cfg, k) != v:
                return f"{self.model_type} needs {k}={v!r}, config has {getattr(cfg, k)!r}"
        if cfg.qkv_bias != cfg.out_bias:
            return f"{self.model_type} has one attention_bias for the q/kv down-projections and o"
        if cfg.mla.latent_norm_eps != HF_LATENT_NORM_EPS:
            return f"{self.model_type} fixes the latent norms' eps at {HF_LATENT_NORM_EPS}"
        if cfg.d_model % cfg.n_heads:
            return f"{self.model_type} needs n_heads to divide d_model"
        return None

    def rules(self, cfg):
        m, H, F = cfg.mla, cfg.n_heads, cfg.d_ff
        layer, t = "decoder.layers.{layer}.", "layers.{layer}."
        q_rope = rope_pairs_to_halves(H, m.qk_rope_head_dim)
        k_rope = rope_pairs_to_halves(1, m.qk_rope_head_dim)
        rules = [rule("embed.tokens.weight", "embed_tokens.weight"),
                 rule(f"{layer}attn_norm.weight", f"{t}input_layernorm.weight"),
                 rule(f"{layer}ffn_norm.weight", f"{t}post_attention_layernorm.weight"),
                 rule(f"{layer}attn.kv_down.weight", f"{t}self_attn.kv_a_proj_with_mqa.weight", **k_rope),
                 rule(f"{layer}attn.kv_norm.weight", f"{t}self_attn.kv_a_layernorm.weight"),
                 rule(f"{layer}attn.kv_up.weight", f"{t}self_attn.kv_b_proj.weight"),
                 rule(f"{layer}attn.out.weight", f"{t}self_attn.o_proj.weight"),
                 rule(f"{layer}ffn.gate_up.weight", f"{t}mlp.gate_proj.weight", f"{t}mlp.up_proj.weight",
                      to_ours=cat_rows, to_theirs=split_rows([F, F])),
                 rule(f"{layer}ffn.down.weight", f"{t}mlp.down_proj.weight"),
                 rule("decoder.final_norm.weight", "norm.weight")]
        if m.q_lora_rank is None:
            rules.append(rule(f"{layer}attn.q.weight", f"{t}self_attn.q_proj.weight", **q_rope))
        else:
            rules += [rule(f"{layer}attn.q.down.weight", f"{t}self_attn.q_a_proj.weight"),
                      rule(f"{layer}attn.q.norm.weight", f"{t}self_attn.q_a_layernorm.weight"),
                      rule(f"{layer}attn.q.up.weight", f"{t}self_attn.q_b_proj.weight", **q_rope)]
        if cfg.qkv_bias:
            rules += [rule(f"{layer}attn.kv_down.bias", f"{t}self_attn.kv_a_proj_with_mqa.bias", **k_rope),
                      rule(f"{layer}attn.out.bias", f"{t}self_attn.o_proj.bias")]
            if m.q_lora_rank is not None:
                rules.append(rule(f"{layer}attn.q.down.bias", f"{t}self_attn.q_a_proj.bias"))
        if cfg.ffn_bias:
            rules += [rule(f"{layer}ffn.gate_up.bias", f"{t}mlp.gate_proj.bias", f"{t}mlp.up_proj.bias",
                           to_ours=cat_rows, to_theirs=split_rows([F, F])),
                      rule(f"{layer}ffn.down.bias", f"{t}mlp.down_proj.bias")]
        if not cfg.tie_embeddings:
            rules.append(rule("lm_head.weight", "lm_head.weight"))
        return rules


def _mscale(factor: float, mscale: float) -> float:
    import math

    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


@FAMILIES.register("deepseek_v2")
class DeepseekV2(DeepseekLike):
    """DeepSeek-V2 always interleaves the rope pairs (complex multiplication in transformers)."""

    model_type, architecture = "deepseek_v2", "DeepseekV2ForCausalLM"


@FAMILIES.register("deepseek_v3")
class DeepseekV3(DeepseekLike):
    """DeepSeek-V3: ``rope_interleave`` (default true) says whether the rope pairs are interleaved; we always
    write interleaved checkpoints."""

    model_type, architecture = "deepseek_v3", "DeepseekV3ForCausalLM"

    def extra(self, cfg):
        return dict(rope_interleave=True)
