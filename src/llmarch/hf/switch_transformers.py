"""model_type "switch_transformers" (Fedus et al. 2021): a T5 v1.0 encoder-decoder whose FFN is, on every
``*_sparse_step``-th layer (layers i with i % step == 1, or all when step is 1), a top-1 switch router over E
ReLU experts with a fixed per-sequence ``expert_capacity``.

This module holds the mixture-of-experts half of the translation: the MoE settings both ways and the weight rules
of a sparse or dense FFN sub-layer. The encoder-decoder half (T5 attention, relative position buckets, stacks) and
the ``Family`` registration belong with the encoder-decoder model kind; they compose with these functions.

HF behaviour reproduced: router logits and softmax in fp32 (``router_dtype``), argmax expert weighted by its
probability (not renormalised), capacity counted per sequence in token order, overflow tokens leave the sub-layer
as zeros (the residual carries them). HF also multiplies the router input by jitter noise in training; in fp32 its
in-place multiply reaches the experts' input too, ours jitters the router input only.
"""
from __future__ import annotations

from typing import Any

from llmarch.hf.convert import Rule, rule
from llmarch.hf.moe import experts_rule
from llmarch.moe_config import MoEConfig


def sparse_step(hf: dict[str, Any], stack: str) -> int:
    """The ``encoder``/``decoder`` sparse step, from the explicit field or from num_sparse_*_layers."""
    key = f"{stack}_sparse_step"
    if hf.get(key) is not None:
        return int(hf[key])
    layers = hf.get("num_layers", 12) if stack == "encoder" else hf.get("num_decoder_layers", hf.get("num_layers"))
    sparse = hf.get(f"num_sparse_{stack}_layers", 0)
    return layers // sparse if sparse else 0


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
