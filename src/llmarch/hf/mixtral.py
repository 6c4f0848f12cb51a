"""model_type "mixtral" (Jiang et al. 2024, Mixtral of Experts): Mistral's attention with every FFN replaced by 8
SwiGLU experts, top-2 routing renormalised over the chosen two, dropless. Checkpoints keep one tensor per expert
(``block_sparse_moe.experts.{e}.w1/w2/w3``: gate, down, up); we stack them, transposed, into ``experts.gate_up``
/ ``down``."""
from __future__ import annotations

from llmarch.hf.base import FAMILIES, require
from llmarch.hf.convert import rule
from llmarch.hf.llama import Mistral
from llmarch.hf.moe import experts_rule, moe_on_dense_reason, per_layer_rules, warn_dropped
from llmarch.moe_config import MoEConfig

# softmax over E then top-k renormalised (HF's form) equals softmax over the top-k logits (ours): same weights.
RENORMALISED = ("topk_softmax", "softmax_topk_norm")


@FAMILIES.register("mixtral")
class Mixtral(Mistral):
    model_type, architecture = "mixtral", "MixtralForCausalLM"
    # MixtralConfig's own defaults: rms_norm_eps 1e-5, default_theta 1e6, no sliding window
    default_eps, default_theta, default_window = 1e-5, 1000000.0, None

    def to_config(self, hf):
        E, K = require(hf, "num_local_experts", "num_experts_per_tok")
        moe = MoEConfig(n_experts=E, top_k=K, router="topk_softmax",
                        balance_coef=float(hf.get("router_aux_loss_coef", 0.001)),
                        jitter=float(hf.get("router_jitter_noise") or 0.0))
        return super().to_config(hf).replace(ffn="moe", moe=moe)

    def from_config(self, cfg):
        warn_dropped(cfg, self.model_type)
        m = cfg.moe
        return dict(super().from_config(cfg), num_local_experts=m.n_experts, num_experts_per_tok=m.top_k,
                    router_aux_loss_coef=m.balance_coef, router_jitter_noise=m.jitter, output_router_logits=False)

    def accepts(self, cfg):
        reason = moe_on_dense_reason(super().accepts, cfg, self.model_type)
        if reason:
            return reason
        m = cfg.moe
        if m.router not in RENORMALISED:
            return f"mixtral renormalises the top-k weights; moe.router must be one of {RENORMALISED}"
        if m.expert_ffn != "glu" or m.router_bias or m.n_shared:
            return "mixtral experts are SwiGLU with an unbiased router and no shared experts"
        if m.capacity_factor is not None or m.expert_capacity is not None:
            return "mixtral is dropless (no expert capacity)"
        if m.every != 1 or m.first_dense or m.offset:
            return "mixtral has experts on every layer"
        if m.expert_d_ff(cfg.d_ff) != cfg.d_ff:
            return "mixtral's expert width is intermediate_size: leave moe.d_ff None or equal to d_ff"
        return None

    def rules(self, cfg):
        E, F = cfg.moe.n_experts, cfg.d_ff

        def moe(i):
            p, o = f"layers.{i}.block_sparse_moe.", f"decoder.layers.{i}.ffn."
            return [rule(o + "router.proj.weight", p + "gate.weight"),
                    experts_rule(o + "experts.gate_up", [p + "experts.{e}.w1.weight", p + "experts.{e}.w3.weight"],
                                 [F, F], E),
                    experts_rule(o + "experts.down", [p + "experts.{e}.w2.weight"], None, E)]

        return per_layer_rules(super().rules(cfg), cfg, moe, lambda i: [])
