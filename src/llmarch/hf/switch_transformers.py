"""model_type "switch_transformers" (SwitchTransformersForConditionalGeneration, Fedus et al. 2021): T5 v1.0
(``hf.t5``: attention, relative position buckets, stacks, tied and rescaled head) with a top-1 sparse FFN on every
``*_sparse_step``-th layer of each stack. This module holds the mixture-of-experts half (settings both ways, the
weight rules of a sparse or dense FFN sub-layer) and the ``Family``, which composes it with the T5 translator.

HF behaviour reproduced: router logits and softmax in fp32 (``router_dtype``), argmax expert weighted by its
probability (not renormalised), capacity counted per sequence in token order (each forward call's tokens: one
token per decoding step), overflow tokens leave the sub-layer as zeros (the residual carries them). Layer i of a
stack is sparse iff i % step == 1 (or step == 1); step is an explicit ``*_sparse_step`` when config.json has one,
else num_layers // num_sparse_layers (num_layers when there are no sparse layers, which transformers turns into one
sparse layer at index 1). HF also multiplies the router input by jitter noise in training; in fp32 its in-place
multiply reaches the experts' input too, ours jitters the router input only.
"""
from __future__ import annotations

import re
from typing import Any

from llmarch.config import ModelConfig
from llmarch.hf.base import FAMILIES, Family, activation_from_hf, activation_to_hf
from llmarch.hf.convert import Rule, rule
from llmarch.hf.moe import experts_rule, plain_routing
from llmarch.hf.t5 import T5
from llmarch.moe_config import MoEConfig


def decoder_layers(hf: dict[str, Any]) -> int:
    """SwitchTransformersConfig: an absent num_decoder_layers is 12 (its field default), null is num_layers."""
    n = hf.get("num_decoder_layers", 12)
    return hf.get("num_layers", 12) if n is None else n


def sparse_step(hf: dict[str, Any], stack: str) -> int:
    """The ``encoder``/``decoder`` sparse step as transformers derives it: ``__post_init__`` computes it from
    num_sparse_*_layers (default 3), then an explicit ``*_sparse_step`` in config.json is set over it."""
    if hf.get(f"{stack}_sparse_step") is not None:
        return int(hf[f"{stack}_sparse_step"])
    layers = hf.get("num_layers", 12) if stack == "encoder" else decoder_layers(hf)
    sparse = int(hf.get(f"num_sparse_{stack}_layers", 3))
    return layers // sparse if sparse > 0 else layers


def moe_from_hf(hf: dict[str, Any]) -> MoEConfig:
    """The MoEConfig of a switch_transformers config.json (both stacks share it)."""
    enc, dec = sparse_step(hf, "encoder"), sparse_step(hf, "decoder")
    if enc != dec:
        raise ValueError(f"config.json encoder_sparse_step={enc} != decoder_sparse_step={dec} is not supported "
                         "(one moe layer schedule serves both stacks)")
    if enc <= 0:
        raise ValueError("config.json has no sparse layers (sparse step 0); load it as a dense T5 model")
    if hf.get("router_dtype", "float32") != "float32":
        raise ValueError(f"config.json router_dtype={hf['router_dtype']!r} is not supported: routers run in fp32")
    return MoEConfig(n_experts=int(hf["num_experts"]), top_k=1, router="switch", expert_ffn="mlp",
                     router_bias=bool(hf.get("router_bias", False)), expert_capacity=int(hf["expert_capacity"]),
                     jitter=float(hf.get("router_jitter_noise", 0.0)),
                     balance_coef=float(hf.get("router_aux_loss_coef", 0.001)),
                     z_coef=float(hf.get("router_z_loss_coef", 0.001)), every=enc, offset=1 if enc > 1 else 0)


def moe_to_hf(moe: MoEConfig) -> dict[str, Any]:
    """config.json MoE fields; raises when the settings have no switch_transformers equivalent."""
    reason = accepts_moe(moe)
    if reason:
        raise ValueError(f"cannot save as switch_transformers: {reason}")
    return dict(num_experts=moe.n_experts, expert_capacity=moe.expert_capacity, router_bias=moe.router_bias,
                router_jitter_noise=moe.jitter, router_dtype="float32", router_aux_loss_coef=moe.balance_coef,
                router_z_loss_coef=moe.z_coef, encoder_sparse_step=moe.every, decoder_sparse_step=moe.every)


def accepts_moe(moe: MoEConfig) -> str | None:
    if moe.router != "switch" or moe.expert_ffn != "mlp" or moe.n_shared:
        return "switch_transformers has top-1 switch routing over plain (non-gated) experts, no shared experts"
    if moe.expert_capacity is None:
        return "switch_transformers needs a fixed moe.expert_capacity"
    if plain_routing(moe, "switch_transformers"):
        return plain_routing(moe, "switch_transformers")
    if moe.first_dense or moe.offset != (1 if moe.every > 1 else 0):
        return "switch_transformers puts experts on layers i with i % step == 1: set offset=1 (or every=1)"
    return None


def sparse_mlp_rules(ours: str, theirs: str, moe: MoEConfig) -> list[Rule]:
    """An MoE FFN: ours ``{ours}router.proj`` / ``experts.up`` / ``experts.down`` <-> theirs
    ``{theirs}router.classifier`` / ``experts.expert_{e}.wi`` / ``.wo`` (e.g. theirs = "encoder.block.3.layer.1.mlp.",
    "decoder.block.3.layer.2.mlp.")."""
    E = moe.n_experts
    rules = [rule(f"{ours}router.proj.weight", f"{theirs}router.classifier.weight"),
             experts_rule(f"{ours}experts.up", [theirs + "experts.expert_{e}.wi.weight"], None, E),
             experts_rule(f"{ours}experts.down", [theirs + "experts.expert_{e}.wo.weight"], None, E)]
    if moe.router_bias:
        rules.append(rule(f"{ours}router.proj.bias", f"{theirs}router.classifier.bias"))
    return rules


def dense_mlp_rules(ours: str, theirs: str) -> list[Rule]:
    """A dense FFN sub-layer (T5 DenseReluDense): ours ``up``/``down`` <-> theirs ``wi``/``wo``."""
    return [rule(f"{ours}up.weight", f"{theirs}wi.weight"), rule(f"{ours}down.weight", f"{theirs}wo.weight")]


def ffn_rules(moe: MoEConfig, n_layers: int, ours: str, theirs: str) -> list[Rule]:
    """Every layer's FFN rules of one stack, by the schedule; ``ours``/``theirs`` hold ``{layer}``, e.g.
    ours "encoder.layers.{layer}.ffn.", theirs "encoder.block.{layer}.layer.1.mlp."."""
    out: list[Rule] = []
    for i in range(n_layers):
        o, t = ours.replace("{layer}", str(i)), theirs.replace("{layer}", str(i))
        out += sparse_mlp_rules(o, t, moe) if moe.is_moe_layer(i) else dense_mlp_rules(o, t)
    return out


def dense_base(cfg: ModelConfig) -> ModelConfig:
    """The T5 v1.0 config the MoE model is built on: the same model with plain ``mlp`` FFNs everywhere."""
    return cfg.replace(ffn="mlp", moe=None)


def sparse_layers(n_layers: int, every: int) -> int:
    """num_sparse_*_layers that transformers turns back into the step ``every`` (n_layers // it == every)."""
    return n_layers // every


@FAMILIES.register("switch_transformers")
class SwitchTransformers(T5):
    """The T5 translator on the dense base config, plus the MoE settings and each layer's FFN rules."""

    model_type, architecture = "switch_transformers", "SwitchTransformersForConditionalGeneration"

    # no T5-style forced tying: a head is tied when tie_word_embeddings says so and the checkpoint agrees
    tie_from_weights = Family.tie_from_weights

    def to_config(self, hf):
        activation_from_hf(hf.get("dense_act_fn", "relu"), "dense_act_fn")  # its own name in the message
        base = super().to_config({**hf, "feed_forward_proj": hf.get("dense_act_fn", "relu"),
                                  "num_decoder_layers": decoder_layers(hf)})
        # the decoder output is rescaled iff tie_word_embeddings (default true); scale_decoder_outputs is T5's
        scale = hf.get("tie_word_embeddings", True) is not False
        return base.replace(ffn="moe", moe=moe_from_hf(hf), tie_embeddings=scale, scale_head=scale)

    def from_config(self, cfg):
        out = super().from_config(dense_base(cfg))
        for key in ("feed_forward_proj", "scale_decoder_outputs"):  # T5-only spellings
            out.pop(key)
        n_dec = cfg.n_decoder_layers or cfg.n_layers
        out.update(model_type=self.model_type, architectures=[self.architecture], num_decoder_layers=n_dec,
                   tie_word_embeddings=cfg.scale_head,  # an untied head with its own lm_head.weight stays untied
                   dense_act_fn=activation_to_hf(cfg.activation), **moe_to_hf(cfg.moe),
                   num_sparse_encoder_layers=sparse_layers(cfg.n_layers, cfg.moe.every),
                   num_sparse_decoder_layers=sparse_layers(n_dec, cfg.moe.every))
        return out

    def accepts(self, cfg):
        if cfg.ffn != "moe":
            return "switch_transformers needs ffn='moe' (a dense model saves as t5)"
        reason = super().accepts(dense_base(cfg)) or accepts_moe(cfg.moe)
        if reason:
            return reason.replace("t5 ", "switch_transformers ", 1)
        if cfg.moe.d_ff not in (None, cfg.d_ff):
            return f"switch_transformers experts have the dense width d_ff={cfg.d_ff}; set moe.d_ff=None"
        if cfg.moe.capacity_factor is not None:
            return "switch_transformers has a fixed expert_capacity, not a capacity_factor"
        if cfg.tie_embeddings and not cfg.scale_head:
            return "switch_transformers rescales the decoder output whenever the head is tied (set scale_head)"
        return None

    def rules(self, cfg):
        dense = [r for r in super().rules(dense_base(cfg)) if not re.search(r"\.ffn\.(up|down)\.", r.ours)]
        sparse = []
        for stack, n in (("encoder", cfg.n_layers), ("decoder", cfg.n_decoder_layers or cfg.n_layers)):
            ff = 2 if stack == "decoder" else 1
            sparse += ffn_rules(cfg.moe, n, f"{stack}.layers.{{layer}}.ffn.", f"{stack}.block.{{layer}}.layer.{ff}.mlp.")
        return dense + sparse
