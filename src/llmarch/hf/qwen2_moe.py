"""model_type "qwen2_moe" (Qwen1.5-MoE, Qwen2-MoE; Yang et al. 2024): Qwen2 attention; MoE FFNs of fine-grained
SwiGLU experts (softmax, top-k, optionally renormalised) plus one shared expert scaled by a sigmoid gate; layers
listed in ``mlp_only_layers`` or off the ``decoder_sparse_step`` grid are dense SwiGLU of ``intermediate_size``."""
from __future__ import annotations

from llmarch.hf.base import FAMILIES, require
from llmarch.hf.convert import cat_rows, rule, split_rows
from llmarch.hf.llama import Qwen2
from llmarch.hf.moe import experts_rule, moe_on_dense_reason, per_layer_rules, warn_dropped
from llmarch.moe_config import MoEConfig

ROUTER_FROM_NORM = {False: "softmax_topk", True: "softmax_topk_norm"}


@FAMILIES.register("qwen2_moe")
class Qwen2Moe(Qwen2):
    model_type, architecture = "qwen2_moe", "Qwen2MoeForCausalLM"
    default_kv_heads = 16

    def windows(self, hf, L):
        """Qwen2MoeConfig (unlike Qwen2): without layer_types, the even layers below max_window_layers (default
        28) slide when use_sliding_window; the window is sliding_window (default 4096), 0 when not used."""
        use = hf.get("use_sliding_window", False)
        types = hf.get("layer_types")
        if types is None:
            below = hf.get("max_window_layers", 28)
            types = ["sliding_attention" if (i + 1) % 2 and i < below and use else "full_attention"
                     for i in range(L)]
        if not isinstance(types, list) or len(types) != L:
            raise ValueError(f"config.json layer_types={types!r} must list one type per layer "
                             f"(num_hidden_layers={L})")
        pattern = tuple("sliding" if t == "sliding_attention" else "dense" for t in types)
        if "sliding" not in pattern:
            return dict(pattern=("dense",), window=None)
        window = hf.get("sliding_window", 4096) if use else 0
        if not window:
            raise ValueError("config.json sliding_window: layer_types has sliding layers but the window is "
                             f"{window!r} (use_sliding_window={use}); transformers would let them see no keys")
        return dict(pattern=pattern, window=window)

    def to_config(self, hf):
        E, K, Fe, Fs = require(hf, "num_experts", "num_experts_per_tok", "moe_intermediate_size",
                               "shared_expert_intermediate_size")
        if not hf.get("qkv_bias", True):
            raise ValueError("config.json qkv_bias=false is not supported for qwen2_moe (released models have it)")
        step = int(hf.get("decoder_sparse_step", 1))
        dense_layers = hf.get("mlp_only_layers") or []
        if not isinstance(dense_layers, list) or not all(isinstance(i, int) for i in dense_layers):
            raise ValueError(f"config.json mlp_only_layers={dense_layers!r} must be a list of layer indices")
        dense_layers = sorted(dense_layers)
        if dense_layers != list(range(len(dense_layers))):
            raise ValueError(f"config.json mlp_only_layers={dense_layers} is not supported: only a leading run of "
                             "dense layers (0, 1, ..., n-1) maps to moe.first_dense")
        moe = MoEConfig(n_experts=E, top_k=K, d_ff=Fe, router=ROUTER_FROM_NORM[bool(hf.get("norm_topk_prob"))],
                        n_shared=1, shared_d_ff=Fs, shared_gate=True, every=step, offset=step - 1,
                        first_dense=len(dense_layers), balance_coef=float(hf.get("router_aux_loss_coef", 0.001)))
        return super().to_config(hf).replace(ffn="moe", moe=moe)

    def from_config(self, cfg):
        warn_dropped(cfg, self.model_type)
        m = cfg.moe
        Fe = m.expert_d_ff(cfg.d_ff)
        return dict(super().from_config(cfg), num_experts=m.n_experts, num_experts_per_tok=m.top_k,
                    moe_intermediate_size=Fe, shared_expert_intermediate_size=m.n_shared * (m.shared_d_ff or Fe),
                    norm_topk_prob=m.router == "softmax_topk_norm", decoder_sparse_step=m.every,
                    mlp_only_layers=list(range(m.first_dense)), router_aux_loss_coef=m.balance_coef,
                    qkv_bias=True, output_router_logits=False)

    def accepts(self, cfg):
        reason = moe_on_dense_reason(super().accepts, cfg, self.model_type)
        if reason:
            return reason
        m = cfg.moe
        if m.router not in ROUTER_FROM_NORM.values():
            return f"qwen2_moe routes softmax then top-k; moe.router must be one of {sorted(ROUTER_FROM_NORM.values())}"
        if m.expert_ffn != "glu" or m.router_bias or m.jitter:
            return "qwen2_moe experts are SwiGLU with an unbiased, noise-free router"
        if not (m.n_shared and m.shared_gate):
            return "qwen2_moe always has a sigmoid-gated shared expert: set moe.n_shared >= 1, moe.shared_gate"
        if m.capacity_factor is not None or m.expert_capacity is not None:
            return "qwen2_moe is dropless (no expert capacity)"
        if m.offset != m.every - 1:
            return "qwen2_moe puts experts on layers i with (i + 1) % decoder_sparse_step == 0: set offset = every - 1"
        return None

    def rules(self, cfg):
        m = cfg.moe
        E, F, Fe = m.n_experts, cfg.d_ff, m.expert_d_ff(cfg.d_ff)
        Fs = m.n_shared * (m.shared_d_ff or Fe)

        def moe(i):
            p, o = f"layers.{i}.mlp.", f"decoder.layers.{i}.ffn."
            s = p + "shared_expert."
            return [rule(o + "router.proj.weight", p + "gate.weight"),
                    experts_rule(o + "experts.gate_up",
                                 [p + "experts.{e}.gate_proj.weight", p + "experts.{e}.up_proj.weight"], [Fe, Fe], E),
                    experts_rule(o + "experts.down", [p + "experts.{e}.down_proj.weight"], None, E),
                    rule(o + "shared.ffn.gate_up.weight", s + "gate_proj.weight", s + "up_proj.weight",
                         to_ours=cat_rows, to_theirs=split_rows([Fs, Fs])),
                    rule(o + "shared.ffn.down.weight", s + "down_proj.weight"),
                    rule(o + "shared.gate.weight", p + "shared_expert_gate.weight")]

        def dense(i):
            p, o = f"layers.{i}.mlp.", f"decoder.layers.{i}.ffn."
            return [rule(o + "gate_up.weight", p + "gate_proj.weight", p + "up_proj.weight",
                         to_ours=cat_rows, to_theirs=split_rows([F, F])),
                    rule(o + "down.weight", p + "down_proj.weight")]

        return per_layer_rules(super().rules(cfg), cfg, moe, dense)
