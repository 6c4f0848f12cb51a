"""What a variant costs, from its config: parameters, forward FLOPs per token, KV-cache bytes per token.

The numbers come from ``llmarch.analysis`` (``count_params(cfg).total/.active``,
``forward_flops(cfg, T, B)`` -> ``.forward/.attention/.attention_useful/.tokens``,
``kv_bytes_per_token(cfg, dtype)``) when that package is present and knows the config. Otherwise a small local
count is used and marked ``source: local``: parameters by ``numel`` on the meta device; FLOPs as 2 per
multiply-add of every block matrix and the LM head, plus q·kᵀ and probs·v over the full T×T score matrix
(4·H·Dh·T per layer per token; ``attn_flops_useful`` keeps the pairs the causal mask and the pattern allow);
KV cache as 2·L·G·Dh·bytes.
"""
from __future__ import annotations

import logging

import torch

from llmarch.config import ModelConfig

log = logging.getLogger(__name__)
KV_DTYPE = "bf16"
KV_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


def model_costs(cfg: ModelConfig, seq_len: int) -> dict:
    """Costs of ``cfg`` for sequences of ``seq_len`` tokens (per token, forward)."""
    try:
        return _from_analysis(cfg, seq_len)
    except ImportError:
        pass
    except (ValueError, AttributeError, KeyError) as e:  # the analysis does not know this config
        log.warning("llmarch.analysis could not cost this config (%s); using the local count", e)
    return _local(cfg, seq_len)


def _from_analysis(cfg: ModelConfig, seq_len: int) -> dict:
    from llmarch.analysis import count_params, forward_flops, kv_bytes_per_token

    pc = count_params(cfg)
    fl = forward_flops(cfg, seq_len, 1)
    useful = fl.attention if fl.attention_useful is None else fl.attention_useful
    return {"params": int(pc.total), "active_params": int(pc.active), "flops_per_token": fl.forward / fl.tokens,
            "attn_flops_per_token": fl.attention / fl.tokens, "attn_flops_useful": useful / fl.tokens,
            "kv_bytes_per_token": float(kv_bytes_per_token(cfg, KV_DTYPE)), "kv_dtype": KV_DTYPE,
            "source": "llmarch.analysis"}


def _local(cfg: ModelConfig, seq_len: int) -> dict:
    from llmarch.model import build
    from llmarch.nn.patterns import build_pattern

    model = build(cfg, device="meta")
    params = sum(p.numel() for p in model.parameters())  # tied weights are listed once
    block_macs = sum(p.numel() for name, p in model.named_parameters()
                     if p.dim() >= 2 and ".layers." in f".{name}")
    head_macs = cfg.d_model * cfg.vocab_size
    T = seq_len
    attn = 4 * cfg.n_heads * cfg.dh * T * cfg.n_layers  # per token, full T x T matrix
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    fractions = {p: float((build_pattern(p, window=cfg.window).render(T) & causal).sum()) / (T * T)
                 for p in set(cfg.pattern)}
    frac = sum(fractions[cfg.layer_pattern(i)] for i in range(cfg.n_layers)) / cfg.n_layers
    kv = 2 * cfg.n_layers * cfg.kv_heads * cfg.dh * KV_BYTES[KV_DTYPE]
    return {"params": int(params), "active_params": int(params), "flops_per_token": 2 * (block_macs + head_macs) + attn,
            "attn_flops_per_token": float(attn), "attn_flops_useful": attn * frac, "kv_bytes_per_token": float(kv),
            "kv_dtype": KV_DTYPE, "source": "local"}


__all__ = ["model_costs"]
