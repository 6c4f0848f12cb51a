"""Memory from the config: KV cache, training state and activations, inference footprint (bytes).

Training state follows the mixed-precision Adam accounting of Rajbhandari et al. 2020 (ZeRO): weights and
gradients in the parameter dtype, fp32 Adam moments (8 bytes/param) and an fp32 master copy when the parameters are
narrower than fp32 — 16 bytes/param for bf16. Activations (sequence length × batch × bytes per saved tensor,
as in Korthikanti et al. 2022) count what llmarch's own components save for the backward, component by component
(:mod:`llmarch.analysis.activations`, held to measurements); the T×S attention scores add 5·H·S when a kernel keeps
them (``scores_materialised``; fused SDPA/flash kernels keep only an O(T) log-sum-exp). Latent attention, other
mixers, MoE and the cross-attention of encoder-decoders are counted with the same rules (each saved matmul input
and output) but only dense attention blocks are measured.

KV cache: the decoder stack's self-attention cache (per token per layer: 2·G·Dh numbers, or R + Dr for latent
attention); an encoder keeps none; an encoder-decoder's cross-attention k/v (2·G·Dh per source token per decoder
layer) are reported separately (:func:`cross_kv_cache_bytes`).
"""
from __future__ import annotations

from llmarch.analysis.activations import (FFN_SAVED_F, layer_activation_bytes_per_token, outer_bytes_per_token,
                                         score_bias_bytes_per_token)
from llmarch.analysis.ffn import dense_kind, shared_width
from llmarch.analysis.layers import CrossAttentionCost, mixer_cost, replaced_layers, stacks

DTYPE_BYTES = {"fp32": 4.0, "float32": 4.0, "tf32": 4.0, "bf16": 2.0, "bfloat16": 2.0, "fp16": 2.0,
               "float16": 2.0, "fp8": 1.0, "int8": 1.0, "int4": 0.5}


def dtype_bytes(name: str) -> float:
    if name not in DTYPE_BYTES:
        raise ValueError(f"dtype: unknown {name!r}; choose one of {sorted(DTYPE_BYTES)}")
    return DTYPE_BYTES[name]


def layer_pattern(cfg, layer: int):
    """The attention pattern object of ``layer``, built the way the model's stack builds it."""
    from llmarch.nn.patterns import build_pattern

    return build_pattern(cfg.layer_pattern(layer), window=cfg.window, sparse=cfg.sparse)


def cached_keys(cfg, layer: int, context: int) -> int:
    """Keys layer ``layer`` keeps for a ``context``-token context: a pattern with a finite lookback (a sliding
    window W keeps W-1 past keys + the current one) caps it at lookback + 1."""
    lookback = layer_pattern(cfg, layer).lookback
    return context if lookback is None else min(context, lookback + 1)


def _cached_layers(cfg) -> list[tuple[int, int]]:
    """(layer, numbers cached per token) of the layers with an incremental self-attention cache: the decoder
    stack's (none for encoders, none for a mixer without a per-token cache or a layer a fusion replaces)."""
    if cfg.kind == "encoder":
        return []
    skip = replaced_layers(cfg)
    per = [(i, mixer_cost(cfg, i).cache_numbers(cfg)) for i in range(stacks(cfg)[-1].n_layers) if i not in skip]
    return [(i, n) for i, n in per if n is not None]


def kv_bytes_per_token(cfg, dtype: str = "bf16") -> float:
    """The self-attention cache of one token in every decoder layer: 2·G·Dh·bytes·L for attention, (R + Dr)·bytes·L
    for latent attention (before any window cap); recurrent layers add nothing; 0 for an encoder."""
    return float(sum(n for _, n in _cached_layers(cfg)) * dtype_bytes(dtype))


def kv_cache_bytes(cfg, context: int, batch: int = 1, dtype: str = "bf16") -> float:
    """The self-attention cache of ``batch`` sequences holding ``context`` tokens (sliding-window layers hold at
    most W)."""
    return batch * dtype_bytes(dtype) * sum(n * cached_keys(cfg, i, context) for i, n in _cached_layers(cfg))


def state_bytes(cfg, batch: int = 1, dtype: str = "bf16") -> float:
    """The fixed-size decoding state of the recurrent layers (gated delta: its matrix state and conv window),
    the same at every context length; 0 for models of attention only."""
    if cfg.kind == "encoder":
        return 0.0
    w = dtype_bytes(dtype)
    return batch * sum(mixer_cost(cfg, i).state_bytes(cfg, w) for i in range(stacks(cfg)[-1].n_layers))


def cross_kv_bytes_per_source_token(cfg, dtype: str = "bf16") -> float:
    """An encoder-decoder's cross-attention k/v of one encoded token in every decoder layer (2·G·Dh·bytes·L');
    0 for other kinds."""
    if cfg.kind != "encoder_decoder":
        return 0.0
    return CrossAttentionCost.cache_numbers(cfg) * dtype_bytes(dtype) * stacks(cfg)[-1].n_layers


def cross_kv_cache_bytes(cfg, source_len: int, batch: int = 1, dtype: str = "bf16") -> float:
    """The cross-attention k/v cached for ``batch`` encoded sequences of ``source_len`` tokens."""
    return batch * source_len * cross_kv_bytes_per_source_token(cfg, dtype)


def score_bytes_per_token(cfg, seq_len: int, act_bytes: float) -> float:
    """Per token and layer, a kernel that materialises scores keeps softmax out (+ dropout mask and output)."""
    per = act_bytes + (1 + act_bytes if cfg.attn_dropout > 0 else 0)
    return cfg.n_heads * seq_len * per


def training_memory(cfg, seq_len: int, batch: int = 1, dtype: str = "bf16", n_params: int | None = None,
                    scores_materialised: bool = False) -> dict[str, float]:
    """Bytes of one training step: state (weights, grads, AdamW, master copy) and activations, with and
    without full activation checkpointing (only each block's input kept; one block recomputed at a time)."""
    from llmarch.analysis.params import count_params

    N = count_params(cfg).total if n_params is None else n_params
    w = dtype_bytes(dtype)
    tokens = batch * seq_len
    layers = [layer_activation_bytes_per_token(cfg, i, w, st.cross, seq_len) for st in stacks(cfg)
              for i in range(st.n_layers)]
    layers = [x + score_bias_bytes_per_token(cfg, seq_len, batch) for x in layers]
    if scores_materialised:
        layers = [x + score_bytes_per_token(cfg, seq_len, w) for x in layers]
    head_loss = outer_bytes_per_token(cfg, w, len(layers))  # ids, RoPE tables, final norm, head, loss
    out = {"weights": N * w, "grads": N * w, "adamw": 8.0 * N, "master_weights": 4.0 * N if w < 4 else 0.0,
           "activations": tokens * (sum(layers) + head_loss),
           "activations_checkpointed": tokens * (len(layers) * w * cfg.d_model + max(layers) + head_loss)}
    state = out["weights"] + out["grads"] + out["adamw"] + out["master_weights"]
    out["total"] = state + out["activations"]
    out["total_checkpointed"] = state + out["activations_checkpointed"]
    return out


def inference_memory(cfg, context: int, batch: int = 1, dtype: str = "bf16", kv_dtype: str | None = None,
                     n_params: int | None = None) -> dict[str, float]:
    """Weights + KV cache for ``context`` tokens + the prefill working set (one block's widest tensors and the
    logits of every prompt position)."""
    from llmarch.analysis.params import count_params

    N = count_params(cfg).total if n_params is None else n_params
    w = dtype_bytes(dtype)
    widest = cfg.d_ff if cfg.moe is None else max(cfg.d_ff, cfg.moe.expert_d_ff(cfg.d_ff), shared_width(cfg))
    work = batch * context * w * (4 * cfg.d_model + FFN_SAVED_F.get(dense_kind(cfg), 2) * widest + cfg.vocab_size)
    out = {"weights": N * w, "kv_cache": kv_cache_bytes(cfg, context, batch, kv_dtype or dtype)}
    if state_bytes(cfg):
        out["recurrent_state"] = state_bytes(cfg, batch, kv_dtype or dtype)
    if cfg.kind == "encoder_decoder":  # the source is ``context`` tokens too
        out["cross_kv_cache"] = cross_kv_cache_bytes(cfg, context, batch, kv_dtype or dtype)
    out["prefill_working"] = work
    out["total"] = sum(out.values())
    return out
