"""How an attention layer runs its pattern (the ``sparse.execution`` config value).

``mask``: the reference. The pattern, causality and padding become one dense boolean [B|1, 1, T, S] mask handed
to the attention kernel (``attn_kernel``): memory O(T S). ``blocks``: the block-sparse path of
:mod:`llmarch.nn.block_sparse`, whose cost follows the keys the pattern allows. It runs whenever a forward covers
the sequence from slot 0 (training, scoring, a cache's prefill) and the pattern has a plan; incremental decoding
(T new queries over a cache) uses the mask path, whose cost is already O(T S) with T small.

Both take q [B, H, T, Dh], k [B, G, S, Dh], v [B, G, S, Dv] and return [B, H, T, Dv].
"""
from __future__ import annotations

from typing import Callable

import torch

from llmarch.nn.block_sparse import block_sparse_attention
from llmarch.registry import Registry

Execution = Callable[..., torch.Tensor]
EXECUTIONS: Registry[Execution] = Registry("sparse.execution")


@EXECUTIONS.register("mask")
def masked(q, k, v, ctx, pattern, k_start: int, *, kernel, scale: float, dropout_p: float = 0.0,
           block: int = 64) -> torch.Tensor:
    S = k.shape[2]
    mask, causal = ctx.mask(pattern, k_start, S)
    return kernel(q, k, v, mask=mask, bias=ctx.bias(k_start, S), scale=scale, causal=causal, dropout_p=dropout_p)


@EXECUTIONS.register("blocks")
def blocks(q, k, v, ctx, pattern, k_start: int, *, kernel, scale: float, dropout_p: float = 0.0,
           block: int = 64) -> torch.Tensor:
    T, S = q.shape[2], k.shape[2]
    whole = k_start == 0 and ctx.q_start == 0 and S == T and ctx.document_ids is None  # packed rows: the mask
    plan = pattern.plan(S, block) if whole else None
    if plan is None:
        return masked(q, k, v, ctx, pattern, k_start, kernel=kernel, scale=scale, dropout_p=dropout_p)
    if ctx.positions.score_bias(ctx.q_idx[:1], ctx.q_idx[:1]) is not None:
        raise ValueError("sparse.execution: 'blocks' cannot add a position score bias (alibi); use 'mask'")
    if dropout_p > 0:
        raise ValueError("sparse.execution: 'blocks' has no attention dropout; set attn_dropout=0 or use 'mask'")
    return block_sparse_attention(q, k, v, pattern, plan, block=block, scale=scale, causal=ctx.causal,
                                  key_padding=ctx.key_padding, global_mask=ctx.global_mask)
