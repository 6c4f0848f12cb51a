"""Matmul FLOPs of the forward pass and of training, from the config alone (2 FLOPs per multiply-add).

For B sequences of T tokens (a forward without cache) the work splits into three parts, the terms of the seed
formula ``(24·B·T·D² + 4·B·D·T²)·L + 2·B·T·D·V`` (Kaplan et al. 2020; Narayanan et al. 2021):

- ``linear``: the q/k/v/o projections and the FFN (router and the K visited experts for MoE) — 24·B·T·D² per
  layer for an MHA block with an F = 4D MLP;
- ``attention``: q·kᵀ and probs·v, 2·B·H·T·S·Dh each, counted over the full T×S score matrix as a dense kernel
  computes it (4·B·D·T² per layer when H·Dh = D); ``attention_useful`` keeps only the pairs the mask allows;
- ``head``: the LM head, 2·B·T·D·V.

Not counted (and not counted by ``torch.utils.flop_counter`` either): norms, activations, softmax, RoPE, residual
adds, bias adds, embedding lookups. Training is 3× the forward (the backward computes gradients for both inputs
and weights of every matmul); with activation checkpointing one more forward is recomputed (4×).
"""
from __future__ import annotations

from dataclasses import dataclass

from llmarch.analysis.moe import moe_spec
from llmarch.analysis.params import FFN_SHAPES

USEFUL_FRACTION_MAX_T = 8192  # the attended fraction is measured by rendering the mask up to this length


@dataclass
class Flops:
    """Forward FLOPs of one step (B sequences of T tokens), by part."""

    linear: int
    attention: int
    head: int
    attention_useful: int | None  # only the (query, key) pairs the causal mask and the pattern allow
    tokens: int

    @property
    def forward(self) -> int:
        return self.linear + self.attention + self.head

    @property
    def training(self) -> int:
        return 3 * self.forward

    @property
    def training_recompute(self) -> int:
        """Training with full activation checkpointing: the forward runs twice."""
        return 4 * self.forward

    def per_token(self) -> dict[str, float]:
        return {"forward": self.forward / self.tokens, "training": self.training / self.tokens}


def ffn_macs_per_token(cfg, layer: int) -> int:
    """Multiply-adds of one token through the FFN of ``layer`` (router + K experts + shared ones for MoE)."""
    mats = FFN_SHAPES[cfg.ffn][0] if cfg.ffn in FFN_SHAPES else None
    if mats is None:
        raise ValueError(f"ffn: the analysis does not know the shape of {cfg.ffn!r}; add it to "
                         "llmarch/analysis/params.py FFN_SHAPES")
    moe = moe_spec(cfg)
    D = cfg.d_model
    if moe is None or not moe.is_moe_layer(layer):
        return mats * D * cfg.d_ff
    return D * moe.num_experts + moe.top_k * mats * D * moe.expert_ff + moe.n_shared * mats * D * moe.shared_ff


def projection_macs_per_token(cfg) -> int:
    """q/k/v/o: D·(H + 2G)·Dh + H·Dh·D."""
    return cfg.d_model * (cfg.n_heads + 2 * cfg.kv_heads) * cfg.dh + cfg.n_heads * cfg.dh * cfg.d_model


def linear_macs_per_token(cfg) -> int:
    """All per-layer matmuls of one token, summed over the layers (the head excluded)."""
    return sum(projection_macs_per_token(cfg) + ffn_macs_per_token(cfg, i) for i in range(cfg.n_layers))


def attended_fraction(cfg, T: int) -> float | None:
    """Mean over layers of the fraction of the T×T score matrix that the causal mask and pattern allow."""
    if T > USEFUL_FRACTION_MAX_T:
        return None
    from llmarch.analysis.memory import layer_pattern

    fractions = {}
    for i in range(cfg.n_layers):
        name = cfg.layer_pattern(i)
        if name not in fractions:
            fractions[name] = float(layer_pattern(cfg, i).render(T).float().mean())
    return sum(fractions[cfg.layer_pattern(i)] for i in range(cfg.n_layers)) / cfg.n_layers


def forward_flops(cfg, seq_len: int, batch: int = 1) -> Flops:
    """Matmul FLOPs of ``model(input_ids)`` with input_ids [batch, seq_len] and no cache."""
    B, T = batch, seq_len
    tokens = B * T
    linear = 2 * tokens * linear_macs_per_token(cfg)
    attention = 2 * 2 * B * cfg.n_heads * T * T * cfg.dh * cfg.n_layers
    head = 2 * tokens * cfg.d_model * cfg.vocab_size
    frac = attended_fraction(cfg, T)
    useful = None if frac is None else round(attention * frac)
    return Flops(linear, attention, head, useful, tokens)


def decode_flops_per_token(cfg, context: int) -> int:
    """Forward FLOPs of generating one token with ``context`` keys cached (sliding layers see at most W)."""
    from llmarch.analysis.memory import cached_keys

    attention = sum(4 * cfg.n_heads * cfg.dh * cached_keys(cfg, i, context) for i in range(cfg.n_layers))
    return 2 * linear_macs_per_token(cfg) + attention + 2 * cfg.d_model * cfg.vocab_size


def gpt_closed_form_flops(cfg, seq_len: int, batch: int = 1) -> int:
    """The seed formula (24·b·s·d² + 4·b·d·s²)·L + 2·b·s·d·V, as written."""
    b, s, d, L, V = batch, seq_len, cfg.d_model, cfg.n_layers, cfg.vocab_size
    return (24 * b * s * d * d + 4 * b * d * s * s) * L + 2 * b * s * d * V


def closed_form_comparison(cfg, seq_len: int, batch: int = 1) -> list[dict]:
    """The three terms of the seed formula beside the exact parts, with the reasons they differ."""
    b, s, d, L, V = batch, seq_len, cfg.d_model, cfg.n_layers, cfg.vocab_size
    f = forward_flops(cfg, s, b)
    lin = []
    if cfg.kv_heads != cfg.n_heads:
        lin.append(f"k/v projections have G={cfg.kv_heads} heads, not H={cfg.n_heads}")
    if cfg.n_heads * cfg.dh != d:
        lin.append(f"H·Dh = {cfg.n_heads * cfg.dh} != D")
    if cfg.ffn != "mlp":
        lin.append(f"{cfg.ffn}: {FFN_SHAPES.get(cfg.ffn, ('?',))[0]} FFN matrices")
    if cfg.d_ff != 4 * d:
        lin.append(f"F = {cfg.d_ff} != 4D")
    if moe_spec(cfg) is not None:
        lin.append("MoE: router + K of E experts per token")
    att = [f"H·Dh = {cfg.n_heads * cfg.dh} != D"] if cfg.n_heads * cfg.dh != d else []
    rows = [("linear 24·b·s·d²·L", 24 * b * s * d * d * L, f.linear, lin),
            ("attention 4·b·d·s²·L", 4 * b * d * s * s * L, f.attention, att),
            ("head 2·b·s·d·V", 2 * b * s * d * V, f.head, [])]
    return [dict(term=t, closed_form=cf, exact=ex, delta=ex - cf, reason="; ".join(r) if ex != cf else "")
            for t, cf, ex, r in rows]
