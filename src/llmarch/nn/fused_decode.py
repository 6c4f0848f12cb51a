"""The decode step of a plain decoder stack with each layer in one native call (:mod:`llmarch.native.decode`).
:class:`llmarch.model.Stack` tries :func:`run` first when it has a cache and one new token per row; None means
"not here" and the eager layers run. Values: the eager layers' up to summation order and ``exp``'s last bits
(tests hold per-step logits and the cache to the eager step's at 1e-5, greedy tokens identical).

A stack qualifies when every layer is a record of :mod:`llmarch.nn.fused_layers` (pre-norm blocks of grouped-query
or latent attention and a dense or MoE FFN; all fp32, or all bf16 where the eager bf16 step widens: a CPU without
bf16 products, ``llmarch.nn.widened``'s route on). A call qualifies with CPU activations of the layers' dtype, at
most ``llmarch.native.decode.MAX_ROWS`` rows, no gradient, eval mode, no autocast or compilation, no documents,
global tokens or encoder memory (a padding mask is served), positions that add no score bias but ALiBi's (not with
latent attention) and rotate whole heads (or not at all), a plain :class:`~llmarch.nn.cache.KVCache` (a
:class:`~llmarch.nn.cache.LatentCache` for latent attention) already holding every layer, and no forward hook on a
module the eager layers would call.

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
from llmarch.native import bf16 as native_bf16
from llmarch.native import decode as native_decode
from llmarch.nn import dense, fused_layers, fused_moe, widened
from llmarch.nn.cache import KVCache, LatentCache
from llmarch.nn.position import AlibiPositions, PositionScheme
from llmarch.nn.rope import NoRotation, Rotation

# stack -> its plan, or the (dtype, packed-copy generation, modules) at which it was found not eligible: looked at
# again once a copy is made or dropped (an fp32 stack qualifies once its weights are packed) or a module is swapped
_PLANS: "weakref.WeakKeyDictionary[nn.Module, _Plan | tuple]" = weakref.WeakKeyDictionary()


class _Plan:
    """The kernel's records for every layer of a stack, and what they were read from."""

    def __init__(self, stack: nn.Module, layers: list, dtype: torch.dtype):
        self.layers, self.dtype = weakref.ref(stack.layers), dtype
        self.records = [(ctypes.addressof(r[0]), r[1], r[2]) for r in layers]
        self.head_dim, self.heads = layers[0][7], {r[0].H for r in layers}  # head_dim: the rotation's width
        self.latent = layers[0][0].mla is not None  # its caches are a LatentCache's
        self.keep = [(r[0], r[6]) for r in layers]  # the records (their addresses are passed)
        self.moe = [stack.layers[i].ffn for i, r in enumerate(layers) if r[6][0] is not None]
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
        layers = [fused_layers.layer(block, dtype) for block in stack.layers]
        if (not layers or any(r is None for r in layers) or len({r[7] for r in layers}) != 1
                or len({r[0].mla is None for r in layers}) != 1):
            _PLANS[stack] = _refusal(stack, dtype)
            return None
        plan = _PLANS[stack] = _Plan(stack, layers, dtype)
    return None if plan.hooked() else plan


def _call_fits(stack: nn.Module, x: torch.Tensor, ctx, cache) -> bool:
    return (type(cache) in (KVCache, LatentCache) and ctx.T == 1 and ctx.causal and not stack.training
            and _dtype_fits(x.dtype) and x.device.type == "cpu" and type(x) is torch.Tensor
            and x.shape[0] <= native_decode.MAX_ROWS and ctx.document_ids is None
            and ctx.global_mask is None and ctx.memory is None and not torch.is_grad_enabled()
            and (type(ctx.positions).score_bias is PositionScheme.score_bias or type(ctx.positions) is AlibiPositions)
            and not torch.compiler.is_compiling() and not torch.is_autocast_enabled("cpu")
            and not _torch_module._has_any_global_hook() and native_decode.enabled())


def _dtype_fits(dtype: torch.dtype) -> bool:
    """fp32, or bf16 where the eager bf16 step computes what the bf16 layer does: products rounded once from fp32
    sums (widened to fp32, ``llmarch.nn.widened``'s route on a CPU without bf16 products; or oneDNN's bf16
    products), single-query attention in fp32 rounded once (``llmarch.nn.kernels.sdpa_attention``, any CPU)."""
    return dtype == torch.float32 or (dtype == torch.bfloat16 and (widened.ROUTE or dense.ONEDNN_BF16)
                                      and native_bf16.available())


def run(stack: nn.Module, x: torch.Tensor, ctx, cache) -> torch.Tensor | None:
    """The stack's layers (not its final norm) over x [B, 1, D] in native calls, or None (run them eagerly)."""
    fn = native_decode.STACK.fn() if _call_fits(stack, x, ctx, cache) else None
    if fn is None:
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
    if alibi is not None and (plan.latent or not fused_layers.plain(alibi, alibi.dtype)
                              or alibi.dtype not in (torch.float32, x.dtype) or plan.heads != {alibi.numel()}):
        return None
    alibi = None if alibi is None else alibi.float()  # the bias is computed in fp32 (exact for bf16 slopes)
    valid = ctx.key_padding  # [B, S_total] bool (True: a real token), or None
    if valid is not None:
        if valid.dtype != torch.bool or valid.shape != (B, cache.length + 1):
            return None
        valid = valid.contiguous()
    slots = cache.pending
    if not (type(slots) is _Slots and slots.plan is plan and slots.rows == B and slots.room > 0):
        slots = _Slots.make(plan, cache, B, x.dtype)
        if slots is None:
            return None
    h = x.reshape(B, D).clone()
    fn(slots.table.data_ptr(), len(plan.records), h.data_ptr(), B, None if cos is None else cos.data_ptr(),
       None if sin is None else sin.data_ptr(), stride, None if valid is None else valid.data_ptr(),
       0 if valid is None else valid.shape[1], None if alibi is None else alibi.data_ptr())
    slots.room -= 1
    cache.defer(slots)  # k / v / start follow the table when next read
    fused_moe.forget_routing(plan.moe)
    return h.view(B, 1, D)


class _Slots:
    """A cache's layers as ``llmarch_decode_stack`` reads and moves them on: a table row per layer (its record,
    buffers, capacity, first and next slot, lookback, and the absolute slot of buffer slot 0), for one plan,
    batch size and dtype, with room for :attr:`ROOM` steps reserved at once, or for the slots the cache expects
    (``cache.expected``, at most :attr:`MOST_ROOM`) in the layers that keep every key. The cache defers its views to it
    (:meth:`~llmarch.nn.cache.KVCache.defer`): a step that finds it still pending runs straight on the table;
    a read of the cache in between ends that, and the next step reserves again."""

    ROOM = 64
    MOST_ROOM = 2048  # most slots reserved at once for what a caller expects (cache.expected) beyond ROOM

    def __init__(self, plan: _Plan, rows: int, table: torch.Tensor, buffers: list):
        self.plan, self.rows, self.table, self.buffers = plan, rows, table, buffers
        caps, slots = table[:, 3].tolist(), table[:, 5].tolist()
        self.room = min(c - s for c, s in zip(caps, slots))

    @classmethod
    def make(cls, plan: _Plan, cache, B: int, dtype: torch.dtype) -> "_Slots | None":
        """Reserve every layer's buffers (None where a layer's cache is missing, of another dtype or batch)."""
        rows, buffers = [], []
        expected = min(cache.expected - cache.length, cls.MOST_ROOM) if cache.expected else 0
        for record, idx, lookback in plan.records:
            k = cache.k.get(idx)
            if k is None or k.dtype != dtype or k.shape[0] != B:
                return None
            room = max(cls.ROOM, expected if lookback is None else 0)  # a window's cache stays O(window)
            bk, bv, off, n = cache.reserve(idx, room, dtype)
            rows.append((record, bk.data_ptr(), bv.data_ptr(), bk.shape[2], off, off + n,
                         -1 if lookback is None else lookback, cache.start[idx] - off))
            buffers.append((idx, bk, bv))
        return cls(plan, B, torch.tensor(rows, dtype=torch.int64), buffers)

    def sync(self, cache) -> None:
        """Set the cache's views to the slots the steps wrote (called by the cache on its first read)."""
        for (idx, bk, bv), (first, end, _, delta) in zip(self.buffers, self.table[:, 4:].tolist()):
            cache.set_views(idx, bk, bv, first, end, first + delta)
