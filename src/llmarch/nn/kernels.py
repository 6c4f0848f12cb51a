"""Attention kernels: the same function three ways, held equal by tests.

All take q [B, H, T, Dh], k [B, G, S, Dh], v [B, G, S, Dv] (G divides H: grouped-query attention), an optional
boolean ``mask`` [B|1, 1, T, S] (True = attend), an optional additive ``bias`` [B|1, H, T, S], and return
[B, H, T, Dv]. ``causal=True`` means "the mask is exactly lower-triangular with T == S" (lets SDPA skip the mask).
Softmax runs in fp32 in the reference kernels.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from llmarch.native import flash
from llmarch.nn import widened
from llmarch.registry import Registry

Kernel = Callable[..., torch.Tensor]
KERNELS: Registry[Kernel] = Registry("attn_kernel")


def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[B, G, S, D] -> [B, G*groups, S, D] (each kv head serves ``groups`` query heads)."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def _full_mask(mask, T: int, S: int, causal: bool, device) -> torch.Tensor | None:
    if causal:
        return torch.ones(T, S, dtype=torch.bool, device=device).tril(S - T)[None, None]
    return mask


# One query per sequence (decoding) over this many keys or more (batch x keys), fp32 on the CPU: two batched
# products and a softmax over the grouped heads. torch's fused kernel pays a per-call setup that only short caches
# repay (one thread, H 8, G 2, Dh 64, microseconds fused / products: batch 1 at 32 / 128 / 512 / 2048 keys 14 / 23
# / 62 / 240 against 22 / 27 / 45 / 143; batch 8 at 32 / 128 / 2048 keys 52 / 144 / 2166 against 35 / 84 / 1444).
SINGLE_QUERY_MIN_KEYS = 256


def _single_query(q, k, v, mask, scale) -> torch.Tensor:
    """q [B, H, 1, Dh] against k, v [B, G, S, D]; mask [B|1, 1, 1, S] or None -> [B, H, 1, Dv]. The H / G query
    heads sharing a kv head are the rows of one product, so no kv copy is made."""
    B, H, _, Dh = q.shape
    G = k.shape[1]
    scores = torch.matmul(q.reshape(B, G, H // G, Dh), k.transpose(-1, -2)).mul_(scale)  # [B, G, H/G, S]
    if mask is not None:
        scores.masked_fill_(~mask, float("-inf"))
    return torch.matmul(scores.softmax(-1), v).reshape(B, H, 1, v.shape[-1])


def _additive(mask: torch.Tensor | None) -> torch.Tensor | None:
    return None if mask is None else torch.zeros(mask.shape, device=mask.device).masked_fill_(~mask, float("-inf"))


class _WideFlash(torch.autograd.Function):
    """torch's CPU flash attention (forward and backward) for bf16 q, k, v, computed in fp32; saves what its bf16
    kernel saves (q, k, v and the output in bf16, the fp32 log-sum-exp; the bool mask), so training holds the same
    memory. Gradients rounded to bf16."""

    @staticmethod
    def forward(ctx, q, k, v, mask, causal: bool, scale):
        kernel = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
        with torch.autocast("cpu", enabled=False):
            out, lse = kernel(q.float(), k.float(), v.float(), 0.0, causal, attn_mask=_additive(mask), scale=scale)
        out = out.to(torch.bfloat16)
        ctx.save_for_backward(q, k, v, out, lse, mask)
        ctx.causal, ctx.scale = causal, scale
        return out

    @staticmethod
    def backward(ctx, g):
        q, k, v, out, lse, mask = ctx.saved_tensors
        back = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
        with torch.autocast("cpu", enabled=False):
            grads = back(g.float(), q.float(), k.float(), v.float(), out.float(), lse, 0.0, ctx.causal,
                         attn_mask=_additive(mask), scale=ctx.scale)
        return (*(t.to(torch.bfloat16) for t in grads), None, None, None)


def _bf16_decode_query(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """One bf16 query per sequence on the CPU, no gradient, eager, no CPU autocast (see :func:`sdpa_attention`)."""
    return (q.dtype == torch.bfloat16 and q.device.type == "cpu" and q.dim() == 4 and q.shape[2] == 1
            and not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad))
            and not torch.compiler.is_compiling() and not torch.is_autocast_enabled("cpu"))


def _key_ranges(mask: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(lo, hi) [B, T] int32 where every query's row of the boolean ``mask`` [B|1, 1, T, S] is one run of keys
    lo <= s < hi (the masks llmarch's attention builds: causal, also after a cache; padded rows, whose padding queries
    see every key; packed documents; sliding windows), which llmarch's attention kernels take; else None. Only
    checked where they could take it (CPU, at least flash.MIN_QUERIES queries), and once per mask: the layers of a
    forward share it."""
    B, T, S = q.shape[0], q.shape[-2], k.shape[-2]
    if (mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[1:] != (1, T, S) or mask.shape[0] not in (1, B)
            or T < flash.MIN_QUERIES or mask.device.type != "cpu" or not flash.runnable()):
        return None
    memo = getattr(mask, "_llmarch_key_ranges", None)
    if memo is not None and memo[0] == mask._version and memo[1] == B:
        return memo[2]
    m = mask[:, 0]  # [B|1, T, S]
    lo = m.to(torch.uint8).argmax(-1)  # the first key seen (0 in a row of none)
    hi = S - m.flip(-1).to(torch.uint8).argmax(-1)  # past the last (S in a row of none: no match below)
    keys = torch.arange(S)
    got = None
    if torch.equal(m, (keys >= lo[..., None]) & (keys < hi[..., None])):
        got = tuple(r.to(torch.int32).expand(B, T).contiguous() for r in (lo, hi))
    mask._llmarch_key_ranges = (mask._version, B, got)
    return got


def _alibi_slopes(bias: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor | None:
    """ALiBi's slopes [H] (fp32) where ``bias`` [1, H, T, S] is exactly -(slope_h * |t + S - T - s|) as
    ``llmarch.nn.position.AlibiPositions`` builds it for queries at the end of the keys, which llmarch's attention
    kernels add to the scores themselves; else None. Checked once per bias tensor, where the kernels could run."""
    H, T, S = q.shape[1], q.shape[-2], k.shape[-2]
    if (bias.dtype != torch.float32 or bias.shape != (1, H, T, S) or S < 2 or T < flash.MIN_QUERIES
            or bias.device.type != "cpu" or not flash.runnable()):
        return None
    memo = getattr(bias, "_llmarch_alibi", None)
    if memo is not None and memo[0] == bias._version:
        return memo[1]
    off = S - T
    j = off + 1 if off + 1 < S else off - 1  # a key one step from the first query: its bias is -slope
    slopes = (-bias[0, :, 0, j]).contiguous()
    dist = ((torch.arange(T)[:, None] + off) - torch.arange(S)[None, :]).abs().float()
    got = slopes if torch.equal(bias[0], -(slopes[:, None, None] * dist)) else None
    bias._llmarch_alibi = (bias._version, got)
    return got


@KERNELS.register("sdpa")
def sdpa_attention(q, k, v, mask=None, bias=None, scale=None, causal=False, dropout_p=0.0) -> torch.Tensor:
    """torch's fused scaled_dot_product_attention (flash / memory-efficient / math backends); a single query
    per sequence over a long enough cache (fp32, CPU, no gradient) takes :func:`_single_query` instead. bf16 on a
    CPU without bf16 products (``llmarch.nn.widened``) runs in fp32 and rounds the output once: torch's bf16
    kernels there took 5-6x the fp32 time for forward + backward at [1-4, 8, 512, 64] and 4-6x for a decode
    step's single query (forward alone level), with the same error against fp64. bf16 decode steps (a single query,
    no gradient) run that way on every CPU: on an AVX-512 EPYC with bf16 products torch's bf16 kernel took 1.6-10x
    the widened time at 64-2048 keys, and its values differ from the one-rounding form the native bf16 decode layer
    computes (:mod:`llmarch.nn.fused_decode`). Before all that, attention of many queries per sequence, causal (also
    after a cache), unmasked, or under a mask whose rows are each one run of keys (padding on either side, packed
    documents, sliding windows: :func:`_key_ranges`), without bias (but ALiBi's, :func:`_alibi_slopes`) or dropout,
    runs on llmarch's kernels where they build
    (:mod:`llmarch.native.flash`, AVX-512), forward and backward, bf16 widened to fp32: on a Zen 5 core the forward
    1.5-2.6x torch's fp32 kernel and 1.8-2.7x its bf16 one, with the same error against fp64 (docs/performance.md,
    twenty-first round)."""
    if dropout_p == 0.0 and (bias is None or (slopes := _alibi_slopes(bias, q, k)) is not None) and (
            mask is None or (ranges := _key_ranges(mask, q, k)) is not None) and (
            y := flash.forward(q, k, v, 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale, causal,
                               None if mask is None else ranges, None if bias is None else slopes)) is not None:
        return y
    if widened.takes(q) or _bf16_decode_query(q, k, v):
        if bias is None and dropout_p == 0.0 and torch.is_grad_enabled() and any(
                t.requires_grad for t in (q, k, v)):
            return _WideFlash.apply(q, k, v, mask, causal, scale)
        with torch.autocast("cpu", enabled=False):
            out = sdpa_attention(q.float(), k.float(), v.float(), mask, None if bias is None else bias.float(),
                                 scale, causal, dropout_p)
        return out.to(torch.bfloat16)
    if (q.shape[2] == 1 and not causal and bias is None and dropout_p == 0.0 and q.device.type == "cpu"
            and q.dtype == torch.float32 and k.shape[0] * k.shape[2] >= SINGLE_QUERY_MIN_KEYS
            and not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad))):
        return _single_query(q, k, v, mask, 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale)
    gqa = k.shape[1] != q.shape[1]
    if bias is not None:
        m = _full_mask(mask, q.shape[2], k.shape[2], causal, q.device)
        attn_mask = bias.to(q.dtype) if m is None else bias.to(q.dtype).masked_fill(~m, float("-inf"))
        return _torch_sdpa(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, scale=scale, enable_gqa=gqa)
    return _torch_sdpa(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=causal, scale=scale, enable_gqa=gqa)


# inference and keys from a cache on a GPU stay off cuDNN's attention (see _torch_sdpa)
CUDNN_ONLY_FOR_TRAINING = True


def _torch_sdpa(q, k, v, **kw) -> torch.Tensor:
    """``F.scaled_dot_product_attention``. On an accelerator, a call without gradients or with keys from a cache
    (S != T) runs with cuDNN's backend set aside while flash or memory-efficient attention is enabled: cuDNN builds
    a plan for each new shape, and inference meets a new shape with every prompt length and decode step. On an
    H200 (torch 2.11, cuDNN 9.19; docs/performance.md, GPU run) eager batch-1 decode of a 7B model ran at 19 against
    49 tokens/s over 48 tokens (8 tokens/s over 176 new lengths), and a prefill of a new length took 66 against
    25 ms; on a repeated length the two were level. Training (equal query and key lengths, gradients: shapes
    repeat) keeps torch's choice; a compiled step chooses at trace time. The flag is process-wide for the call's
    length, as torch's own ``sdpa_kernel`` context is."""
    if (CUDNN_ONLY_FOR_TRAINING and q.device.type != "cpu" and not torch.compiler.is_compiling()
            and (k.shape[2] != q.shape[2] or not (torch.is_grad_enabled() and any(
                t.requires_grad for t in (q, k, v))))
            and torch.backends.cuda.cudnn_sdp_enabled()
            and (torch.backends.cuda.flash_sdp_enabled() or torch.backends.cuda.mem_efficient_sdp_enabled())):
        torch.backends.cuda.enable_cudnn_sdp(False)
        try:
            return F.scaled_dot_product_attention(q, k, v, **kw)
        finally:
            torch.backends.cuda.enable_cudnn_sdp(True)
    return F.scaled_dot_product_attention(q, k, v, **kw)


def attention_probs(q, k, mask=None, bias=None, scale=None, causal=False) -> torch.Tensor:
    """softmax(q k^T * scale + bias, masked) in fp32: the attention weights [B, H, T, S]."""
    k = _repeat_kv(k, q.shape[1] // k.shape[1])
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = (q.float() @ k.float().transpose(-1, -2)) * scale  # [B, H, T, S]
    if bias is not None:
        scores = scores + bias.float()
    m = _full_mask(mask, q.shape[2], k.shape[2], causal, q.device)
    if m is not None:
        scores = scores.masked_fill(~m, float("-inf"))
    return scores.softmax(dim=-1)


@KERNELS.register("naive")
def naive_attention(q, k, v, mask=None, bias=None, scale=None, causal=False, dropout_p=0.0) -> torch.Tensor:
    """softmax(q k^T * scale + bias, masked) v, written out (the readable spec)."""
    v = _repeat_kv(v, q.shape[1] // v.shape[1])
    probs = attention_probs(q, k, mask, bias, scale, causal)
    if dropout_p > 0:
        probs = F.dropout(probs, dropout_p)
    return (probs @ v.float()).to(q.dtype)


@KERNELS.register("flash")
def tiled_attention(q, k, v, mask=None, bias=None, scale=None, causal=False, dropout_p=0.0,
                    block: int = 64) -> torch.Tensor:
    """The online-softmax tiling of FlashAttention (Dao et al. 2022), in plain torch: keys are visited one block
    at a time, keeping a running max ``m``, normaliser ``l`` and output ``acc`` per query, so the [T, S] score
    matrix is never held whole. A reference for the algorithm, not a fast kernel."""
    if dropout_p > 0:
        raise ValueError("attn_dropout: the tiled reference kernel has no dropout; use attn_kernel='sdpa'")
    groups = q.shape[1] // k.shape[1]
    k, v = _repeat_kv(k, groups), _repeat_kv(v, groups)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    B, H, T, _ = q.shape
    S = k.shape[2]
    m_full = _full_mask(mask, T, S, causal, q.device)
    qf = q.float() * scale
    m_run = torch.full((B, H, T, 1), float("-inf"), device=q.device)
    l_run = torch.zeros(B, H, T, 1, device=q.device)
    acc = torch.zeros(B, H, T, v.shape[-1], device=q.device)
    for s0 in range(0, S, block):
        s1 = min(s0 + block, S)
        scores = qf @ k[:, :, s0:s1].float().transpose(-1, -2)  # [B, H, T, b]
        if bias is not None:
            scores = scores + bias[..., s0:s1].float()
        if m_full is not None:
            scores = scores.masked_fill(~m_full[..., s0:s1], float("-inf"))
        m_new = torch.maximum(m_run, scores.amax(-1, keepdim=True))
        safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)  # rows with nothing seen yet
        p = torch.exp(scores - safe)
        correction = torch.exp(m_run - safe)
        l_run = l_run * correction + p.sum(-1, keepdim=True)
        acc = acc * correction + p @ v[:, :, s0:s1].float()
        m_run = m_new
    return (acc / l_run).to(q.dtype)
