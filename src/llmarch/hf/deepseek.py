"""model_types "deepseek_v2" and "deepseek_v3": multi-head latent attention, RMSNorm, SwiGLU, RoPE (optionally
yarn, whose ``mscale_all_dim`` also scales the softmax). Checkpoints store the rope dims of each query head and of
the shared rope key as interleaved pairs (2i, 2i+1); ours rotates half-split pairs (i, i + Dr/2), so those rows
are permuted on the way in and back on the way out.

MoE (DeepSeekMoE): layers i >= ``first_k_dense_replace`` hold ``n_routed_experts`` fine-grained SwiGLU experts of
width ``moe_intermediate_size`` (softmax router in fp32, top ``num_experts_per_tok``, weights not renormalised and
multiplied by ``routed_scaling_factor``; ``topk_method`` "greedy" or "group_limited_greedy" over ``n_group`` /
``topk_group``) plus ``n_shared_experts`` always-on experts fused into one SwiGLU; the other layers are dense SwiGLU
of ``intermediate_size``. Settings transformers ignores (``moe_layer_freq`` != 1, ``norm_topk_prob``,
``scoring_func`` other than softmax) are refused rather than guessed."""
from __future__ import annotations

import torch

from llmarch.config import ModelConfig
from llmarch.hf.base import FAMILIES, Family, activation_from_hf, activation_to_hf, require, rope_dict, rope_from_hf, \
    rope_to_hf, tokens_from_hf, tokens_to_hf
from llmarch.hf.convert import cat_rows, rule, split_rows
from llmarch.hf.moe import experts_rule, per_layer_rules
from llmarch.moe_config import MoEConfig

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
        moe = self.moe_from_hf(hf, L)
        if hf.get("num_key_value_heads") not in (None, H):
            raise ValueError("config.json num_key_value_heads must equal num_attention_heads for latent attention")
        rope = rope_from_hf(hf)
        params = rope_dict(hf)
        mscale_all_dim = float(params.get("mscale_all_dim") or 0.0)
        if rope["scaling"] == "yarn" and "attention_factor" not in rope:
            mscale = params.get("mscale")
            if mscale and mscale_all_dim:  # transformers: cos/sin scale = mscale(factor, mscale) / mscale(.., all)
                rope["attention_factor"] = _mscale(rope["factor"], mscale) / _mscale(rope["factor"], mscale_all_dim)
        bias = bool(hf.get("attention_bias", False))
        if moe is not None and hf.get("mlp_bias"):
            raise ValueError("config.json mlp_bias=true with MoE layers is not supported (experts have no biases)")
        fixed = dict(DEEPSEEK_FIXED, ffn="moe") if moe is not None else DEEPSEEK_FIXED
        return ModelConfig(**fixed, moe=moe, vocab_size=vocab, d_model=d, n_layers=L, n_heads=H, d_ff=F,
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
                    v_head_dim=m.v_head_dim, **self.moe_to_hf(cfg), **self.extra(cfg), **tokens_to_hf(cfg))

    def extra(self, cfg) -> dict:
        return {}

    def moe_from_hf(self, hf, n_layers: int) -> MoEConfig | None:
        """The MoEConfig of a DeepSeek-V2 config.json, or None when every layer is dense."""
        first_dense = int(hf.get("first_k_dense_replace") or 0)
        if first_dense >= n_layers:  # transformers: layer i is MoE iff i >= first_k_dense_replace
            return None
        # DeepseekV2Config's defaults for absent keys: 64 routed experts (alias num_experts), width 1407, 2 shared
        E = hf.get("n_routed_experts", hf.get("num_experts", 64))
        Fe = hf.get("moe_intermediate_size", 1407)
        (K,) = require(hf, "num_experts_per_tok")
        if not E:
            raise ValueError(f"config.json n_routed_experts={E!r}: layers from first_k_dense_replace="
                             f"{first_dense} on are MoE in transformers; give n_routed_experts >= 1")
        refused = {"moe_layer_freq": (hf.get("moe_layer_freq", 1), 1),
                   "norm_topk_prob": (bool(hf.get("norm_topk_prob")), False),
                   "scoring_func": (hf.get("scoring_func", "softmax"), "softmax")}
        for name, (value, needed) in refused.items():
            if value != needed:
                raise ValueError(f"config.json {name}={value!r} is not supported for {self.model_type} (transformers "
                                 f"ignores it, so its meaning is not fixed); only {name}={needed!r}")
        method = hf.get("topk_method") or "greedy"
        if method not in ("greedy", "group_limited_greedy"):
            raise ValueError(f"config.json topk_method={method!r} is not supported for {self.model_type}; "
                             "supported: greedy, group_limited_greedy")
        shared = int(hf.get("n_shared_experts", 2) or 0)
        if shared < 1:
            raise ValueError("config.json n_shared_experts must be >= 1 (transformers always builds the shared "
                             "experts)")
        groups = dict(n_groups=int(hf["n_group"]), topk_groups=int(hf["topk_group"])) \
            if method == "group_limited_greedy" else {}
        return MoEConfig(n_experts=int(E), top_k=int(K), d_ff=int(Fe), router="softmax_topk", n_shared=shared,
                         first_dense=first_dense, routed_scale=float(hf.get("routed_scaling_factor", 1.0)),
                         balance_coef=float(hf.get("aux_loss_alpha", 0.001)), **groups)

    def moe_to_hf(self, cfg) -> dict:
        m = cfg.moe
        if m is None:
            return dict(first_k_dense_replace=cfg.n_layers)
        return dict(first_k_dense_replace=m.first_dense, n_routed_experts=m.n_experts, num_experts_per_tok=m.top_k,
                    moe_intermediate_size=m.expert_d_ff(cfg.d_ff), n_shared_experts=m.n_shared,
                    routed_scaling_factor=m.routed_scale, norm_topk_prob=False, moe_layer_freq=1,
                    scoring_func="softmax", aux_loss_alpha=m.balance_coef,
                    topk_method="greedy" if m.n_groups == 1 else "group_limited_greedy",
                    n_group=m.n_groups if m.n_groups > 1 else None, topk_group=m.topk_groups)

    def accepts_moe(self, cfg) -> str | None:
        m = cfg.moe
        if m.router != "softmax_topk" or m.expert_ffn != "glu" or m.router_bias or m.jitter:
            return (f"{self.model_type} routes with softmax then top-k, not renormalised (router 'softmax_topk'), "
                    "over SwiGLU experts with an unbiased, noise-free router")
        if m.capacity_factor is not None or m.expert_capacity is not None:
            return f"{self.model_type} is dropless (no expert capacity)"
        if m.every != 1 or m.offset:
            return f"{self.model_type} has experts on every layer from first_k_dense_replace on (every=1, offset=0)"
        if m.n_shared < 1 or m.shared_gate or m.shared_d_ff not in (None, m.expert_d_ff(cfg.d_ff)):
            return (f"{self.model_type} has n_shared >= 1 ungated shared experts of the routed experts' width "
                    "(shared_d_ff None)")
        return None

    def accepts(self, cfg):
        if cfg.moe is not None:
            reason = self.accepts_moe(cfg)
            if reason:
                return reason
            cfg = cfg.replace(ffn="glu", moe=None)
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
        return rules if cfg.moe is None else per_layer_rules(rules, cfg, lambda i: moe_rules(cfg, i),
                                                             lambda i: dense_rules(cfg, i))


def moe_rules(cfg: ModelConfig, i: int) -> list:
    """Layer i's MoE FFN: router ``gate``, per-expert SwiGLU tensors stacked, the fused shared experts."""
    m = cfg.moe
    E, Fe = m.n_experts, m.expert_d_ff(cfg.d_ff)
    Fs = m.n_shared * Fe
    p, o = f"layers.{i}.mlp.", f"decoder.layers.{i}.ffn."
    s = p + "shared_experts."
    return [rule(o + "router.proj.weight", p + "gate.weight"),
            experts_rule(o + "experts.gate_up", [p + "experts.{e}.gate_proj.weight", p + "experts.{e}.up_proj.weight"],
                         [Fe, Fe], E),
            experts_rule(o + "experts.down", [p + "experts.{e}.down_proj.weight"], None, E),
            rule(o + "shared.ffn.gate_up.weight", s + "gate_proj.weight", s + "up_proj.weight", to_ours=cat_rows,
                 to_theirs=split_rows([Fs, Fs])),
            rule(o + "shared.ffn.down.weight", s + "down_proj.weight")]


def dense_rules(cfg: ModelConfig, i: int) -> list:
    p, o, F = f"layers.{i}.mlp.", f"decoder.layers.{i}.ffn.", cfg.d_ff
    return [rule(o + "gate_up.weight", p + "gate_proj.weight", p + "up_proj.weight", to_ours=cat_rows,
                 to_theirs=split_rows([F, F])),
            rule(o + "down.weight", p + "down_proj.weight")]


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

    def moe_from_hf(self, hf, n_layers):
        if int(hf.get("first_k_dense_replace") or 0) < n_layers and hf.get("n_routed_experts"):
            raise ValueError(f"config.json first_k_dense_replace={hf.get('first_k_dense_replace')} < "
                             f"num_hidden_layers={n_layers}: deepseek_v3 MoE layers (sigmoid router with "
                             "e_score_correction_bias, group-limited top-k) are not supported; only all-dense "
                             "deepseek_v3 configs load")
        return None

    def accepts_moe(self, cfg):
        return "deepseek_v3 MoE layers (sigmoid router with a score correction bias) are not supported"
