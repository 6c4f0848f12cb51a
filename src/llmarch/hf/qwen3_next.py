"""model_type "qwen3_next" (Qwen3-Next; Qwen team 2025): a hybrid whose ``layer_types`` interleave gated delta
layers ("linear_attention", our ``gated_delta``) with gated full attention ("full_attention", our
``gated_attention``: doubled q projection giving a sigmoid output gate, per-head q/k norms, partial rotary);
zero-centred RMSNorms (1 + w) everywhere except the gated norm of the delta layers; FFNs as qwen2_moe (routed
SwiGLU experts + a sigmoid-gated shared expert, or dense SwiGLU off the ``decoder_sparse_step`` grid).

Checkpoint layouts: ``q_proj`` holds each head's query then its gate ([H, 2, Dh] rows); ``in_proj_qkvz`` holds,
per q/k head group, [q (Dk) | k (Dk) | v (r·Dv) | z (r·Dv)] with r = Hv / Hk, and ``in_proj_ba`` per group
[b (r) | a (r)]; ours are [q | gate | k | v], [q | k | v | z] and [b | a] (named transforms below)."""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from llmarch.hf.base import FAMILIES, activation_from_hf, require
from llmarch.hf.convert import Rule, cat_rows, rule, split_rows
from llmarch.hf.llama import LlamaLike
from llmarch.hf.qwen2_moe import Qwen2Moe
from llmarch.linear_config import LinearMixerConfig

MIXER_FROM_HF = {"linear_attention": "gated_delta", "full_attention": "gated_attention"}
MIXER_TO_HF = {v: k for k, v in MIXER_FROM_HF.items()}
Tensor = torch.Tensor


def interleave_groups(sizes: Sequence[int], groups: int) -> tuple[Callable, Callable]:
    """Rows grouped per head (``groups`` groups of [part_0 (sizes[0]/groups) | part_1 | ...]) <-> ours, the parts
    each contiguous ([part_0 | part_1 | ...], sizes[i] rows each). Works on weights [rows, in] and biases [rows]."""
    per = [s // groups for s in sizes]

    def to_ours(ts: Sequence[Tensor]) -> Tensor:
        t = ts[0]
        parts = t.reshape(groups, sum(per), *t.shape[1:]).split(per, dim=1)
        return torch.cat([p.reshape(-1, *t.shape[1:]) for p in parts], dim=0)

    def to_theirs(t: Tensor) -> list[Tensor]:
        parts = [p.reshape(groups, n, *t.shape[1:]) for p, n in zip(t.split(list(sizes), dim=0), per)]
        return [torch.cat(parts, dim=1).reshape(t.shape).contiguous()]

    return to_ours, to_theirs


def gated_q_rules(i: int, H: int, G: int, Dh: int, bias: bool) -> list[Rule]:
    """Our fused [q | gate | k | v] from q_proj ([H, 2, Dh] rows), k_proj, v_proj."""
    q_ours, q_theirs = interleave_groups([H * Dh, H * Dh], H)
    sizes = [2 * H * Dh, G * Dh, G * Dh]

    def to_ours(ts: Sequence[Tensor]) -> Tensor:
        return cat_rows([q_ours([ts[0]]), ts[1], ts[2]])

    def to_theirs(t: Tensor) -> list[Tensor]:
        q, k, v = split_rows(sizes)(t)
        return [q_theirs(q)[0], k, v]

    p, o = f"layers.{i}.self_attn.", f"decoder.layers.{i}.attn."
    rules = [rule(o + "qkv.weight", *[f"{p}{n}_proj.weight" for n in "qkv"], to_ours=to_ours, to_theirs=to_theirs),
             rule(o + "q_norm.weight", p + "q_norm.weight"), rule(o + "k_norm.weight", p + "k_norm.weight"),
             rule(o + "out.weight", p + "o_proj.weight")]
    if bias:
        rules += [rule(o + "qkv.bias", *[f"{p}{n}_proj.bias" for n in "qkv"], to_ours=to_ours, to_theirs=to_theirs),
                  rule(o + "out.bias", p + "o_proj.bias")]
    return rules


def gated_delta_rules(i: int, m: LinearMixerConfig) -> list[Rule]:
    Hk, Hv, Dk, Dv = m.n_k_heads, m.n_v_heads, m.k_head_dim, m.v_head_dim
    qkvz = interleave_groups([Hk * Dk, Hk * Dk, Hv * Dv, Hv * Dv], Hk)
    ba = interleave_groups([Hv, Hv], Hk)
    p, o = f"layers.{i}.linear_attn.", f"decoder.layers.{i}.attn."
    return [rule(o + "qkvz.weight", p + "in_proj_qkvz.weight", to_ours=qkvz[0], to_theirs=qkvz[1]),
            rule(o + "ba.weight", p + "in_proj_ba.weight", to_ours=ba[0], to_theirs=ba[1]),
            rule(o + "conv.weight", p + "conv1d.weight"), rule(o + "dt_bias", p + "dt_bias"),
            rule(o + "A_log", p + "A_log"), rule(o + "norm.weight", p + "norm.weight"),
            rule(o + "out.weight", p + "out_proj.weight")]


def compress_schedule(types: Sequence[str]) -> tuple[str, ...]:
    """The shortest prefix whose repetition gives ``types`` (a 3:1 schedule of 48 layers -> 4 entries)."""
    n = len(types)
    for p in range(1, n + 1):
        if n % p == 0 and list(types[:p]) * (n // p) == list(types):
            return tuple(types[:p])
    return tuple(types)


@FAMILIES.register("qwen3_next")
class Qwen3Next(Qwen2Moe):
    model_type, architecture = "qwen3_next", "Qwen3NextForCausalLM"
    # mtp.*: the multi-token-prediction head of released checkpoints, which transformers does not run either
    ignore = LlamaLike.ignore + (r"^mtp\.",)

    def biases(self, hf):
        bias = bool(hf.get("attention_bias", False))
        return dict(qkv_bias=bias, out_bias=bias, ffn_bias=False)

    def windows(self, hf, L):
        return dict(pattern=("dense",), window=None)

    def to_config(self, hf):
        L, Hk, Hv, Dk, Dv = require(hf, "num_hidden_layers", "linear_num_key_heads", "linear_num_value_heads",
                                    "linear_key_head_dim", "linear_value_head_dim")
        types = hf.get("layer_types") or ["linear_attention" if (i + 1) % int(hf.get("full_attention_interval", 4))
                                          else "full_attention" for i in range(L)]
        unknown = sorted(set(types) - set(MIXER_FROM_HF))
        if unknown:
            raise ValueError(f"config.json layer_types {unknown} are not supported; supported: {sorted(MIXER_FROM_HF)}")
        hf = dict(hf, head_dim=hf.get("head_dim", 256))
        params = dict(hf.get("rope_parameters") or {})
        params.setdefault("partial_rotary_factor", hf.get("partial_rotary_factor", 0.25))  # the model's default
        hf["rope_parameters"] = params
        linear = LinearMixerConfig(n_k_heads=Hk, n_v_heads=Hv, k_head_dim=Dk, v_head_dim=Dv,
                                   conv_kernel=int(hf.get("linear_conv_kernel_dim", 4)))
        if int(hf.get("num_experts", 0)) > 0:
            cfg = super().to_config(hf)
        else:
            cfg = LlamaLike.to_config(self, hf)
        activation_from_hf(hf.get("hidden_act", "silu"))
        return cfg.replace(norm="rmsnorm_zero", mixer="gated_attention", linear=linear,
                           layer_mixers=compress_schedule([MIXER_FROM_HF[t] for t in types]))

    def from_config(self, cfg):
        base = LlamaLike.from_config(self, cfg)
        m = cfg.linear
        out = dict(base, attention_bias=cfg.qkv_bias, linear_num_key_heads=m.n_k_heads,
                   linear_num_value_heads=m.n_v_heads, linear_key_head_dim=m.k_head_dim,
                   linear_value_head_dim=m.v_head_dim, linear_conv_kernel_dim=m.conv_kernel,
                   layer_types=[MIXER_TO_HF[cfg.layer_mixer(i)] for i in range(cfg.n_layers)], num_experts=0)
        out["rope_parameters"] = dict(out["rope_parameters"], partial_rotary_factor=cfg.rope.fraction)
        out.pop("mlp_bias", None)
        if cfg.moe is not None:
            moe = Qwen2Moe.from_config(self, cfg)
            for key in ("num_experts", "num_experts_per_tok", "moe_intermediate_size",
                        "shared_expert_intermediate_size", "norm_topk_prob", "decoder_sparse_step",
                        "mlp_only_layers", "router_aux_loss_coef", "output_router_logits"):
                out[key] = moe[key]
        return out

    def accepts(self, cfg):
        if cfg.norm != "rmsnorm_zero":
            return f"qwen3_next norms are zero-centred RMSNorms: norm='rmsnorm_zero', config has {cfg.norm!r}"
        if not set(cfg.mixers) <= set(MIXER_TO_HF):
            return f"qwen3_next layers are {sorted(MIXER_TO_HF)}, config has {list(cfg.mixers)}"
        if cfg.qkv_bias != cfg.out_bias:
            return "qwen3_next has one attention_bias for q/k/v and o"
        plain = cfg.replace(norm="rmsnorm", mixer="attention", layer_mixers=(), qkv_bias=True, out_bias=False)
        if cfg.moe is None:
            return LlamaLike.accepts(self, plain)
        return super().accepts(plain)

    def rules(self, cfg):
        base = super().rules(cfg) if cfg.moe is not None else LlamaLike.rules(self, cfg)
        rules = [r for r in base if not r.ours.startswith("decoder.layers.{layer}.attn.")]
        for i in range(cfg.n_layers):
            if cfg.layer_mixer(i) == "gated_delta":
                rules += gated_delta_rules(i, cfg.linear)
            else:
                rules += gated_q_rules(i, cfg.n_heads, cfg.kv_heads, cfg.dh, cfg.qkv_bias)
        return rules
