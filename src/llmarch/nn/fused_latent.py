"""Multi-head latent attention (DeepSeek-V2) as the attention half of a native decode layer (``latent.c``'s
``mla_t``): the query (straight, or through its own normalised latent), the compressed latent and the rope key,
their rotation and cache write, attention absorbed into the latent, and the per-head value up-projection, in the
one call :mod:`llmarch.nn.fused_decode` makes per layer (its record: :mod:`llmarch.nn.fused_layers`). The eager
layer runs ~25 torch ops for this.

A :class:`~llmarch.nn.latent_attention.LatentAttention` qualifies when it attends absorbed at decode time
(``absorb`` "decode" or "always": the form computed here; "never" keeps its naive form eagerly), with the sdpa or
naive kernel, mask execution, a dense causal or sliding-window pattern, fp32 RMSNorms, and projections the native
kernel reads (fp32 with current blocked copies, or int8; bf16 in a bf16 layer); ``kv_up`` is read as its plain
weight (an int8 one through a dequantized fp32 copy, as the eager absorbed form dequantizes it).
"""
from __future__ import annotations

import torch

from llmarch.native import decode as native_decode
from llmarch.nn.latent_attention import LatentAttention, LowRankQuery
from llmarch.nn.norm import RMSNorm


def _rms(m, dtype: torch.dtype) -> bool:
    w = m.weight
    return type(m) is RMSNorm and w.dtype == dtype and w.device.type == "cpu" and w.is_contiguous()


def _up_weight(m, dtype: torch.dtype):
    """kv_up's row-major weight [H (Dn + Dv), R] of ``dtype`` and the tensors it is read from, or None."""
    from llmarch.infer.quantize import Int8Linear  # llmarch.infer imports llmarch.model, which imports this

    if type(m) is Int8Linear:
        return (m.dequantize().contiguous(), [m.qweight, m.scales]) if dtype == torch.float32 else None
    w = getattr(m, "weight", None)
    if w is None or w.dtype != dtype or w.device.type != "cpu":
        return None
    return w.contiguous(), [w]


def record(a: LatentAttention, product, dtype: torch.dtype = torch.float32):
    """(mla record, tensors read, module edges, called modules) of a latent attention for a layer of ``dtype``, or
    None where it does not qualify (see the module). ``product(m, dtype)``: :func:`llmarch.nn.fused_layers.product`."""
    if type(a) is not LatentAttention or a.absorb not in ("decode", "always") or not _rms(a.kv_norm, dtype):
        return None
    low = type(a.q) is LowRankQuery
    if low and (not _rms(a.q.norm, dtype) or a.q.up.bias is not None):
        return None
    linears = [a.q.up if low else a.q, a.q.down if low else None, a.kv_down]
    products = [None if m is None else product(m, dtype) for m in linears]
    up = _up_weight(a.kv_up, dtype)
    if up is None or any(p is None for m, p in zip(linears, products) if m is not None):
        return None
    empty = (native_decode._Product(), [])
    q, q_down, kv_down = [empty if p is None else p for p in products]
    record = native_decode._Mla(
        a.n_heads, a.kv_lora_rank, a.qk_nope_head_dim, a.qk_rope_head_dim, a.v_head_dim, a.q_lora_rank if low else 0,
        a.q.norm.eps if low else 0.0, a.kv_norm.eps, q[0], q_down[0], kv_down[0],
        a.q.norm.weight.data_ptr() if low else None, a.kv_norm.weight.data_ptr(), up[0].data_ptr())
    tensors = [*q[1], *q_down[1], *kv_down[1], a.kv_norm.weight, *up[1], up[0]]
    edges = [(a, name, getattr(a, name)) for name in ("q", "kv_down", "kv_norm", "kv_up")]
    called = [a, a.q, a.kv_down, a.kv_norm]
    if low:
        tensors.append(a.q.norm.weight)
        edges += [(a.q, name, getattr(a.q, name)) for name in ("down", "norm", "up")]
        called += [a.q.down, a.q.norm, a.q.up]
    return record, [t for t in tensors if t is not None], edges, called
