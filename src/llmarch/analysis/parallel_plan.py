"""Per-rank memory and communication of a training step on a device mesh (``llmarch plan --mesh dp=2,tp=2``).

Parameters per rank follow what :mod:`llmarch.train.parallel` shards: tensor parallel splits the embedding,
attention projections, dense FFN and LM head over ``tp`` (Megatron-LM, Shoeybi et al. 2019; with fewer kv heads
than tp ranks each rank holds one kv head); expert parallel the
routed experts over ``ep``; pipeline parallel the blocks over ``pp`` (embedding on the first stage, head on the
last; the larger stage is reported); FSDP2 then divides everything by ``dp`` (ZeRO-3, Rajbhandari et al. 2020).
Communication counts bytes each rank sends per optimizer step with ring collectives (all-reduce 2(n-1)/n of the
buffer, all-gather and reduce-scatter (n-1)/n), no overlap or compression assumed.
"""
from __future__ import annotations

import math

from llmarch.analysis.activations import (layer_activation_bytes_per_token, norm_bytes_per_token,
                                         outer_bytes_per_token, score_bias_bytes_per_token)
from llmarch.analysis.memory import dtype_bytes
from llmarch.analysis.params import count_params
from llmarch.config import ModelConfig

TP_SPLIT = ("embeddings", "attn_q", "attn_k", "attn_v", "attn_o", "ffn", "head")
BLOCK = ("attn_q", "attn_k", "attn_v", "attn_o", "attn_kv_a", "attn_latent_norms", "attn_kv_b", "attn_global",
         "cross_q", "cross_kv", "cross_o", "ffn", "router", "experts", "shared_experts", "norms", "retrieval")


def parse_mesh(text: str) -> dict[str, int]:
    """``"dp=2,tp=2"`` -> {"dp": 2, "tp": 2, "ep": 1, "pp": 1}."""
    out = {"dp": 1, "tp": 1, "ep": 1, "pp": 1}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, value = part.partition("=")
        if name not in out or not value.isdigit() or int(value) < 1:
            raise ValueError(f"--mesh: {part!r} is not AXIS=N with AXIS one of dp, tp, ep, pp and N >= 1 "
                             "(e.g. --mesh dp=2,tp=2)")
        out[name] = int(value)
    return out


def rank_params(cfg: ModelConfig, dp: int = 1, tp: int = 1, ep: int = 1, pp: int = 1, fsdp: bool = True) -> int:
    """Parameters one rank holds (the largest pipeline stage)."""
    comp = count_params(cfg).components
    local = {k: v / (tp if k in TP_SPLIT else 1) / (ep if k == "experts" else 1) for k, v in comp.items()}
    for k in ("attn_k", "attn_v"):  # fewer kv heads than tp ranks: each rank holds a copy of one kv head
        if k in comp and cfg.kv_heads < tp:
            local[k] = comp[k] / cfg.kv_heads
    blocks = sum(v for k, v in local.items() if k in BLOCK) / pp
    rest = {k: v for k, v in local.items() if k not in BLOCK}
    first = sum(v for k, v in rest.items() if k in ("embeddings", "token_types", "positions", "embed_norm"))
    last = sum(rest.values()) - first
    stage = blocks + (max(first, last) if pp > 1 else first + last)
    return math.ceil(stage / dp) if fsdp else math.ceil(stage)


def rank_activations(cfg: ModelConfig, seq_len: int, batch: int, w: float, tp: int = 1, pp: int = 1,
                     sp: bool = False, micro_batches: int | None = None) -> tuple[float, float]:
    """Activation bytes the largest rank keeps for the backward: (plain, with checkpointed blocks). Tensor
    parallel splits heads, F and the vocabulary; sequence parallel also the norms and block inputs over T; under
    1F1B pipeline stage s holds min(pp - s, M) of the M micro-batches (``micro_batches``, default pp)."""
    local = cfg.replace(n_heads=cfg.n_heads // tp, n_kv_heads=max(cfg.kv_heads // tp, 1), d_ff=cfg.d_ff // tp,
                        head_dim=cfg.dh) if tp > 1 else cfg
    L, M, tokens = cfg.n_layers // pp, micro_batches or pp, batch * seq_len
    cut = norm_bytes_per_token(cfg, w) * (1 - 1 / tp) if sp else 0.0  # a norm on T / tp tokens
    bias = score_bias_bytes_per_token(local, seq_len, max(batch // M, 1))  # per micro-batch
    layers = [layer_activation_bytes_per_token(local, i, w, seq_len=seq_len) - 2 * cut + bias for i in range(L)]
    plain, ckpt = [], []
    for s in sorted({0, pp - 1}):
        last = s == pp - 1
        outer = outer_bytes_per_token(local, w, L, tp, first=s == 0, last=last) - (cut if last and cfg.final_norm
                                                                                  else 0)
        held = tokens * min(pp - s, M) / M
        plain.append(held * (sum(layers) + outer))
        ckpt.append(held * (L * w * cfg.d_model / (tp if sp else 1) + outer) + tokens / M * max(layers))
    return max(plain), max(ckpt)


def mesh_plan(cfg: ModelConfig, seq_len: int, batch: int = 1, dtype: str = "fp32", dp: int = 1, tp: int = 1,
              ep: int = 1, pp: int = 1, fsdp: bool = True, micro_batches: int | None = None,
              sp: bool = False) -> dict[str, float]:
    """Bytes per rank of one step: weights, grads, AdamW state, activations (plain and with checkpointed blocks);
    bytes sent per step by each axis. ``batch`` is sequences per data-parallel rank; pipeline runs them as
    ``micro_batches`` (default pp) under 1F1B; ``sp``: sequence parallel on the tp ranks."""
    w = dtype_bytes(dtype)
    n = rank_params(cfg, dp, tp, ep, pp, fsdp)
    full_stage = rank_params(cfg, 1, tp, ep, pp, fsdp=False)  # what FSDP gathers / DDP all-reduces
    L = cfg.n_layers // pp
    tokens = batch * seq_len
    act, act_ckpt = rank_activations(cfg, seq_len, batch, w, tp, pp, sp, micro_batches)
    ring = lambda k: (k - 1) / k  # noqa: E731
    D = cfg.d_model
    comm = {
        "dp": (3 * ring(dp) if fsdp else 2 * ring(dp)) * full_stage * w,  # FSDP: gather fwd + bwd, reduce-scatter
        "tp": (4 * L + 2) * 2 * ring(tp) * tokens * D * w,  # 2 all-reduces per block fwd + 2 bwd, embedding
        "ep": 4 * sum(1 for i in range(L) if cfg.moe is not None and cfg.moe.is_moe_layer(i))
        * ring(ep) * tokens * (cfg.moe.top_k if cfg.moe else 0) * D * w,  # dispatch + combine, fwd + bwd
        "pp": (2 * tokens * D * w if pp > 1 else 0.0),  # activations forward, their gradients back, per boundary
    }
    out = {"params": n, "weights": n * w, "grads": n * w, "adamw": 8.0 * n, "activations": act,
           "activations_checkpointed": act_ckpt,
           **{f"comm_{k}": v for k, v in comm.items()}}
    out["total"] = out["weights"] + out["grads"] + out["adamw"] + out["activations"]
    out["comm_total"] = sum(comm.values())
    return out


__all__ = ["mesh_plan", "rank_params", "rank_activations", "parse_mesh"]
