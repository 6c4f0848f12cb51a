"""A mixture-of-experts FFN in native code (``ffn.c``'s ``moe_t``): routing, the chosen experts over their packed
or int8 copies, and the shared experts in one call. Two users: a native decode layer
(:mod:`llmarch.nn.fused_decode`), and :func:`forward`, the MoE layer's own inference forward on the CPU over up to
the native row limit (a prefill; a decode step of a stack whose attention is not native, e.g. latent attention).

An :class:`~llmarch.nn.moe.MoE` qualifies when every assignment is served (``Dropless``: no capacity limit), its
dispatcher is ``auto`` (the native call is what it picks; a layer set to a particular dispatcher runs that one),
its router is one of ``llmarch.nn.router``'s four (unsubclassed) with an fp32 ``nn.Linear`` scorer, its bank is a
:class:`~llmarch.nn.experts.GLUExperts` or :class:`~llmarch.nn.experts.MLPExperts` of fp32 experts with current
native blocked copies (``llmarch.infer.layout.pack_weights``; a LoRA-adapted bank is a subclass and does not) or an
int8 bank (:class:`~llmarch.infer.int8_experts.Int8Experts`, which ``quantize(model, "int8")`` makes), and its
shared experts, if any, are a GLU or MLP with the same activation whose products the kernel reads (gated by an
fp32 ``nn.Linear``). :func:`forward` records the routing as the eager forward does; a native decode step does not:
it clears the layer's ``last_routing`` (read by training statistics) and its auxiliary loss.
"""
from __future__ import annotations

import ctypes
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn.modules import module as _torch_module

from llmarch.native import decode as native_decode
from llmarch.native import fp32 as native_fp32
from llmarch.nn import dense
from llmarch.nn.dispatch import DISPATCHERS, Dropless
from llmarch.nn.experts import GLUExperts, MLPExperts
from llmarch.nn.ffn import GLU
from llmarch.nn.router import ROUTERS, Routing

if TYPE_CHECKING:  # llmarch.nn.moe imports this module
    from llmarch.nn.moe import MoE


def _plain(m: nn.Module, rows: int | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor | None:
    """The row-major weight of a plain ``nn.Linear`` of ``dtype`` (with ``rows`` outputs, if given), else None."""
    w = getattr(m, "weight", None)
    ok = (type(m) is nn.Linear and w.dtype == dtype and w.device.type == "cpu" and w.is_contiguous()
          and (rows is None or w.shape[0] == rows))
    return w if ok else None


def _moe_module():
    from llmarch.nn import moe  # it imports this module

    return moe


def _int8_types():
    # imported when first needed: llmarch.infer imports llmarch.model, which imports this module
    from llmarch.infer.int8_experts import Int8Experts
    from llmarch.infer.quantize import Int8Linear

    return Int8Experts, Int8Linear


def gated_bank(bank: nn.Module) -> bool:
    """Whether an expert bank's experts are gated (GLU: their up product gives [gate | up])."""
    return type(bank) is GLUExperts or (type(bank) is _int8_types()[0] and bank.gated)


def _array(products: list[tuple]) -> ctypes.Array:
    """A ctypes array of ``_Product`` records (weight, scales, bias, kind) the kernel indexes by expert."""
    return (native_decode._Product * len(products))(*[native_decode._Product(*p) for p in products])


def _int8_bank(bank: nn.Module):
    """(up, down) ctypes arrays of an int8 bank's expert products (their blocked copies), and its tensors."""
    from llmarch.nn.fused_layers import int8_copy  # it imports this module

    Int8Linear = _int8_types()[1]
    arrays, tensors = [], []
    for linears in (bank.up, bank.down):
        if any(type(m) is not Int8Linear or m.bias is not None or m.scales.dtype != torch.float32 for m in linears):
            return None
        copies = [int8_copy(m) for m in linears]
        if None in copies:
            return None
        arrays.append(_array([(w, s, None, kind) for w, s, kind in copies]))
        tensors += [t for m in linears for t in (m.qweight, m.scales)]
    return arrays, tensors


def _bank(bank: nn.Module, dtype: torch.dtype):
    """(up, down) ctypes arrays of the bank's E expert products, and the bank's tensors; or None."""
    int8 = type(bank) is _int8_types()[0]
    if ((type(bank) not in (GLUExperts, MLPExperts) and not int8) or bank.activation not in native_decode.ACTIVATIONS
            or (int8 and dtype != torch.float32)):
        return None
    if int8:
        return _int8_bank(bank)
    weights = (bank.gate_up if type(bank) is GLUExperts else bank.up, bank.down)
    arrays = []
    for w in weights:
        copies = dense.packed(w)
        if w.dtype != dtype or not isinstance(copies, list) or not all(
                isinstance(c, native_fp32.Blocked) and c.data.dtype == dtype for c in copies):
            return None
        arrays.append(_array([(c.data.data_ptr(), None, None, 0 if dtype == torch.float32 else 2) for c in copies]))
    return arrays, list(weights)


def _shared(f: MoE, dense_ffn, dtype: torch.dtype):
    """(shared_F, gated FFN, up and down records, gate weight or None (fp32: a bf16 one widened), tensors, edges,
    called) of the shared experts (all empty without them), or None where the kernel cannot run them."""
    s = f.shared
    if s is None:
        return 0, False, [native_decode._Product()] * 2, None, [], [], []
    gated = type(s) is _moe_module().GatedSharedExperts
    parts = dense_ffn(s.ffn, dtype) if type(s) is _moe_module().SharedExperts or gated else None
    if parts is None or s.ffn.activation != f.experts.activation:
        return None
    gate = _plain(s.gate, 1, dtype) if gated else None
    if gated and (gate is None or s.gate.bias is not None):
        return None
    gate = None if gate is None else gate.float()
    products, tensors, edges, called = parts
    edges = edges + [(s, "ffn", s.ffn)] + ([(s, "gate", s.gate)] if gate is not None else [])
    called = called + [s] + ([s.gate] if gate is not None else [])
    tensors = tensors + ([s.gate.weight, gate] if gate is not None else [])
    return s.ffn.down.in_features, type(s.ffn) is GLU, products, gate, tensors, edges, called


def record(f: MoE, dense_ffn, dtype: torch.dtype = torch.float32):
    """(kept records: the moe_t first, tensors, module edges, called modules) of an MoE FFN whose experts are of
    ``dtype`` (fp32, or bf16 for a bf16 layer: the router's weights read widened to fp32, as the router reads them),
    or None; ``dense_ffn``: ``llmarch.nn.fused_layers``'s reader of a GLU or MLP (for the shared experts)."""
    r, E = f.router, f.moe.n_experts
    kind = native_decode.ROUTERS.get(f.moe.router)
    router_w = _plain(r.proj, E, dtype)
    bias = r.proj.bias if router_w is not None else None
    if (kind is None or type(r) is not ROUTERS[f.moe.router] or router_w is None or type(f.capacity) is not Dropless
            or f.dispatch is not DISPATCHERS["auto"]
            or (bias is not None and (bias.dtype != dtype or not bias.is_contiguous()))):
        return None
    wide = [None if t is None else t.float() for t in (router_w, bias)]  # the same tensors where fp32
    bank, shared = _bank(f.experts, dtype), _shared(f, dense_ffn, dtype)
    if bank is None or shared is None:
        return None
    (up, down), bank_tensors = bank
    shared_F, shared_gated, shared_products, gate, shared_tensors, shared_edges, shared_called = shared
    b = f.experts
    moe = native_decode._Moe(E, r.top_k, b.d_ff, gated_bank(b), native_decode.ACTIVATIONS[b.activation],
                             kind, r.n_groups, r.topk_groups or 0, r.scale, wide[0].data_ptr(),
                             None if bias is None else wide[1].data_ptr(), ctypes.addressof(up), ctypes.addressof(down),
                             shared_F, shared_gated, *shared_products, None if gate is None else gate.data_ptr(),
                             dtype == torch.bfloat16)
    tensors = [router_w, bias, *wide, *bank_tensors, *shared_tensors]
    edges = [(f, "router", r), (r, "proj", r.proj), (f, "experts", b), (f, "capacity", f.capacity),
             (f, "shared", f.shared)] + shared_edges
    called = [f, f.dropout, r, r.proj, f.capacity, *b.modules()] + shared_called
    return (moe, up, down), tensors, edges, called


# The native forward takes up to this many rows per expert on average (N * top_k / E), above the native kernel's
# row limit: one call for routing, experts and combining saves the eager forward's ~40 ops, and the kernels run
# the experts' products as fast as oneDNN over their plain weights, or faster. On a Zen 5 EPYC (the moe.py layer, E
# 8, top-2; docs/performance.md, eighteenth round), against the eager forward: fp32 1.43x / 1.25x / 1.21x / 1.19x /
# 1.12x at 256 / 512 / 1024 / 2048 / 4096 tokens on one thread (1.22x at 2048 on two); bf16 1.24x / 1.11x at 256 /
# 512, 1.03x / 0.96x at 1024 (one / two threads), 0.99x at 2048; int8 experts (seventeenth round's limit) 1.25x at
# 128, 0.79x at 512 (the eager forward's oneDNN products over the dequantized experts). Past these, the eager forward.
EXPERT_ROWS = {torch.float32: 1024, torch.bfloat16: 128, "int8": 64}


def max_tokens(f: MoE, dtype: torch.dtype = torch.float32) -> int:
    """The most rows of x (of ``dtype``) :func:`forward` takes for ``f``: the native kernel's row limit, or more
    while the experts average at most :data:`EXPERT_ROWS` rows (by ``dtype``, or int8 for int8 experts)."""
    kind = "int8" if type(f.experts) is _int8_types()[0] else dtype
    return max(native_fp32.MAX_ROWS, EXPERT_ROWS[kind] * f.moe.n_experts // f.router.top_k)


def forward(f: MoE, x: torch.Tensor) -> tuple[torch.Tensor, Routing] | None:
    """``f`` over x [N, D] (fp32, or bf16 over blocked bf16 copies, rounded where the eager bf16 forward rounds, as
    in a bf16 decode layer; CPU, no gradient, eval mode; N at most :func:`max_tokens`) in one native call, with the
    routing the eager forward records (its logits, probabilities, weights and experts, fp32); or None where it does
    not serve (run it eagerly). ``LLMARCH_FUSED_DECODE=0`` turns this off with the decode layers."""
    if (f.training or torch.is_grad_enabled() or type(x) is not torch.Tensor
            or x.dtype not in (torch.float32, torch.bfloat16)
            or x.device.type != "cpu" or x.shape[0] > max_tokens(f, x.dtype) or torch.compiler.is_compiling()
            or torch.is_autocast_enabled("cpu") or _torch_module._has_any_global_hook() or not native_decode.enabled()
            or not native_decode.MOE_KERNEL.available()):
        return None
    from llmarch.nn.fused_layers import dense_ffn

    found = record(f, dense_ffn, x.dtype)
    if found is None or any(m._forward_hooks or m._forward_pre_hooks for m in found[3][1:]):  # [0]: f, running
        return None
    (N, D), E, K = x.shape, f.moe.n_experts, f.router.top_k
    h = x.float().contiguous()  # bf16: its values, exactly
    y, logits, weights = torch.empty(N, D), torch.empty(N, E), torch.empty(N, K)
    experts = torch.empty(N, K, dtype=torch.long)
    native_decode.MOE_KERNEL.fn()(ctypes.addressof(found[0][0]), h.data_ptr(), y.data_ptr(), N, D, logits.data_ptr(),
                                  experts.data_ptr(), weights.data_ptr())
    return y.to(x.dtype), Routing(logits, logits.softmax(-1), weights, experts)  # bf16: rounded values, exactly


def forget_routing(layers: list) -> None:
    """Clear what the eager forward would have left on these MoE layers (a native step does not record it)."""
    for m in layers:
        if m.last_routing is not None or m._aux is not None:
            m.last_routing = m._aux = None
