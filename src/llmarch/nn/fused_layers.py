"""The records of the native decode layer (``llmarch.native.decode``'s ``layer_t``, one per block): which decoder
blocks it computes, and the pointers it reads (gains, biases, the products' blocked or int8 weights, an MoE or
latent-attention record). :mod:`llmarch.nn.fused_decode` builds a stack's plan from them and makes the calls.

A block qualifies when it is
- a pre-norm block (no fp16 clamp) whose two norms are RMSNorm or LayerNorm (same kind);
- with grouped-query :class:`~llmarch.nn.attention.Attention` (MHA, GQA, MQA; any scale; qkv / output biases) or
  latent attention :mod:`llmarch.nn.fused_latent` takes, with a dense causal or sliding-window pattern, mask
  execution, the sdpa or naive kernel;
- and an FFN that is a :class:`~llmarch.nn.ffn.GLU` or :class:`~llmarch.nn.ffn.MLP` with silu, gelu_tanh, gelu or
  relu, or a mixture of experts :mod:`llmarch.nn.fused_moe` takes;
- with every product on a weight the native kernel reads: fp32 with a current blocked copy
  (``llmarch.nn.dense.pack``; ``generate`` packs when that pays back) or an
  :class:`~llmarch.infer.quantize.Int8Linear` (with fp32 or int8 activations, as the layer's eager product).
Those are fp32 layers. A bf16 layer is the same with everything bf16 (blocked bf16 copies; no int8): it rounds
where the eager bf16 step rounds, which it then matches bit for bit up to the rare rounding summation order flips
(tests: ≥ 95 % of logits, ≥ 99 % of the cache).
"""
from __future__ import annotations

import ctypes

import torch
from torch import nn

from llmarch.native import decode as native_decode
from llmarch.native import fp32 as native_fp32
from llmarch.native import int8 as native_int8
from llmarch.native import w8a8 as native_w8a8
from llmarch.nn import dense, fused_latent, fused_moe
from llmarch.nn.attention import Attention
from llmarch.nn.block import PreNormBlock
from llmarch.nn.ffn import GLU, MLP
from llmarch.nn.latent_attention import LatentAttention
from llmarch.nn.moe import MoE
from llmarch.nn.norm import LayerNorm, RMSNorm
from llmarch.nn.patterns import Dense, Sliding


def plain(t: torch.Tensor | None, dtype: torch.dtype = torch.float32) -> bool:  # (or the bf16 layer's dtype)
    return t is None or (t.dtype == dtype and t.device.type == "cpu" and t.is_contiguous())


def product(m: nn.Module, dtype: torch.dtype = torch.float32):
    """(record, tensors it reads from) for one projection, or None where the kernel cannot take it: a weight of
    the layer's dtype with a current blocked copy (fp32 or bf16), or (fp32 layers) an Int8Linear. The record
    points into the copy, which the plan does not hold: dropping or remaking a copy changes ``dense.generation()``
    or the weight's version, and the plan is re-read before its next use (so ``unpack_weights`` frees the memory
    at once). A bf16 bias is read through an fp32 copy (exact), listed with the tensors so the plan keeps it."""
    from llmarch.infer.quantize import Int8Linear

    bias = getattr(m, "bias", None)
    if not plain(bias, dtype):
        return None
    wide = None if bias is None or dtype == torch.float32 else bias.float()
    b = None if bias is None else (bias if wide is None else wide).data_ptr()
    if type(m) in (dense.Linear, nn.Linear):
        copy = dense.packed(m.weight)
        if not isinstance(copy, native_fp32.Blocked) or copy.data.dtype != dtype or m.weight.dtype != dtype:
            return None
        kind = 0 if dtype == torch.float32 else 2
        return native_decode._Product(copy.data.data_ptr(), None, b, kind), [m.weight, bias, wide]
    if type(m) is Int8Linear and dtype == torch.float32 and m.scales.dtype == torch.float32:
        copy = int8_copy(m)
        if copy is None:
            return None
        return native_decode._Product(copy[0], copy[1], b, copy[2]), [m.qweight, m.scales, bias]
    return None


def int8_copy(m: nn.Module) -> tuple[int, int, int] | None:
    """(weight pointer, scales pointer, kind) of an Int8Linear's kernel copy: gemv.c's blocked int8 weight (kind 1)
    or, for int8 activations, w8a8.c's (kind 3); None where that kernel is unavailable."""
    a8 = m.activations == "int8"
    if not (native_w8a8 if a8 else native_int8).available():
        return None
    w, s = (native_w8a8 if a8 else native_int8).blocked(m.qweight, m.scales)
    return w.data_ptr(), s.data_ptr(), 3 if a8 else 1


def norm(m: nn.Module, dtype: torch.dtype):
    """(kind, gain, bias) of a norm decode.c computes (RMSNorm, LayerNorm; of the layer's dtype), or None."""
    kind = native_decode.NORMS.get(type(m).__name__) if type(m) in (RMSNorm, LayerNorm) else None
    bias = getattr(m, "bias", None)
    return None if kind is None or not plain(m.weight, dtype) or not plain(bias, dtype) else (kind, m.weight, bias)


def dense_ffn(f: nn.Module, dtype: torch.dtype = torch.float32):
    """(up, down) product records, tensors, module edges, called modules of a GLU or MLP, or None."""
    if type(f) not in (GLU, MLP) or f.activation not in native_decode.ACTIVATIONS:
        return None
    up = f.gate_up if type(f) is GLU else f.up
    products = [product(up, dtype), product(f.down, dtype)]
    if any(p is None for p in products):
        return None
    edges = [(f, "gate_up" if type(f) is GLU else "up", up), (f, "down", f.down)]
    return [p[0] for p in products], [t for p in products for t in p[1]], edges, [f, f.dropout, up, f.down]


def ffn_record(f: nn.Module, dtype: torch.dtype):
    """(F, activation, gated, up and down records, MoE record or None, tensors, edges, called) of a block's FFN,
    or None."""
    if type(f) is MoE:
        moe = fused_moe.record(f, dense_ffn, dtype)
        if moe is None:
            return None
        bank = f.experts
        return (bank.d_ff, bank.activation, fused_moe.gated_bank(bank), [native_decode._Product()] * 2, *moe)
    parts = dense_ffn(f, dtype)
    return None if parts is None else (f.down.in_features, f.activation, type(f) is GLU, parts[0], None, *parts[1:])


def attention_record(a: nn.Module, dtype: torch.dtype):
    """(H, G, Dh, rotation width, qkv record, latent record or None, tensors, edges, called modules) of a block's
    attention, or None."""
    if (a.kernel_name not in ("sdpa", "naive") or a.execution_name != "mask"
            or type(a.pattern) not in (Dense, Sliding)):
        return None
    if type(a) is LatentAttention:
        mla = fused_latent.record(a, product, dtype)
        return None if mla is None else (a.n_heads, 1, a.v_head_dim, a.qk_rope_head_dim, native_decode._Product(),
                                         *mla)
    qkv = product(a.qkv, dtype) if type(a) is Attention else None
    return None if qkv is None else (a.n_heads, a.n_kv_heads, a.head_dim, a.head_dim, qkv[0], None, qkv[1],
                                     [(a, "qkv", a.qkv)], [a, a.qkv])


def layer(block: nn.Module, dtype: torch.dtype):
    """(record, cache index, lookback, tensors, module edges, called modules, kept records, rotation width) of one
    block for activations of ``dtype``, or None (see the module)."""
    if type(block) is not PreNormBlock or type(block.guard) is not nn.Identity:
        return None
    a = block.attn
    n1, n2, ffn = norm(block.attn_norm, dtype), norm(block.ffn_norm, dtype), ffn_record(block.ffn, dtype)
    att = attention_record(a, dtype) if type(a) in (Attention, LatentAttention) else None
    out = product(a.out, dtype) if att is not None else None
    if ffn is None or n1 is None or n2 is None or n1[0] != n2[0] or out is None:
        return None
    H, G, Dh, rot, qkv, mla, att_tensors, att_edges, att_called = att
    F, act, gated, ffn_products, moe, ffn_tensors, ffn_edges, ffn_called = ffn
    ptr = [None if t is None else t.data_ptr() for t in (n1[1], n2[1], n1[2], n2[2])]
    record = native_decode._Layer(block.attn_norm.dim, H, G, Dh, F, n1[0], native_decode.ACTIVATIONS[act], gated,
                                  block.attn_norm.eps, block.ffn_norm.eps, a.scale, *ptr, qkv, out[0],
                                  *ffn_products, None if moe is None else ctypes.addressof(moe[0]),
                                  dtype == torch.bfloat16, None if mla is None else ctypes.addressof(mla))
    tensors = [t for t in [*n1[1:], *n2[1:], *att_tensors, *out[1], *ffn_tensors] if t is not None]
    edges = [(block, name, getattr(block, name)) for name in ("attn", "ffn", "attn_norm", "ffn_norm")]
    edges += att_edges + [(a, "out", a.out)] + ffn_edges
    called = [block, block.dropout, a.out, block.attn_norm, block.ffn_norm] + att_called + ffn_called
    return record, a.layer_idx, a.pattern.lookback, tensors, edges, called, (moe, mla), rot
