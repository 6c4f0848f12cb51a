"""Memory from the config: KV cache, training state and activations, inference footprint (bytes).

Training state follows the mixed-precision Adam accounting of Rajbhandari et al. 2020 (ZeRO): weights and
gradients in the parameter dtype, fp32 Adam moments (8 bytes/param) and an fp32 master copy when the parameters are
narrower than fp32 — 16 bytes/param for bf16. Activations follow Korthikanti et al. 2022 (sequence length × batch ×
width × bytes per saved tensor), generalised to GQA, GLU and MoE; for a GPT block with dropout and 2-byte
activations the per-token count is their 34·D, and the T×S attention scores add 5·H·S when a kernel keeps them
(``scores_materialised``; fused SDPA/flash kernels keep only an O(T) log-sum-exp).
"""
from __future__ import annotations

from llmarch.analysis.moe import moe_spec

DTYPE_BYTES = {"fp32": 4.0, "float32": 4.0, "tf32": 4.0, "bf16": 2.0, "bfloat16": 2.0, "fp16": 2.0,
               "float16": 2.0, "fp8": 1.0, "int8": 1.0, "int4": 0.5}
# FFN kind -> saved [*, F] tensors per token: MLP keeps up(x) and act(up(x)); GLU keeps gate|up, act(gate), product
FFN_SAVED_F = {"mlp": 2, "glu": 4}


def dtype_bytes(name: str) -> float:
    if name not in DTYPE_BYTES:
        raise ValueError(f"dtype: unknown {name!r}; choose one of {sorted(DTYPE_BYTES)}")
    return DTYPE_BYTES[name]


def layer_pattern(cfg, layer: int):
    """The attention pattern object of ``layer``, built the way the model's stack builds it."""
    from llmarch.nn.patterns import build_pattern

    return build_pattern(cfg.layer_pattern(layer), window=cfg.window)


def cached_keys(cfg, layer: int, context: int) -> int:
    """Keys layer ``layer`` keeps for a ``context``-token context: a pattern with a finite lookback (a sliding
    window W keeps W-1 past keys + the current one) caps it at lookback + 1."""
    lookback = layer_pattern(cfg, layer).lookback
    return context if lookback is None else min(context, lookback + 1)


def kv_bytes_per_token(cfg, dtype: str = "bf16") -> float:
    """k and v of one token in every layer: 2·G·Dh·bytes·L (before any window cap)."""
    return 2 * cfg.kv_heads * cfg.dh * dtype_bytes(dtype) * cfg.n_layers


def kv_cache_bytes(cfg, context: int, batch: int = 1, dtype: str = "bf16") -> float:
    """The KV cache of ``batch`` sequences holding ``context`` tokens (sliding-window layers hold at most W)."""
    per_key = 2 * cfg.kv_heads * cfg.dh * dtype_bytes(dtype)
    return batch * per_key * sum(cached_keys(cfg, i, context) for i in range(cfg.n_layers))


def layer_activation_bytes_per_token(cfg, layer: int, act_bytes: float) -> float:
    """Bytes one token's activations in one block keep for the backward (attention scores excluded)."""
    D, H, G, Dh, a = cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.dh, act_bytes
    masks = D if cfg.dropout > 0 else 0  # one byte per element per residual dropout mask
    attn = a * D + a * D + a * (H + 2 * G) * Dh + a * H * Dh + masks  # norm in, qkv in, q/k/v, o in
    saved_f = FFN_SAVED_F.get(cfg.ffn, 2)
    moe = moe_spec(cfg)
    if moe is None or not moe.is_moe_layer(layer):
        ffn = a * D + a * D + a * saved_f * cfg.d_ff + masks
    else:  # router logits in fp32; each of the K visits keeps its dispatched input and its [*, F] tensors
        ffn = (a * D + 4 * moe.num_experts + moe.top_k * (a * D + a * saved_f * moe.expert_ff)
               + moe.n_shared * a * saved_f * moe.shared_ff + masks)
    return attn + ffn


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
    layers = [layer_activation_bytes_per_token(cfg, i, w) for i in range(cfg.n_layers)]
    if scores_materialised:
        layers = [x + score_bytes_per_token(cfg, seq_len, w) for x in layers]
    head_loss = w * cfg.d_model + 4 * cfg.vocab_size  # head input + the loss's fp32 log-probabilities
    out = {"weights": N * w, "grads": N * w, "adamw": 8.0 * N, "master_weights": 4.0 * N if w < 4 else 0.0,
           "activations": tokens * (sum(layers) + head_loss),
           "activations_checkpointed": tokens * (cfg.n_layers * w * cfg.d_model + max(layers) + head_loss)}
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
    moe = moe_spec(cfg)
    widest = cfg.d_ff if moe is None else max(cfg.d_ff, moe.expert_ff)
    work = batch * context * w * (4 * cfg.d_model + FFN_SAVED_F.get(cfg.ffn, 2) * widest + cfg.vocab_size)
    out = {"weights": N * w, "kv_cache": kv_cache_bytes(cfg, context, batch, kv_dtype or dtype),
           "prefill_working": work}
    out["total"] = sum(out.values())
    return out
