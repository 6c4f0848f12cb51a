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

from dataclasses import dataclass, field

from llmarch.analysis.ffn import FFN_SHAPES, ffn_cost
from llmarch.analysis.heads import head_cost
from llmarch.analysis.layers import CrossAttentionCost, mixer_cost, replaced_layers, stacks

@dataclass
class Flops:
    """Forward FLOPs of one step (B sequences of T tokens; an encoder-decoder runs B×T source and B×T' target
    tokens), by part. ``cross_attention`` (q/kv/o and its scores; for a vision-language model the text tokens'
    work on their image: gated cross-attention q/o and scores, joint layers' image keys) is already inside
    ``linear``/``attention``;
    ``by_stack`` splits linear + attention between encoder and decoder."""

    linear: int
    attention: int
    head: int
    attention_useful: int | None  # only the (query, key) pairs the causal mask and the pattern allow
    tokens: int
    cross_attention: int = 0
    by_stack: dict[str, int] = field(default_factory=dict)

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
    return ffn_cost(cfg, layer).macs


def projection_macs_per_token(cfg, layer: int | None = None) -> int:
    """The token mixer's projections (q/k/v/o for attention: D·(H + 2G)·Dh + H·Dh·D) in layer ``layer``."""
    return mixer_cost(cfg, layer).proj_macs(cfg)


def linear_macs_per_token(cfg, n_layers: int | None = None, replaced=frozenset()) -> int:
    """All per-layer matmuls of one token through one stack (the head excluded); layers in ``replaced`` keep
    their FFN but not their token mixer (a fusion's cross-attention block stands there)."""
    n = cfg.n_layers if n_layers is None else n_layers
    return sum((0 if i in replaced else projection_macs_per_token(cfg, i)) + ffn_macs_per_token(cfg, i)
               for i in range(n))


def attended_fraction(cfg, T: int, n_layers: int | None = None, causal: bool = True,
                      replaced=frozenset()) -> float | None:
    """Mean over the token-mixing layers (those not in ``replaced``) of the fraction of the T×T score matrix that
    the (causal) mask and pattern allow (``Pattern.pairs``: a closed form for dense and sliding layers, rendered
    for the others); None when a layer's pattern is too long to count."""
    from llmarch.analysis.memory import layer_pattern

    n = cfg.n_layers if n_layers is None else n_layers
    layers = [i for i in range(n) if i not in replaced]
    fractions = {}
    for i in layers:
        name = cfg.layer_pattern(i)
        if name not in fractions:
            pairs = layer_pattern(cfg, i).pairs(T, causal=causal)
            if pairs is None:
                return None
            fractions[name] = pairs / (T * T)
    return sum(fractions[cfg.layer_pattern(i)] for i in layers) / max(len(layers), 1)


def forward_flops(cfg, seq_len: int, batch: int = 1, target_len: int | None = None) -> Flops:
    """Matmul FLOPs of ``model(input_ids)`` with input_ids [batch, seq_len] and no cache; an encoder-decoder's
    decoder runs ``target_len`` tokens (default ``seq_len``) against the ``seq_len`` encoded ones."""
    B = batch
    lengths = {"encoder": seq_len, "decoder": seq_len if cfg.kind != "encoder_decoder" else target_len or seq_len}
    linear = attention = useful = cross = 0
    by_stack = {}
    for st in stacks(cfg):
        T = lengths[st.name]
        skip = replaced_layers(cfg) if st.name == "decoder" else frozenset()
        costs = [mixer_cost(cfg, i) for i in range(st.n_layers) if i not in skip]
        lin = 2 * B * T * linear_macs_per_token(cfg, st.n_layers, skip) + 2 * sum(c.global_macs(cfg, B, T)
                                                                                for c in costs)
        att = 2 * sum(c.mixing_macs(cfg, B, T) for c in costs)  # score/value products (or a recurrent rule)
        pairs = 2 * B * T * T * sum(c.pair_macs(cfg) for c in costs)  # the part a mask can thin out
        frac = attended_fraction(cfg, T, st.n_layers, st.causal, skip)
        useful = None if frac is None or useful is None else useful + round(pairs * frac) + att - pairs
        if st.cross:
            S, c = lengths["encoder"], CrossAttentionCost
            x_lin = 2 * st.n_layers * B * (T * c.target_macs(cfg) + S * c.source_macs(cfg))
            x_att = 2 * st.n_layers * B * T * S * c.pair_macs(cfg)
            cross = x_lin + x_att
            lin, att = lin + x_lin, att + x_att
            useful = None if useful is None else useful + x_att
        linear, attention = linear + lin, attention + att
        by_stack[st.name] = lin + att
    if getattr(cfg, "vision", None) is not None:  # text tokens reading their row's image (cross / joint layers)
        from llmarch.analysis.vision import text_image_macs

        x_lin, x_att = (2 * B * lengths["decoder"] * m for m in text_image_macs(cfg))
        linear, attention, cross = linear + x_lin, attention + x_att, cross + x_lin + x_att
        useful = None if useful is None else useful + x_att
        by_stack["decoder"] += x_lin + x_att
    per_token, per_seq = head_cost(cfg).macs(cfg)
    T_out = lengths["decoder" if cfg.kind != "encoder" else "encoder"]
    head = 2 * B * (T_out * per_token + per_seq)
    tokens = B * sum(lengths[st.name] for st in stacks(cfg))
    return Flops(linear, attention, head, useful, tokens, cross, by_stack)


def decode_flops_per_token(cfg, context: int) -> int | None:
    """Forward FLOPs of generating one token with ``context`` keys cached (sliding layers see at most W; an
    encoder-decoder's cross-attention reads ``context`` encoded tokens, their k/v cached). None for encoders."""
    from llmarch.analysis.memory import cached_keys

    if cfg.kind == "encoder":
        return None
    dec = stacks(cfg)[-1]
    skip = replaced_layers(cfg)
    macs = 0
    for i in range(dec.n_layers):
        if i not in skip:
            macs += mixer_cost(cfg, i).decode_macs(cfg, cached_keys(cfg, i, context))
        macs += ffn_macs_per_token(cfg, i)
        if dec.cross:
            macs += CrossAttentionCost.target_macs(cfg) + context * CrossAttentionCost.pair_macs(cfg)
    if getattr(cfg, "vision", None) is not None:
        from llmarch.analysis.vision import text_image_macs

        macs += sum(text_image_macs(cfg))
    return 2 * macs + 2 * head_cost(cfg).macs(cfg)[0]


def gpt_closed_form_flops(cfg, seq_len: int, batch: int = 1) -> int:
    """The seed formula (24·b·s·d² + 4·b·d·s²)·L + 2·b·s·d·V, as written."""
    b, s, d, L, V = batch, seq_len, cfg.d_model, cfg.n_layers, cfg.vocab_size
    return (24 * b * s * d * d + 4 * b * d * s * s) * L + 2 * b * s * d * V


def closed_form_comparison(cfg, seq_len: int, batch: int = 1) -> list[dict]:
    """The three terms of the seed formula beside the exact parts, with the reasons they differ."""
    b, s, d, L, V = batch, seq_len, cfg.d_model, cfg.n_layers, cfg.vocab_size
    f = forward_flops(cfg, s, b)
    stack = ([f"encoder-decoder: encoder and decoder stacks + cross-attention ({cfg.n_layers} + "
              f"{cfg.n_decoder_layers or cfg.n_layers} blocks)"] if cfg.kind == "encoder_decoder" else [])
    lin = list(stack)
    if cfg.mixer == "latent":
        lin.append("multi-head latent attention projections (q, kv_a, kv_b expanded per token, o)")
    elif cfg.kv_heads != cfg.n_heads:
        lin.append(f"k/v projections have G={cfg.kv_heads} heads, not H={cfg.n_heads}")
    if cfg.n_heads * cfg.dh != d:
        lin.append(f"H·Dh = {cfg.n_heads * cfg.dh} != D")
    if cfg.moe is not None:
        lin.append("MoE: router + K of E experts per token")
    else:
        if cfg.ffn != "mlp":
            lin.append(f"{cfg.ffn}: {FFN_SHAPES.get(cfg.ffn, ('?',))[0]} FFN matrices")
        if cfg.d_ff != 4 * d:
            lin.append(f"F = {cfg.d_ff} != 4D")
    att = list(stack)
    if cfg.mixer == "latent":
        att.append(f"latent attention: q·k over Dn + Dr = {cfg.mla.qk_head_dim}, p·v over Dv = "
                   f"{cfg.mla.v_head_dim} per head")
    elif cfg.n_heads * cfg.dh != d:
        att.append(f"H·Dh = {cfg.n_heads * cfg.dh} != D")
    head = [f"{cfg.head} head"] if cfg.head != "lm" else []
    rows = [("linear 24·b·s·d²·L", 24 * b * s * d * d * L, f.linear, lin),
            ("attention 4·b·d·s²·L", 4 * b * d * s * s * L, f.attention, att),
            ("head 2·b·s·d·V", 2 * b * s * d * V, f.head, head)]
    return [dict(term=t, closed_form=cf, exact=ex, delta=ex - cf, reason="; ".join(r) if ex != cf else "")
            for t, cf, ex, r in rows]
