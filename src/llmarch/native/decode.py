"""One decoder layer of a decode step in one native call (``decode.c``): norm, fused qkv product, rotation, cache
write, attention over the cache, output product, residual, norm, FFN (dense, or a routed mixture of experts:
``ffn.c``), residual. The eager
layer runs ~40 torch ops for this: on an AVX2 host ~5 of a 13 ms LLaMA-style batch-1 token went to them, their
dispatch and Python, not to the products (``benchmarks/decode_overhead.py``; figures in docs/performance.md).

:mod:`llmarch.nn.fused_decode` decides which stacks and calls it serves and builds the per-layer records
(:class:`_Layer`: sizes, kinds, pointers to gains, biases and the products' blocked weights). :func:`available`
is False where the library cannot be built or fails its self-check (a small layer against the torch form below);
``LLMARCH_FUSED_DECODE=0`` turns the path off (:func:`enabled`).
"""
from __future__ import annotations

import ctypes
import os

import torch

from llmarch import native

MAX_ROWS = 32


class _Product(ctypes.Structure):
    _fields_ = [("w", ctypes.c_void_p), ("scale", ctypes.c_void_p), ("bias", ctypes.c_void_p),
                ("kind", ctypes.c_int64)]


class _Moe(ctypes.Structure):
    """ffn.c's moe_t: a mixture-of-experts FFN (``up`` / ``down``: arrays of E :class:`_Product`)."""
    _fields_ = ([(name, ctypes.c_int64) for name in ("E", "K", "F", "gated", "act", "router", "groups", "topk_groups")]
                + [("scale", ctypes.c_float)]
                + [(name, ctypes.c_void_p) for name in ("router_w", "router_b", "up", "down")]
                + [(name, ctypes.c_int64) for name in ("shared_F", "shared_gated")]
                + [(name, _Product) for name in ("shared_up", "shared_down")] + [("shared_gate", ctypes.c_void_p)]
                + [("bf16", ctypes.c_int64)])


class _Mla(ctypes.Structure):
    """attention.c's mla_t: multi-head latent attention (``ukv``: kv_up's plain fp32 weight)."""
    _fields_ = ([(name, ctypes.c_int64) for name in ("H", "R", "Dn", "Dr", "Dv", "q_rank")]
                + [(name, ctypes.c_float) for name in ("q_eps", "kv_eps")]
                + [(name, _Product) for name in ("q", "q_down", "kv_down")]
                + [(name, ctypes.c_void_p) for name in ("q_norm", "kv_norm", "ukv")])


class _Layer(ctypes.Structure):
    _fields_ = ([(name, ctypes.c_int64) for name in ("D", "H", "G", "Dh", "F", "norm", "act", "gated")]
                + [(name, ctypes.c_float) for name in ("eps1", "eps2", "scale")]
                + [(name, ctypes.c_void_p) for name in ("norm1", "norm2", "norm1_bias", "norm2_bias")]
                + [(name, _Product) for name in ("qkv", "out", "up", "down")] + [("moe", ctypes.c_void_p)]
                + [("bf16", ctypes.c_int64), ("mla", ctypes.c_void_p)])


NORMS = {"RMSNorm": 0, "LayerNorm": 1}  # decode.c's norm kinds, by llmarch.nn.norm class name
ACTIVATIONS = {"silu": 0, "gelu_tanh": 1, "gelu": 2, "relu": 3}  # and activations, by config name
ROUTERS = {"topk_softmax": 0, "softmax_topk": 1, "softmax_topk_norm": 2, "switch": 3}  # ffn.c's, by moe.router


def enabled() -> bool:
    return os.environ.get("LLMARCH_FUSED_DECODE", "1") != "0"


def _reference(x, norms, weights, k_old, v_old, cos, sin, H, G, scale, eps):
    """The layer in torch ops, fp32 (the self-check's reference): x [B, D], weights [N, K] plain."""
    def norm(t, w):
        return t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + eps) * w
    B, D = x.shape
    Dh = k_old.shape[-1]
    qkv = (norm(x, norms[0]) @ weights[0].T).view(B, H + 2 * G, Dh)
    qk = qkv[:, :H + G]
    h = Dh // 2
    qk = torch.cat([qk[..., :h] * cos[:, None, :h] - qk[..., h:] * sin[:, None, :h],
                    qk[..., h:] * cos[:, None, h:] + qk[..., :h] * sin[:, None, h:]], -1)
    k = torch.cat([k_old, qk[:, H:, None]], 2)
    v = torch.cat([v_old, qkv[:, H + G:, None]], 2)
    q = qk[:, :H, None]  # [B, H, 1, Dh]
    att = torch.softmax(q @ k.repeat_interleave(H // G, 1).transpose(-1, -2) * scale, -1)
    x = x + (att @ v.repeat_interleave(H // G, 1)).reshape(B, H * Dh) @ weights[1].T
    gate, up = (norm(x, norms[1]) @ weights[2].T).chunk(2, -1)
    return x + (torch.nn.functional.silu(gate) * up) @ weights[3].T, k, v


def _check(fn) -> bool:
    from llmarch.native import fp32 as native_fp32

    if not native_fp32.available():
        return False
    g = torch.Generator().manual_seed(0)
    B, D, H, G, Dh, F, n = 2, 24, 4, 2, 6, 20, 5
    shapes = [((H + 2 * G) * Dh, D), (D, H * Dh), (2 * F, D), (D, F)]
    weights = [torch.randn(s, generator=g) / s[1] ** 0.5 for s in shapes]
    norms = [1 + 0.1 * torch.randn(D, generator=g) for _ in range(2)]
    x, cap = torch.randn(B, D, generator=g), n + 3
    kbuf, vbuf = torch.randn(B, G, cap, Dh, generator=g), torch.randn(B, G, cap, Dh, generator=g)
    ang = torch.randn(B, Dh // 2, generator=g)
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()
    want, k, v = _reference(x, norms, weights, kbuf[:, :, :n], vbuf[:, :, :n], cos, sin, H, G, 0.3, 1e-5)
    blocked = [native_fp32.Blocked(w) for w in weights]
    layer = _Layer(D, H, G, Dh, F, 0, 0, 1, 1e-5, 1e-5, 0.3, norms[0].data_ptr(), norms[1].data_ptr(), None, None,
                   *[_Product(b.data.data_ptr(), None, None, 0) for b in blocked], None)
    got = x.clone()
    fn(ctypes.byref(layer), got.data_ptr(), B, kbuf.data_ptr(), vbuf.data_ptr(), cap, 0, n, cos.data_ptr(),
       sin.data_ptr(), Dh, None, 0, None)
    return all(torch.allclose(a, b, rtol=1e-4, atol=1e-5) for a, b in
               [(got, want), (kbuf[:, :, :n + 1], k), (vbuf[:, :, :n + 1], v)])


_ARGS = ([ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p] + [ctypes.c_int64] * 3
         + [ctypes.c_void_p] * 2 + [ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p])  # its args
_KERNEL = native.Kernel("decode", "llmarch_decode_layer", _ARGS, _check)
available = _KERNEL.available

# llmarch_decode_stack(table, n, x, B, cos, sin, cos_stride, valid, valid_stride, alibi): every layer of a step
# (table: n rows of {layer, kbuf, vbuf, cap, first, slot, lookback, delta}, int64, which it moves on by one slot);
# usable where llmarch_decode_layer passed its check (the same library)
STACK = native.Kernel("decode", "llmarch_decode_stack", [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p,
                                                         ctypes.c_int64] + [ctypes.c_void_p] * 2
                      + [ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p],
                      lambda fn: _KERNEL.fn() is not None)


def _check_moe(fn) -> bool:
    """A small mixture (4 experts, 2 per row, topk_softmax, gated silu experts) against torch ops."""
    from llmarch.native import fp32 as native_fp32

    if not native_fp32.available():
        return False
    g = torch.Generator().manual_seed(1)
    B, D, F, E, K = 3, 16, 12, 4, 2
    h, router = torch.randn(B, D, generator=g), torch.randn(E, D, generator=g)
    ups = [torch.randn(2 * F, D, generator=g) / D ** 0.5 for _ in range(E)]
    downs = [torch.randn(D, F, generator=g) / F ** 0.5 for _ in range(E)]
    logits = h @ router.T
    top, experts = logits.topk(K, -1)
    weights, want = top.softmax(-1), torch.zeros(B, D)
    for b in range(B):
        for k in range(K):
            gate, up = (h[b] @ ups[experts[b, k]].T).chunk(2)
            want[b] += weights[b, k] * ((torch.nn.functional.silu(gate) * up) @ downs[experts[b, k]].T)
    blocked = [native_fp32.Blocked(w) for w in ups + downs]
    arrays = [(_Product * E)(*[_Product(b.data.data_ptr(), None, None, 0) for b in half])
              for half in (blocked[:E], blocked[E:])]
    moe = _Moe(E, K, F, 1, 0, 0, 1, 0, 1.0, router.data_ptr(), None, *[ctypes.addressof(a) for a in arrays], 0, 0,
               _Product(), _Product(), None)
    y, lg, ex, wt = torch.empty(B, D), torch.empty(B, E), torch.empty(B, K, dtype=torch.long), torch.empty(B, K)
    fn(ctypes.byref(moe), h.data_ptr(), y.data_ptr(), B, D, lg.data_ptr(), ex.data_ptr(), wt.data_ptr())
    return torch.equal(ex, experts) and all(torch.allclose(a, b, rtol=1e-4, atol=1e-5)
                                            for a, b in [(y, want), (lg, logits), (wt, weights)])


# llmarch_moe_ffn(moe, h, y, rows, D, logits, experts, weights): one MoE FFN over many rows, with its routing
MOE_KERNEL = native.Kernel("decode", "llmarch_moe_ffn", [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 2
                           + [ctypes.c_void_p] * 3, _check_moe)


def reset() -> None:
    """Forget both functions and the libraries (tests flip ``LLMARCH_NATIVE``)."""
    _KERNEL.reset()
    STACK.reset()
    MOE_KERNEL.reset()
