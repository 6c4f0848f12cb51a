"""Exact parameter counts by component, computed from the config alone (no weights, no module).

Tests hold the total equal to ``sum(p.numel())`` of the model built on the meta device for every preset. The
GPT-style closed form of the seed documents, ``V·D + L(12D² + 13D)``, is :func:`gpt_closed_form_params`; it counts
a block as 4D² + 4D (attention with biases), 8D² + 5D (an MLP with F = 4D and biases) and 4D (two LayerNorms with
bias), the token embedding tied to the head, and no position table or final norm.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

from llmarch.analysis.ffn import FFN_SHAPES, dense_ffn_params, ffn_cost
from llmarch.analysis.heads import head_cost
from llmarch.analysis.layers import CrossAttentionCost, mixer_cost, norm_params, stacks

log = logging.getLogger(__name__)

# position kind -> parameters of one stack's table (kinds not listed carry no parameters)
POSITION_PARAMS = {"learned": lambda cfg: cfg.max_seq_len * cfg.d_model,
                   "relative": lambda cfg: cfg.rel_buckets * cfg.n_heads}
PARAMETER_FREE_POSITIONS = ("none", "rope", "alibi", "sinusoidal", "sinusoidal_halves")

COMPONENTS = ("embeddings", "token_types", "positions", "embed_norm", "attn_q", "attn_k", "attn_v", "attn_o",
              "attn_kv_a", "attn_latent_norms", "attn_kv_b", "attn_global", "attn_gate", "attn_qk_norms", "delta_in",
              "delta_conv", "delta_gates", "delta_norm", "delta_out", "attn_in", "attn_conv", "attn_ssm",
              "attn_controller", "cross_q", "cross_kv", "cross_o", "ffn",
              "router", "experts", "shared_experts", "norms", "final_norm", "head_transform", "pooler", "nsp",
              "head", "exit_gates", "retrieval", "vision", "projector", "image_cross", "condition")


@dataclass
class ParamCount:
    """Parameters by component (in :data:`COMPONENTS` order), the total, what one token uses, and the total
    of each stack (``stacks``: encoder / decoder, their blocks, positions and final norm)."""

    components: dict[str, int]
    total: int
    active: int  # per token: routed experts a token does not visit are left out
    notes: list[str] = field(default_factory=list)
    stacks: dict[str, int] = field(default_factory=dict)

    @property
    def embedding(self) -> int:
        return self.components["embeddings"] + self.components["positions"] + self.components["token_types"]

    @property
    def non_embedding(self) -> int:
        """Kaplan et al. 2020's N: everything but the token, token-type and position tables."""
        return self.total - self.embedding


def ffn_params(cfg, d_ff: int) -> int:
    """One dense FFN of the model's kind and width ``d_ff``."""
    return dense_ffn_params(cfg.d_model, d_ff, cfg.ffn, cfg.ffn_bias)


def attention_params(cfg, layer: int | None = None) -> dict[str, int]:
    """The token mixer of layer ``layer`` (None: of ``cfg.mixer``), by component."""
    return mixer_cost(cfg, layer).params(cfg)


def position_params(cfg) -> tuple[int, list[str]]:
    """One stack's position parameters (each stack builds its own scheme)."""
    if cfg.position in POSITION_PARAMS:
        return POSITION_PARAMS[cfg.position](cfg), []
    if cfg.position in PARAMETER_FREE_POSITIONS:
        return 0, []
    return 0, [f"position {cfg.position!r} is not modelled by the analysis (counted as 0)"]


def count_params(cfg) -> ParamCount:
    """Exact parameters of the model ``llmarch.build(cfg)`` builds, by component."""
    from llmarch.analysis.vision import fusion_params, tower_params
    from llmarch.vision_config import VisionConfig

    if isinstance(cfg, VisionConfig):  # a vision tower alone: its parts
        parts = tower_params(cfg)
        return ParamCount(parts, sum(parts.values()), sum(parts.values()))
    D = cfg.d_model
    c = dict.fromkeys(COMPONENTS, 0)
    c["embeddings"] = cfg.input_vocab_size * D  # V (+ rows past the vocabulary that only embed, e.g. an image token)
    c["token_types"] = cfg.type_vocab_size * D
    c["embed_norm"] = norm_params(cfg) if cfg.embed_norm else 0
    pos, notes = position_params(cfg)
    inactive = 0
    per_stack = {}
    for stack in stacks(cfg):
        before = sum(c.values())
        c["positions"] += pos
        for layer in range(stack.n_layers):
            for k, v in attention_params(cfg, layer).items():
                c[k] += v
            if stack.cross:
                for k, v in CrossAttentionCost.params(cfg).items():
                    c[k] += v
            ffn = ffn_cost(cfg, layer)
            c["norms"] += (2 if stack.cross else 1) * norm_params(cfg) + (norm_params(cfg) if ffn.has_norm else 0)
            for k, v in ffn.components.items():
                c[k] += v
            inactive += ffn.params - ffn.active
        c["final_norm"] += norm_params(cfg) if cfg.final_norm else 0
        per_stack[stack.name] = sum(c.values()) - before
    for k, v in head_cost(cfg).params(cfg).items():
        c[k] += v
    if cfg.exit_heads:  # one Linear(D, 1) per decoder layer but the last; not used by the full forward
        c["exit_gates"] = (cfg.n_layers - 1) * (cfg.d_model + 1)
        inactive += c["exit_gates"]
    if cfg.retrieval is not None:
        c["retrieval"] = retrieval_params(cfg)
    if cfg.vision is not None:
        c.update(fusion_params(cfg))
    if cfg.condition is not None:
        c["condition"] = condition_params(cfg)
    total = sum(c.values())
    return ParamCount(c, total, total - inactive, notes, per_stack)


CONDITION_FUSION_PARAMS = {"add": lambda D: 0, "adanorm": lambda D: 2 * D * D + 2 * D,  # Linear(D, 2D)
                           "fusion_layer": lambda D: 2 * D * D + D}  # Linear(2D, D)


def condition_params(cfg) -> int:
    """The style table, the instruction encoder (its blocks, position table and final norm: one stack of
    ``instruction_layers``) and the fusion's projection."""
    c, D = cfg.condition, cfg.d_model
    encoder = 0
    if c.instruction_layers:
        encoder = count_params(cfg.replace(n_layers=c.instruction_layers, condition=None)).stacks["decoder"]
    return c.n_styles * D + encoder + CONDITION_FUSION_PARAMS[c.fusion](D)


def retrieval_params(cfg) -> int:
    """RETRO's additions: chunked cross-attention (q, kv, out + its norm) in each CCA layer, and the neighbour
    encoder (per layer: self-attention, cross-attention, FFN, three norms; its final norm and position table)."""
    D, H, G, Dh = cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.dh
    a = attention_params(cfg)
    cross = D * H * Dh + 2 * D * G * Dh + H * Dh * D + (H * Dh + 2 * G * Dh if cfg.qkv_bias else 0) + \
        (D if cfg.out_bias else 0)
    r = cfg.retrieval
    encoder_layer = sum(a.values()) + cross + ffn_params(cfg, cfg.d_ff) + 3 * norm_params(cfg)
    encoder = r.encoder_layers * encoder_layer + (norm_params(cfg) if cfg.final_norm else 0) + position_params(cfg)[0]
    return len(r.cca_layers) * (cross + norm_params(cfg)) + encoder


def meta_param_count(cfg) -> int:
    """``sum(p.numel())`` of the model built on the meta device (no memory): the ground truth."""
    from llmarch.model import build

    return sum(p.numel() for p in build(cfg, device="meta").parameters())


def gpt_closed_form_params(cfg) -> int:
    """The seed formula V·D + L(12D² + 13D), as written."""
    D, V, L = cfg.d_model, cfg.vocab_size, cfg.n_layers
    return V * D + L * (12 * D * D + 13 * D)


ATTN_KEYS = ("attn_q", "attn_k", "attn_v", "attn_o", "attn_kv_a", "attn_latent_norms", "attn_kv_b", "attn_global",
             "attn_gate", "attn_qk_norms", "delta_in", "delta_conv", "delta_gates", "delta_norm", "delta_out",
             "attn_in", "attn_conv", "attn_ssm", "attn_controller", "cross_q", "cross_kv", "cross_o")
FFN_KEYS = ("ffn", "router", "experts", "shared_experts")
HEAD_KEYS = ("head_transform", "pooler", "nsp", "head")


def _structure_reasons(cfg) -> list[str]:
    """What changes every per-layer term: a second stack, another mixer."""
    reasons = []
    if cfg.kind == "encoder_decoder":
        reasons.append(f"encoder-decoder: {cfg.n_layers} encoder + {cfg.n_decoder_layers or cfg.n_layers} decoder "
                       "blocks (L counts one stack)")
    return reasons


def closed_form_comparison(cfg) -> list[dict]:
    """Each term of the closed form beside the exact count, with the config facts that make them differ."""
    D, V, L, H, G, Dh = cfg.d_model, cfg.vocab_size, cfg.n_layers, cfg.n_heads, cfg.kv_heads, cfg.dh
    exact = count_params(cfg).components
    stack = _structure_reasons(cfg)
    attn_reasons = list(stack)
    if cfg.mixer == "latent":
        attn_reasons.append("multi-head latent attention: low-rank q/kv projections, latent norms")
    elif G != H:
        attn_reasons.append(f"{'MQA' if G == 1 else 'GQA'}: k/v have G={G} heads, not H={H}")
    if cfg.mixer != "latent" and H * Dh != D:
        attn_reasons.append(f"H·Dh = {H * Dh} != D")
    if not (cfg.qkv_bias and cfg.out_bias):
        attn_reasons.append("attention without (some) biases")
    if exact["attn_global"]:
        attn_reasons.append("second q/k/v projection for global tokens")
    if exact["attn_gate"]:
        attn_reasons.append("gated attention: an output-gate projection and q/k norms")
    if exact["delta_in"]:
        attn_reasons.append("gated delta layers: qkvz/ba projections, conv, gates, gated norm")
    if exact["cross_q"]:
        attn_reasons.append("cross-attention q/kv/o in each decoder block")
    ffn_reasons = list(stack)
    if cfg.moe is not None:
        ffn_reasons.append("MoE: router + E experts (+ shared) instead of one FFN")
    else:
        if cfg.ffn != "mlp":
            ffn_reasons.append(f"{cfg.ffn}: {FFN_SHAPES.get(cfg.ffn, ('?',))[0]} matrices, not 2 (the gate)")
        if cfg.d_ff != 4 * D:
            ffn_reasons.append(f"F = {cfg.d_ff} != 4D = {4 * D}")
        if not cfg.ffn_bias:
            ffn_reasons.append("FFN without biases")
    norm_reasons = list(stack) + ([] if cfg.norm == "layernorm" and cfg.norm_bias
                                  else [f"{cfg.norm} without bias: D per norm"])
    if exact["cross_q"]:
        norm_reasons.append("a third norm (cross-attention) per decoder block")
    head_reasons = [f"{cfg.head} head"] if cfg.head != "lm" else []
    if not cfg.tie_embeddings and cfg.head not in ("classification", "last_token"):
        head_reasons.append("untied LM head" if cfg.head == "lm" else "untied vocabulary projection")
    head_reasons += ["head bias"] * (cfg.head_bias and cfg.head == "lm")
    rows = [
        ("token embeddings", V * D, exact["embeddings"] + exact["token_types"],
         [f"{cfg.type_vocab_size} token types"] if exact["token_types"] else []),
        ("attention (L blocks)", L * (4 * D * D + 4 * D), sum(exact[k] for k in ATTN_KEYS), attn_reasons),
        ("ffn (L blocks)", L * (8 * D * D + 5 * D), sum(exact[k] for k in FFN_KEYS), ffn_reasons),
        ("block norms (L blocks)", L * 4 * D, exact["norms"], norm_reasons),
        ("positions", 0, exact["positions"], [f"{cfg.position} positions"] if exact["positions"] else []),
        ("embedding / final norms", 0, exact["embed_norm"] + exact["final_norm"],
         ["final norm"] * cfg.final_norm + ["embedding norm"] * cfg.embed_norm),
        ("head", 0, sum(exact[k] for k in HEAD_KEYS), head_reasons),
    ]
    return [dict(term=t, closed_form=cf, exact=ex, delta=ex - cf, reason="; ".join(r) if ex != cf else "")
            for t, cf, ex, r in rows]
