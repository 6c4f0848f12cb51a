"""Exact parameter counts by component, computed from the config alone (no weights, no module).

Tests hold the total equal to ``sum(p.numel())`` of the model built on the meta device for every preset. The
GPT-style closed form of the seed documents, ``V·D + L(12D² + 13D)``, is :func:`gpt_closed_form_params`; it counts
a block as 4D² + 4D (attention with biases), 8D² + 5D (an MLP with F = 4D and biases) and 4D (two LayerNorms with
bias), the token embedding tied to the head, and no position table or final norm.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

from llmarch.analysis.moe import moe_spec

log = logging.getLogger(__name__)

# FFN kind -> (number of D×F matrices, bias length in units of F, bias length in units of D)
FFN_SHAPES = {"mlp": (2, 1, 1), "glu": (3, 2, 1)}
# position kind -> parameters as a function of the config (kinds not listed carry no parameters)
POSITION_PARAMS = {"learned": lambda cfg: cfg.max_seq_len * cfg.d_model}
PARAMETER_FREE_POSITIONS = ("none", "rope", "alibi", "sinusoidal")

COMPONENTS = ("embeddings", "positions", "embed_norm", "attn_q", "attn_k", "attn_v", "attn_o", "ffn", "router",
              "experts", "shared_experts", "norms", "final_norm", "head", "retrieval")


@dataclass
class ParamCount:
    """Parameters by component (in :data:`COMPONENTS` order), the total, and what one token uses."""

    components: dict[str, int]
    total: int
    active: int  # per token: routed experts a token does not visit are left out
    notes: list[str] = field(default_factory=list)

    @property
    def embedding(self) -> int:
        return self.components["embeddings"] + self.components["positions"]

    @property
    def non_embedding(self) -> int:
        """Kaplan et al. 2020's N: everything but the token and position tables."""
        return self.total - self.embedding


def norm_params(cfg, dim: int | None = None) -> int:
    """One norm layer: a gain vector, plus a bias for LayerNorm with ``norm_bias``."""
    dim = dim or cfg.d_model
    if cfg.norm == "layernorm":
        return dim * (2 if cfg.norm_bias else 1)
    return dim  # rmsnorm and gain-only norms


def ffn_params(cfg, d_ff: int) -> int:
    """One dense FFN of width ``d_ff`` (an MLP, or a GLU with its third matrix)."""
    if cfg.ffn not in FFN_SHAPES:
        raise ValueError(f"ffn: the analysis does not know the shape of {cfg.ffn!r}; add it to "
                         "llmarch/analysis/params.py FFN_SHAPES")
    mats, bias_f, bias_d = FFN_SHAPES[cfg.ffn]
    return mats * cfg.d_model * d_ff + (bias_f * d_ff + bias_d * cfg.d_model if cfg.ffn_bias else 0)


def attention_params(cfg) -> dict[str, int]:
    """q [D -> H·Dh], k and v [D -> G·Dh], o [H·Dh -> D], with their biases."""
    D, H, G, Dh = cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.dh
    qb = cfg.qkv_bias
    return {"attn_q": D * H * Dh + (H * Dh if qb else 0), "attn_k": D * G * Dh + (G * Dh if qb else 0),
            "attn_v": D * G * Dh + (G * Dh if qb else 0), "attn_o": H * Dh * D + (D if cfg.out_bias else 0)}


def position_params(cfg) -> tuple[int, list[str]]:
    if cfg.position in POSITION_PARAMS:
        return POSITION_PARAMS[cfg.position](cfg), []
    if cfg.position in PARAMETER_FREE_POSITIONS:
        return 0, []
    return 0, [f"position {cfg.position!r} is not modelled by the analysis (counted as 0)"]


def count_params(cfg) -> ParamCount:
    """Exact parameters of the model ``llmarch.build(cfg)`` builds, by component."""
    D, V, L = cfg.d_model, cfg.vocab_size, cfg.n_layers
    c = dict.fromkeys(COMPONENTS, 0)
    notes: list[str] = []
    c["embeddings"] = V * D
    c["positions"], pnotes = position_params(cfg)
    notes += pnotes
    c["embed_norm"] = norm_params(cfg) if cfg.embed_norm else 0
    attn = attention_params(cfg)
    moe = moe_spec(cfg)
    inactive = 0
    for layer in range(L):
        for k, v in attn.items():
            c[k] += v
        c["norms"] += 2 * norm_params(cfg)
        if moe is not None and moe.is_moe_layer(layer):
            c["router"] += D * moe.num_experts + (moe.num_experts if moe.router_bias else 0)
            expert = ffn_params(cfg, moe.expert_ff)
            c["experts"] += moe.num_experts * expert
            c["shared_experts"] += moe.n_shared * ffn_params(cfg, moe.shared_ff) if moe.n_shared else 0
            inactive += (moe.num_experts - moe.top_k) * expert
        else:
            c["ffn"] += ffn_params(cfg, cfg.d_ff)
    c["final_norm"] = norm_params(cfg) if cfg.final_norm else 0
    c["head"] = 0 if cfg.tie_embeddings else V * D
    c["head"] += V if cfg.head_bias else 0
    if cfg.retrieval is not None:
        c["retrieval"] = retrieval_params(cfg)
    if cfg.kind != "decoder":
        notes.append(f"kind {cfg.kind!r}: counted as one decoder-style stack; extra stacks, cross-attention and "
                     "task heads are not modelled")
    total = sum(c.values())
    return ParamCount(c, total, total - inactive, notes)


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


def closed_form_comparison(cfg) -> list[dict]:
    """Each term of the closed form beside the exact count, with the config facts that make them differ."""
    D, V, L, H, G, Dh = cfg.d_model, cfg.vocab_size, cfg.n_layers, cfg.n_heads, cfg.kv_heads, cfg.dh
    exact = count_params(cfg).components
    attn_reasons = []
    if G != H:
        attn_reasons.append(f"{'MQA' if G == 1 else 'GQA'}: k/v have G={G} heads, not H={H}")
    if H * Dh != D:
        attn_reasons.append(f"H·Dh = {H * Dh} != D")
    if not (cfg.qkv_bias and cfg.out_bias):
        attn_reasons.append("attention without (some) biases")
    ffn_reasons = []
    if cfg.ffn != "mlp":
        ffn_reasons.append(f"{cfg.ffn}: {FFN_SHAPES.get(cfg.ffn, ('?',))[0]} matrices, not 2 (the gate)")
    if cfg.d_ff != 4 * D:
        ffn_reasons.append(f"F = {cfg.d_ff} != 4D = {4 * D}")
    if not cfg.ffn_bias:
        ffn_reasons.append("FFN without biases")
    if moe_spec(cfg) is not None:
        ffn_reasons.append("MoE: router + E experts (+ shared) instead of one FFN")
    norm_reasons = [] if cfg.norm == "layernorm" and cfg.norm_bias else [f"{cfg.norm} without bias: D per norm"]
    attn_exact = sum(exact[k] for k in ("attn_q", "attn_k", "attn_v", "attn_o"))
    ffn_exact = sum(exact[k] for k in ("ffn", "router", "experts", "shared_experts"))
    rows = [
        ("token embeddings", V * D, exact["embeddings"], []),
        ("attention (L blocks)", L * (4 * D * D + 4 * D), attn_exact, attn_reasons),
        ("ffn (L blocks)", L * (8 * D * D + 5 * D), ffn_exact, ffn_reasons),
        ("block norms (L blocks)", L * 4 * D, exact["norms"], norm_reasons),
        ("positions", 0, exact["positions"], [f"{cfg.position} positions"] if exact["positions"] else []),
        ("embedding / final norms", 0, exact["embed_norm"] + exact["final_norm"],
         ["final norm"] * cfg.final_norm + ["embedding norm"] * cfg.embed_norm),
        ("head", 0, exact["head"], ["untied LM head"] * (not cfg.tie_embeddings) + ["head bias"] * cfg.head_bias),
    ]
    return [dict(term=t, closed_form=cf, exact=ex, delta=ex - cf, reason="; ".join(r) if ex != cf else "")
            for t, cf, ex, r in rows]
