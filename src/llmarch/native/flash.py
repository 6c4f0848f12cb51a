"""Attention of many queries at once on the CPU without the [T, S] scores (``flash.c``, AVX-512), forward and
backward: a prefill's, an encoder's, and a training step's. torch's CPU flash kernel runs such attention at ~45-90
GFLOP/s on a Zen 5 core (fp32 or bf16, 8 heads of 64); this one keeps each block of 48 queries' scores, weights
and outputs in L1 and runs every product as register tiles (docs/performance.md, twenty-first round). Causal (a
query sees the keys up to its place at the end of the keys), over all keys, or over one run of keys per query
(``ranges``: padded rows, packed documents, sliding windows: the masks llmarch's attention builds), grouped-query
heads read in place, optionally with ALiBi's bias (``slopes``); fp32, and bf16 computed in fp32 from the bf16
values with the output and gradients rounded once. Values: the fp32 attention up to summation order and a 2-ulp exp.

:func:`forward` returns None where it does not apply (the caller runs torch's kernel).
"""
from __future__ import annotations

import ctypes

import torch

from llmarch import native

# the fewest queries per sequence that take the kernel: a decode step's single query has its own path
# (llmarch.nn.kernels._single_query); a few queries are cheap either way
MIN_QUERIES = 16
_I64 = ctypes.c_int64
_P = ctypes.c_void_p
_FWD = [_P] * 4 + [_I64] * 7 + [_P] * 3 + [ctypes.c_float, _I64, _P, _P, _P, _P, _P]
_BWD = [_P] * 9 + [_I64] * 7 + [_P] * 3 + [ctypes.c_float, _I64, _I64, _P, _P, _P]
# the backward adds each thread's share of dq into the thread's own sums while it has the weights of a block of
# keys (1.4-2x faster than a second pass recomputing them for dq), where these sums take at most this many bytes
# beyond dq itself (threads - 1 copies of dq); -1: always the second pass
DQ_SHARES_MAX = 256 << 20


def _strides(*ts: torch.Tensor) -> list:
    return [(_I64 * 3)(*t.stride()[:3]) for t in ts]


def _ptr(t):
    return None if t is None else t.data_ptr()


def _fwd(fn, q, k, v, scale: float, causal: bool, lse: bool = False, ranges=None, slopes=None):
    """(out [B, H, T, Dv], log-sum-exp [B, H, T] or None) of fp32 q, k, v, or None without memory; ``ranges``: (lo,
    hi) [B, T] int32, query t of row b seeing keys lo[b, t] <= s < hi[b, t]; ``slopes``: ALiBi's [H] fp32."""
    B, H, T, Dh = q.shape
    G, S, Dv = k.shape[1], k.shape[2], v.shape[-1]
    # the output in q's order of heads and rows, as torch's CPU flash kernel lays it out: a q viewed from [B, T, H,
    # Dh] projections gives [B, T, H, Dv] memory, which the output projection then reads without a copy
    rows_first = q.stride(2) > q.stride(1)
    out = torch.empty(B, T, H, Dv).transpose(1, 2) if rows_first else torch.empty(B, H, T, Dv)
    m = torch.empty(B, H, T) if lse else None
    rc = fn(out.data_ptr(), q.data_ptr(), k.data_ptr(), v.data_ptr(), B, H, G, T, S, Dh, Dv, *_strides(q, k, v),
            scale, int(causal), _ptr(m), *_strides(out), *map(_ptr, ranges or (None, None)), _ptr(slopes))
    return None if rc else (out, m)


def _bwd(fn, q, k, v, out, lse, g, scale: float, causal: bool, ranges=None, slopes=None):
    """(dq, dk, dv) of fp32 tensors, contiguous, or None without memory."""
    B, H, T, Dh = q.shape
    G, S, Dv = k.shape[1], k.shape[2], v.shape[-1]
    g = g.contiguous()
    delta = (g * out).sum(-1)  # [B, H, T]: the rows' dout . out
    dq, dk, dv = torch.empty(B, H, T, Dh), torch.empty(B, G, S, Dh), torch.empty(B, G, S, Dv)
    rc = fn(dq.data_ptr(), dk.data_ptr(), dv.data_ptr(), q.data_ptr(), k.data_ptr(), v.data_ptr(), g.data_ptr(),
            lse.data_ptr(), delta.data_ptr(), B, H, G, T, S, Dh, Dv, *_strides(q, k, v), scale, int(causal),
            DQ_SHARES_MAX, *map(_ptr, ranges or (None, None)), _ptr(slopes))
    return None if rc else (dq, dk, dv)


def _reference(q, k, v, g, scale, causal):
    """Attention and its gradients (for the output gradient g) written out, without autograd: the checks run
    wherever the kernels are first used, inside no_grad, inference mode or saved-tensor hooks."""
    (B, H, T, _), (G, S) = q.shape, k.shape[1:3]
    kr, vr = k.repeat_interleave(H // G, 1), v.repeat_interleave(H // G, 1)
    s = q @ kr.transpose(-1, -2) * scale
    if causal:
        s = s.masked_fill(~torch.ones(T, S, dtype=torch.bool).tril(S - T), float("-inf"))
    p = s.softmax(-1)
    dp = g @ vr.transpose(-1, -2)
    ds = p * (dp - (dp * p).sum(-1, keepdim=True)) * scale
    per_group = (lambda t: t.view(B, G, H // G, *t.shape[2:]).sum(2))  # noqa: E731
    return p @ vr, ds @ kr, per_group(ds.transpose(-1, -2) @ q), per_group(p.transpose(-1, -2) @ g)


def _operands():
    """Causal after a cache (T < S), grouped heads, odd sizes past one block of queries and keys, in float64: q, k,
    v, an output gradient, and the attention and its gradients."""
    gen = torch.Generator().manual_seed(0)
    q, k, v, g = (torch.randn(*shape, generator=gen, dtype=torch.float64)
                  for shape in ((2, 4, 53, 19), (2, 2, 70, 19), (2, 2, 70, 67), (2, 4, 53, 67)))
    return q, k, v, g, _reference(q, k, v, g, 0.3, True)


def _check_fwd(fn) -> bool:
    q, k, v, _, want = _operands()
    got = _fwd(fn, q.float(), k.float(), v.float(), 0.3, True, lse=True)
    return got is not None and torch.allclose(got[0].double(), want[0], rtol=1e-5, atol=1e-5)


def _check_bwd(fn) -> bool:
    q, k, v, g, want = _operands()
    got = (fwd := _FWD_KERNEL.fn()) and _fwd(fwd, q.float(), k.float(), v.float(), 0.3, True, lse=True)
    grads = got and _bwd(fn, q.float(), k.float(), v.float(), got[0], got[1], g.float(), 0.3, True)
    return bool(grads) and all(torch.allclose(a.double(), b, rtol=1e-4, atol=1e-4) for a, b in zip(grads, want[1:]))


_FWD_KERNEL = native.Kernel("flash", "llmarch_flash_fwd", _FWD, _check_fwd, ctypes.c_int)
_BWD_KERNEL = native.Kernel("flash", "llmarch_flash_bwd", _BWD, _check_bwd, ctypes.c_int)


def available() -> bool:
    """Whether the kernels built here (AVX-512) and passed their checks against float64 (once per process)."""
    return _FWD_KERNEL.available() and _BWD_KERNEL.available()


def reset() -> None:  # tests flip ``LLMARCH_NATIVE``
    _FWD_KERNEL.reset()
    _BWD_KERNEL.reset()


class _Attention(torch.autograd.Function):
    """The kernels' forward and backward; bf16 operands widened to fp32 (exact) for both, the output and the
    gradients rounded once. Saves q, k, v and the output in their own dtype and the fp32 log-sum-exp, as torch's
    flash kernel does."""

    @staticmethod
    def forward(ctx, q, k, v, scale: float, causal: bool, ranges, slopes):
        got = _fwd(_FWD_KERNEL.fn(), q.float(), k.float(), v.float(), scale, causal, lse=True, ranges=ranges,
                   slopes=slopes)
        if got is None:
            raise MemoryError("llmarch.native.flash: no memory for the attention's blocks")
        out = got[0].to(q.dtype)
        ctx.save_for_backward(q, k, v, out, got[1])
        ctx.scale, ctx.causal, ctx.ranges, ctx.slopes = scale, causal, ranges, slopes
        return out

    @staticmethod
    def backward(ctx, g):
        q, k, v, out, lse = ctx.saved_tensors
        grads = _bwd(_BWD_KERNEL.fn(), q.float(), k.float(), v.float(), out.float(), lse, g.float(), ctx.scale,
                     ctx.causal, ctx.ranges, ctx.slopes)
        if grads is None:
            raise MemoryError("llmarch.native.flash: no memory for the attention's gradient blocks")
        return (*(d.to(t.dtype) for d, t in zip(grads, (q, k, v))), None, None, None, None)


def runnable() -> bool:
    """Whether a call can run the kernels here: built and checked, outside compilation, dispatch modes (FLOP
    counting, fake tensors) and torch.func transforms, to all of which a ctypes call is invisible."""
    return not (torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0
                or torch._C._are_functorch_transforms_active()) and available()


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool,
            ranges: tuple[torch.Tensor, torch.Tensor] | None = None,
            slopes: torch.Tensor | None = None) -> torch.Tensor | None:
    """softmax(q k^T * scale) v for q [B, H, T, Dh], k [B, G, S, Dh], v [B, G, S, Dv] (G dividing H), causal (T <= S:
    query t sees keys up to t + S - T), over all keys, or with ``ranges`` (lo, hi) [B, T] int32 (contiguous, CPU)
    over the keys lo[b, t] <= s < hi[b, t] (each range non-empty; ``causal`` then ignored), each score plus ALiBi's
    bias -(slopes[h] * |t + S - T - s|) where ``slopes`` [H] (fp32, contiguous, CPU) is given -> [B, H, T, Dv],
    differentiable (where Dv == Dh); or None where the kernels do not apply: fp32 or bf16 CPU tensors (all one
    dtype) whose last dimension is contiguous, at least :data:`MIN_QUERIES` queries, where :func:`runnable`."""
    if not (q.dim() == k.dim() == v.dim() == 4 and q.dtype in (torch.float32, torch.bfloat16) and all(
            type(t) is torch.Tensor and t.dtype == q.dtype and t.device.type == "cpu" and t.stride(-1) == 1
            for t in (q, k, v))):  # plain tensors: not a DTensor's shards, not a fake tensor
        return None
    (B, H, T, Dh), (Bk, G, S, Dk), (Bv, Gv, Sv, Dv) = q.shape, k.shape, v.shape
    if (T < MIN_QUERIES or (Bk, Dk) != (B, Dh) or (Bv, Gv, Sv) != (B, G, S) or not G or H % G or not S or not Dv
            or not Dh or (causal and T > S and ranges is None)):
        return None
    if ranges is not None:
        if not all(r.shape == (B, T) and r.dtype == torch.int32 and r.is_contiguous() and r.device.type == "cpu"
                   for r in ranges):
            raise ValueError(f"ranges: (lo, hi) must be contiguous int32 CPU tensors of shape {(B, T)}")
        causal = False
    if slopes is not None and not (slopes.shape == (H,) and slopes.dtype == torch.float32 and slopes.is_contiguous()
                                   and slopes.device.type == "cpu"):
        raise ValueError(f"slopes: must be a contiguous float32 CPU tensor of shape {(H,)}")
    if not runnable():
        return None
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        # training: where torch's flash kernel would run (values as wide as keys), so what the step saves is what
        # llmarch.analysis plans for it; torch runs value widths apart from key widths (latent attention) on its
        # math path, which the plan models
        return _Attention.apply(q, k, v, scale, causal, ranges, slopes) if Dv == Dh else None
    got = _fwd(_FWD_KERNEL.fn(), q.float(), k.float(), v.float(), scale, causal, ranges=ranges,
               slopes=slopes)  # bf16: exact in fp32
    return None if got is None else got[0].to(q.dtype)  # bf16: one rounding
