"""The decode step of a plain decoder stack with each layer in one native call (:mod:`llmarch.native.decode`).
:class:`llmarch.model.Stack` tries :func:`run` first when it has a cache and one new token per row; None means
"not here" and the eager layers run. Values: the eager layers' up to summation order and ``exp``'s last bits
(tests hold per-step logits and the cache to the eager step's at 1e-5, greedy tokens identical).

A stack qualifies when every layer is
- a pre-norm block (no fp16 clamp) whose two norms are RMSNorm or LayerNorm (fp32; same kind);
- grouped-query :class:`~llmarch.nn.attention.Attention` (MHA, GQA, MQA; any scale; qkv / output biases) with a
  dense causal or sliding-window pattern, mask execution, the sdpa or naive kernel;
- an FFN that is a :class:`~llmarch.nn.ffn.GLU` or :class:`~llmarch.nn.ffn.MLP` with silu, gelu_tanh, gelu or
  relu, or a mixture of experts :mod:`llmarch.nn.fused_moe` takes;
- with every product on a weight the native kernel reads: fp32 with a current blocked copy
  (``llmarch.nn.dense.pack``; ``generate`` packs when that pays back) or an
  :class:`~llmarch.infer.quantize.Int8Linear`.
Or, in a bf16 model, every layer is a bf16 layer (all of the above bf16, blocked bf16 copies; no MoE or int8):
each step rounds where the eager bf16 step rounds, which is then matched bit for bit up to the rare rounding
summation order flips (tests: ≥ 95 % of logits, ≥ 99 % of the cache). It serves where the eager step widens (a CPU
without bf16 products, ``llmarch.nn.widened``'s route on).
A call qualifies with fp32 (bf16 layers: bf16) CPU activations, at most ``llmarch.native.decode.MAX_ROWS`` rows,
no gradient, eval mode, no autocast or compilation, no documents, global tokens or encoder memory (a padding mask
is served), positions that add no score bias but ALiBi's and rotate whole heads (or not at all), a plain
:class:`~llmarch.nn.cache.KVCache` already holding every layer, and no forward hook on a module the eager layers
would call.

The plan (the kernel's records) is built once and reused while it is current: the same modules, the same tensors
at the same versions and storage, no packed copy made or dropped since. A LoRA wrapper, ``load_state_dict``,
``unpack_weights`` or a hook is seen at the next step.
"""
from __future__ import annotations

import ctypes
import weakref

import torch
from torch import nn
from torch.nn.modules import module as _torch_module

from llmarch import native
from llmarch.native import decode as native_decode
from llmarch.native import bf16 as native_bf16
from llmarch.native import fp32 as native_fp32
from llmarch.native import int8 as native_int8
from llmarch.nn import dense, fused_moe, widened
from llmarch.nn.attention import Attention
from llmarch.nn.block import PreNormBlock
from llmarch.nn.cache import KVCache
from llmarch.nn.ffn import GLU, MLP
from llmarch.nn.moe import MoE
from llmarch.nn.norm import LayerNorm, RMSNorm
from llmarch.nn.patterns import Dense, Sliding
from llmarch.nn.position import AlibiPositions, PositionScheme
from llmarch.nn.rope import NoRotation, Rotation

# stack -> its plan, or the (packed-copy generation, modules) at which it was found not eligible: looked at again
# once a copy is made or dropped (an fp32 stack qualifies once its weights are packed) or a module is swapped
_PLANS: "weakref.WeakKeyDictionary[nn.Module, _Plan | tuple]" = weakref.WeakKeyDictionary()


def _fp32(t: torch.Tensor | None, dtype: torch.dtype = torch.float32) -> bool:  # (or the bf16 layer's dtype)
    return t is None or (t.dtype == dtype and t.device.type == "cpu" and t.is_contiguous())


def _product(m: nn.Module, dtype: torch.dtype = torch.float32):
    """(record, tensors it reads from) for one projection, or None where the kernel cannot take it: a weight of
    the layer's dtype with a current blocked copy (fp32 or bf16), or (fp32 layers) an Int8Linear. The record
    points into the copy, which the plan does not hold: dropping or remaking a copy changes ``dense.generation()``
    or the weight's version, and the plan is re-read before its next use (so ``unpack_weights`` frees the memory
    at once). A bf16 bias is read through an fp32 copy (exact), listed with the tensors so the plan keeps it."""
    from llmarch.infer.quantize import Int8Linear

    bias = getattr(m, "bias", None)
    if not _fp32(bias, dtype):
        return None
    wide = None if bias is None or dtype == torch.float32 else bias.float()
    b = None if bias is None else (bias if wide is None else wide).data_ptr()
    if type(m) in (dense.Linear, nn.Linear):
        copy = dense.packed(m.weight)
        if not isinstance(copy, native_fp32.Blocked) or copy.data.dtype != dtype or m.weight.dtype != dtype:
            return None
        kind = 0 if dtype == torch.float32 else 2
        return native_decode._Product(copy.data.data_ptr(), None, b, kind), [m.weight, bias, wide]
    if (type(m) is Int8Linear and dtype == torch.float32 and native_int8.available()
            and m.scales.dtype == torch.float32):
        w, s = native_int8.blocked(m.qweight, m.scales)
        return native_decode._Product(w.data_ptr(), s.data_ptr(), b, 1), [m.qweight, m.scales, bias]
    return None


def _norm(m: nn.Module, dtype: torch.dtype):
    """(kind, gain, bias) of a norm decode.c computes (RMSNorm, LayerNorm; of the layer's dtype), or None."""
    kind = native_decode.NORMS.get(type(m).__name__) if type(m) in (RMSNorm, LayerNorm) else None
    bias = getattr(m, "bias", None)
    return None if kind is None or not _fp32(m.weight, dtype) or not _fp32(bias, dtype) else (kind, m.weight, bias)


def _dense_ffn(f: nn.Module, dtype: torch.dtype = torch.float32):
    """(up, down) product records, tensors, module edges, called modules of a GLU or MLP, or None."""
    if type(f) not in (GLU, MLP) or f.activation not in native_decode.ACTIVATIONS:
        return None
    up = f.gate_up if type(f) is GLU else f.up
    products = [_product(up, dtype), _product(f.down, dtype)]
    if any(p is None for p in products):
        return None
    edges = [(f, "gate_up" if type(f) is GLU else "up", up), (f, "down", f.down)]
    return [p[0] for p in products], [t for p in products for t in p[1]], edges, [f, f.dropout, up, f.down]


def _ffn(f: nn.Module, dtype: torch.dtype):
    """(F, activation, gated, up and down records, MoE record or None, tensors, edges, called) of a block's FFN,
    or None. Mixtures of experts: fp32 layers only."""
    if type(f) is MoE and dtype == torch.float32:
        moe = fused_moe.record(f, _dense_ffn)
        if moe is None:
            return None
        bank = f.experts
        return (bank.d_ff, bank.activation, fused_moe.gated_bank(bank), [native_decode._Product()] * 2, *moe)
    parts = _dense_ffn(f, dtype)
    return None if parts is None else (f.down.in_features, f.activation, type(f) is GLU, parts[0], None, *parts[1:])


def _layer(block: nn.Module, dtype: torch.dtype):
    """(record, cache index, lookback, tensors, module edges, called modules, kept records) of one block for
    activations of ``dtype``, or None (see the module)."""
    if type(block) is not PreNormBlock or type(block.guard) is not nn.Identity:
        return None
    a = block.attn
    n1, n2, ffn = _norm(block.attn_norm, dtype), _norm(block.ffn_norm, dtype), _ffn(block.ffn, dtype)
    if (type(a) is not Attention or ffn is None or n1 is None or n2 is None or n1[0] != n2[0]
            or a.kernel_name not in ("sdpa", "naive") or a.execution_name != "mask"
            or type(a.pattern) not in (Dense, Sliding)):
        return None
    F, act, gated, ffn_products, moe, ffn_tensors, ffn_edges, ffn_called = ffn
    products = [_product(a.qkv, dtype), _product(a.out, dtype)]
    if any(p is None for p in products):
        return None
    ptr = [None if t is None else t.data_ptr() for t in (n1[1], n2[1], n1[2], n2[2])]
    record = native_decode._Layer(block.attn_norm.dim, a.n_heads, a.n_kv_heads, a.head_dim, F, n1[0],
                                  native_decode.ACTIVATIONS[act], gated, block.attn_norm.eps, block.ffn_norm.eps,
                                  a.scale, *ptr, *[p[0] for p in products], *ffn_products,
                                  None if moe is None else ctypes.addressof(moe[0]), dtype == torch.bfloat16)
    tensors = [t for t in [*n1[1:], *n2[1:]] + [t for p in products for t in p[1]] + ffn_tensors if t is not None]
    edges = [(block, name, getattr(block, name)) for name in ("attn", "ffn", "attn_norm", "ffn_norm")]
    edges += [(a, "qkv", a.qkv), (a, "out", a.out)] + ffn_edges
    called = [block, block.dropout, a, a.qkv, a.out, block.attn_norm, block.ffn_norm] + ffn_called
    return record, a.layer_idx, a.pattern.lookback, tensors, edges, called, moe


class _Plan:
    """The kernel's records for every layer of a stack, and what they were read from."""

    def __init__(self, stack: nn.Module, layers: list, dtype: torch.dtype):
        self.layers, self.dtype = weakref.ref(stack.layers), dtype
        self.records = [(ctypes.addressof(r[0]), r[1], r[2]) for r in layers]
        self.head_dim, self.heads = layers[0][0].Dh, {r[0].H for r in layers}
        self.keep = [(r[0], r[6]) for r in layers]  # the records (their addresses are passed)
        self.moe = [stack.layers[i].ffn for i, r in enumerate(layers) if r[6] is not None]
        self.tensors = [t for r in layers for t in r[3]]
        self.edges = [(stack.layers, str(i), stack.layers[i]) for i in range(len(layers))]
        self.edges += [e for r in layers for e in r[4]]
        self.called = [m for r in layers for m in r[5]]
        self.generation = dense.generation()
        self.versions, self.pointers = self._state()

    def _state(self) -> tuple[list, list]:
        return [native.version(t) for t in self.tensors], [t.data_ptr() for t in self.tensors]

    def current(self, stack: nn.Module) -> bool:
        """Nothing the records were read from changed: modules, tensors (versions, storage), packed copies."""
        return (self.layers() is stack.layers and len(stack.layers) == len(self.records)
                and self.generation == dense.generation() and self._state() == (self.versions, self.pointers)
                and all(parent._modules.get(name) is child for parent, name, child in self.edges))

    def hooked(self) -> bool:
        """A forward hook on a module the eager step would call (it must see that call)."""
        return any(m._forward_hooks or m._forward_pre_hooks for m in self.called)


def _refusal(stack: nn.Module, dtype: torch.dtype) -> tuple:
    """What a refusal depends on: the activations' dtype, the packed copies, and the modules two levels below each
    layer."""
    return dtype, dense.generation(), tuple(id(m) for b in stack.layers for c in b._modules.values() if c is not None
                                     for m in (c, *c._modules.values()))


def _plan(stack: nn.Module, dtype: torch.dtype) -> _Plan | None:
    plan = _PLANS.get(stack)
    if type(plan) is tuple and plan == _refusal(stack, dtype):
        return None
    if not (isinstance(plan, _Plan) and plan.dtype == dtype and plan.current(stack)):
        layers = [_layer(block, dtype) for block in stack.layers]
        if not layers or any(r is None for r in layers) or len({r[0].Dh for r in layers}) != 1:
            _PLANS[stack] = _refusal(stack, dtype)
            return None
        plan = _PLANS[stack] = _Plan(stack, layers, dtype)
    return None if plan.hooked() else plan


def _call_fits(stack: nn.Module, x: torch.Tensor, ctx, cache) -> bool:
    return (type(cache) is KVCache and ctx.T == 1 and ctx.causal and not stack.training
            and _dtype_fits(x.dtype) and x.device.type == "cpu" and type(x) is torch.Tensor
            and x.shape[0] <= native_decode.MAX_ROWS and ctx.document_ids is None
            and ctx.global_mask is None and ctx.memory is None and not torch.is_grad_enabled()
            and (type(ctx.positions).score_bias is PositionScheme.score_bias or type(ctx.positions) is AlibiPositions)
            and not torch.compiler.is_compiling() and not torch.is_autocast_enabled("cpu")
            and not _torch_module._has_any_global_hook() and native_decode.enabled())


def _dtype_fits(dtype: torch.dtype) -> bool:
    """fp32, or bf16 where the eager bf16 step computes what the bf16 layer does: products on the native bf16
    kernel (a CPU without bf16 products), attention widened to fp32 (``llmarch.nn.widened``'s route on)."""
    return dtype == torch.float32 or (dtype == torch.bfloat16 and widened.ROUTE and native_bf16.available())


def run(stack: nn.Module, x: torch.Tensor, ctx, cache) -> torch.Tensor | None:
    """The stack's layers (not its final norm) over x [B, 1, D] in native calls, or None (run them eagerly)."""
    if not _call_fits(stack, x, ctx, cache) or not native_decode.available():
        return None
    plan = _plan(stack, x.dtype)
    if plan is None:
        return None
    B, _, D = x.shape
    rot, cos, sin, stride = ctx.rotation, None, None, 0
    if type(rot) is Rotation:
        if rot.cos.shape[-1] != plan.head_dim or rot.cos.dtype != torch.float32:
            return None
        cos, sin = rot.cos.reshape(-1, plan.head_dim), rot.sin.reshape(-1, plan.head_dim)  # [B or 1, Dh]
        cos, sin = cos.to(x.dtype).contiguous(), sin.to(x.dtype).contiguous()  # rounded, as the eager step rounds
        stride = plan.head_dim if cos.shape[0] == B else 0
    elif type(rot) is not NoRotation:
        return None
    alibi = ctx.positions.slopes if type(ctx.positions) is AlibiPositions else None  # [H], fp32 or bf16
    if alibi is not None and (not _fp32(alibi, alibi.dtype) or alibi.dtype not in (torch.float32, x.dtype)
                              or plan.heads != {alibi.numel()}):
        return None
    alibi = None if alibi is None else alibi.float()  # the bias is computed in fp32 (exact for bf16 slopes)
    for _, idx, _ in plan.records:
        k = cache.k.get(idx)
        if k is None or k.dtype != x.dtype or k.shape[0] != B:
            return None
    valid = ctx.key_padding  # [B, S_total] bool (True: a real token), or None
    if valid is not None:
        if valid.dtype != torch.bool or valid.shape != (B, cache.length + 1):
            return None
        valid = valid.contiguous()
    h = x.reshape(B, D).clone()
    fn = native_decode._KERNEL.fn()
    cp, sp = (None, None) if cos is None else (cos.data_ptr(), sin.data_ptr())
    for record, idx, lookback in plan.records:
        bk, bv, off, n = cache.reserve(idx, 1, x.dtype)
        vp = None if valid is None else valid.data_ptr() + cache.start[idx]  # the flags of the first key kept
        fn(record, h.data_ptr(), B, bk.data_ptr(), bv.data_ptr(), bk.shape[2], off, off + n, cp, sp, stride, vp,
           0 if valid is None else valid.shape[1], None if alibi is None else alibi.data_ptr())
        cache.written(idx, 1, lookback)
    fused_moe.forget_routing(plan.moe)
    return h.view(B, 1, D)
