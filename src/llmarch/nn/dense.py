"""Dense projections: ``nn.Linear`` with the CPU matrix products sent to the fastest route measured per host.

- fp32 over plain weights (training, prefills): oneDNN where the CPU has AVX-512 (about 2x MKL on an AVX-512
  EPYC at the training shapes: [2048, 512] x [512, 2752] 87 -> 200 GFLOP/s, the backward's products alike), MKL
  elsewhere (``ONEDNN_FP32``: on an AVX2-only EPYC MKL led 20 of 27 products); a single row keeps torch's BLAS
  unless the weight has >= 2^24 elements (oneDNN's per-call cost lost 8-17 % of LLaMA-style batch-1 decoding).
  Values and gradients are held to ``F.linear``'s, fp32 rounding order aside.
- bf16 where the CPU has no bf16 products (no oneDNN bf16): widened to fp32 (:mod:`llmarch.nn.widened`).
- Everything else (other devices and dtypes, fp16 autocast, compiled regions, tensor subclasses such as sharded
  DTensors) takes ``F.linear`` unchanged.

Inference can also run on *packed* weights (:func:`pack`): a second copy of the weight in a layout made for it,
held outside the module (state dicts, parameters and checkpoints are untouched) and used by :func:`linear` only
while it is current (same tensor, storage and version: an in-place update, a ``load_state_dict`` or a dtype change
makes it stale, and the plain path runs) and no gradient is needed. (Writes through ``weight.data`` escape the
version counter, hence this check: :func:`unpack` after them.) The copy is
- for fp32 weights where llmarch's native kernel builds (:mod:`llmarch.native.fp32`: x86-64 with AVX-512 or AVX2
  and a C compiler): its blocked layout; up to ``native_fp32.MAX_ROWS`` rows run there (32 on AVX-512 hosts, 128
  on AVX2 ones; 1.06-1.18x whole decode steps against oneDNN's packed copy), more on the plain weight;
- for bf16 weights on CPUs without oneDNN's bf16: the same blocked layout in bf16 (:mod:`llmarch.native.bf16`;
  1.3-1.9x the fp32 kernel's speed at 1-16 rows, 1.8-6x torch's bf16 kernel), more rows widened; on CPUs with
  oneDNN's bf16, the same where the native bf16 decode layers run (:func:`native_bf16_copies`), up to
  :data:`ONEDNN_HOST_BF16_ROWS` rows outside those layers (4-8) and oneDNN over the plain weight above;
- else oneDNN's packed layout for 128-row products (fp32, and bf16 where ``ONEDNN_BF16``, bit-identical to
  ``F.linear``): 21-31 GB/s at one row against 17-21 for the best plain layout on the LLaMA-style matrices.
Expert banks ([E, in, out]) get one copy per expert (``llmarch.nn.banks.packed_mm``) and run their other products
through ``llmarch.nn.banks.bank_linear``, forward and backward. A copy costs its bytes in memory;
``llmarch.infer.layout.pack_weights`` decides when. Figures: docs/performance.md.
"""
from __future__ import annotations

import math
import os
import warnings
import weakref

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils import flop_counter

from llmarch import native
from llmarch.native import bf16 as native_bf16
from llmarch.native import decode as native_decode
from llmarch.native import fp32 as native_fp32

_OPS = getattr(torch.ops, "mkldnn", None)
ONEDNN = torch.backends.mkldnn.is_available() and _OPS is not None and hasattr(_OPS, "_linear_pointwise")
# oneDNN's bf16 products need AVX-512 (BW, VL, DQ) or AVX-NE-CONVERT; elsewhere bf16 is widened (see above)
ONEDNN_BF16 = ONEDNN and hasattr(_OPS, "_is_mkldnn_bf16_supported") and bool(_OPS._is_mkldnn_bf16_supported())
# fp32 over plain weights: oneDNN on AVX-512 hosts only (see above); ``LLMARCH_ONEDNN_FP32=1`` / ``0`` overrides
_FP32_ENV = os.environ.get("LLMARCH_ONEDNN_FP32", "")
if _FP32_ENV not in ("", "0", "1"):
    warnings.warn(f"LLMARCH_ONEDNN_FP32={_FP32_ENV!r} is neither 0 nor 1: ignored (this host's default route)")
ONEDNN_FP32 = ONEDNN and (_FP32_ENV == "1" or (_FP32_ENV != "0"
                                               and torch.backends.cpu.get_cpu_capability().startswith("AVX512")))
_PLAIN = (torch.Tensor, nn.Parameter)
MATVEC_MIN_ELEMENTS = 1 << 24  # a one-row product goes to oneDNN only for weights this large (see above)
PACK_ROWS = 128  # the row count the packed layout is chosen for; measured fastest at 1, 8 and 128 rows alike
# id(weight) -> (weakref to it, its storage pointer, its version, packed copy, its dtype and shape)
_PACKED: dict[int, tuple] = {}
_GENERATION = [0]  # counts packed copies made and dropped (llmarch.nn.fused_decode re-reads its plan on a change)


if ONEDNN and _OPS._linear_pointwise not in flop_counter.flop_registry:  # FLOP counts (analysis, benchmarks) see it

    @flop_counter.register_flop_formula(_OPS._linear_pointwise)
    def _linear_flops(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
        return 2 * math.prod(x_shape[:-1]) * x_shape[-1] * w_shape[0]


def _mm(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """x [N, in] @ w[out, in]^T (+ b) through oneDNN -> [N, out] (any strides of x and w)."""
    return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")


def onednn_dtype(dtype: torch.dtype) -> bool:
    """Whether oneDNN's products take this dtype here: fp32, and bf16 where the CPU supports it."""
    return ONEDNN and (dtype == torch.float32 or (dtype == torch.bfloat16 and ONEDNN_BF16))


def native_bf16_copies() -> bool:
    """Whether bf16 weights get the native kernel's blocked copies (where it builds, :mod:`llmarch.native.bf16`): on
    a CPU without oneDNN's bf16 products, and on one with them where the native bf16 decode layers run
    (:mod:`llmarch.nn.fused_decode`; ``LLMARCH_FUSED_DECODE=0`` keeps oneDNN's packed copies there). On a Zen 5
    EPYC the layers decoded a LLaMA-style bf16 model 1.8x / 1.3x faster at batch 1 / 8 than eager layers over
    oneDNN's copies (seventeenth round, docs/performance.md)."""
    if not native_bf16.available():
        return False
    return not ONEDNN_BF16 or (native_decode.enabled() and native_decode.available())


def packs_dtype(dtype: torch.dtype) -> bool:
    """Whether :func:`pack` keeps copies of weights of this dtype here."""
    return onednn_dtype(dtype) or (dtype == torch.bfloat16 and native_bf16_copies())


def _operands_fit(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, dtype_ok=onednn_dtype) -> bool:
    """oneDNN can take these: plain CPU tensors of one dtype it supports (``dtype_ok``; the bias's too), eager, no
    autocast."""
    return (dtype_ok(x.dtype) and x.device.type == "cpu" and x.dtype == weight.dtype and x.numel() > 0
            and type(x) in _PLAIN and type(weight) in _PLAIN
            and (bias is None or (type(bias) in _PLAIN and bias.dtype == x.dtype))
            and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling())


def _needs_grad(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                        or (bias is not None and bias.requires_grad))


def onednn_applies(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> bool:
    """Whether :func:`linear` takes the oneDNN path over the plain weight for these operands."""
    return (ONEDNN_FP32 and _operands_fit(x, weight, bias) and x.dtype == torch.float32
            and (x.numel() > x.shape[-1] or weight.numel() >= MATVEC_MIN_ELEMENTS))


def packable(weight: torch.Tensor) -> bool:
    """Whether :func:`pack` can pack this weight: a plain fp32 or bf16 CPU matrix, or an expert bank [E, in, out]
    (each expert packed apart), with oneDNN present."""
    return (packs_dtype(weight.dtype) and type(weight) in _PLAIN and weight.device.type == "cpu"
            and weight.numel() > 0 and weight.dim() in (2, 3))


def packed(weight: torch.Tensor) -> torch.Tensor | list[torch.Tensor] | None:
    """The current packed copy of ``weight`` (a bank's: one per expert), or None (never packed, or stale since: its
    storage, version, dtype or shape changed; ``model.to(torch.bfloat16)`` keeps the Parameter and its version, and
    the new storage can land where a freed one was)."""
    entry = _PACKED.get(id(weight))
    if (entry is None or entry[0]() is not weight or entry[1] != weight.data_ptr()
            or entry[2] != native.version(weight) or entry[4] != (weight.dtype, weight.shape)):
        return None
    return entry[3]


def _reorder(w: torch.Tensor) -> torch.Tensor:
    """[out, in] -> oneDNN's packed copy; from a row-major source, which reorders 1.5-5x faster than a transposed
    one (measured: the 8192 x 512 head 5 against 24 ms)."""
    return torch.ops.mkldnn._reorder_linear_weight(w if w.is_contiguous() else w.contiguous(), PACK_ROWS)


@torch.no_grad()
def pack(weight: torch.Tensor) -> bool:
    """Keep a packed copy of ``weight`` for inference (see the module); a no-op when a current one exists.
    Returns whether a new copy was made."""
    if not packable(weight) or packed(weight) is not None:
        return False
    key = id(weight)
    fresh = key not in _PACKED
    w = weight.detach()
    blocked = native_fp32.available() if w.dtype == torch.float32 else native_bf16_copies()
    if w.dim() == 3:  # a bank [E, in, out]: one copy per expert, of its [out, in] matrix
        copy = [native_fp32.Blocked(w[e].t()) if blocked else _reorder(w[e].t()) for e in range(w.shape[0])]
    else:
        copy = native_fp32.Blocked(w) if blocked else _reorder(w)
    _PACKED[key] = (weakref.ref(weight), weight.data_ptr(), native.version(weight), copy, (weight.dtype, weight.shape))
    _GENERATION[0] += 1
    if fresh:
        weakref.finalize(weight, _PACKED.pop, key, None)
    return True


def unpack(weight: torch.Tensor) -> None:
    """Drop ``weight``'s packed copy, if any."""
    entry = _PACKED.get(id(weight))
    if entry is not None and entry[0]() is weight:
        del _PACKED[id(weight)]
        _GENERATION[0] += 1


def generation() -> int:
    """A number that changes whenever a packed copy is made or dropped."""
    return _GENERATION[0]


def _inference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """A packed copy of ``weight`` can serve these operands: oneDNN takes them and no gradient is needed."""
    return _operands_fit(x, weight, bias, packs_dtype) and not _needs_grad(x, weight, bias)


def packed_banks(x: torch.Tensor, *banks: torch.Tensor) -> list[list[torch.Tensor]] | None:
    """The packed copies of these expert banks if inference on ``x`` can use them (all current, no gradient
    needed), else None. ``packed_banks(x, b)[0][e]`` is expert e's matrix for ``llmarch.nn.banks.packed_mm``."""
    if not _PACKED or torch.compiler.is_compiling():
        return None
    copies = [packed(b) for b in banks]
    if any(c is None for c in copies) or not all(_inference(x, b, None) for b in banks):
        return None
    return copies


# bf16 products over blocked copies on a CPU with oneDNN's bf16 products, outside the native decode layers: up to
# this many rows on the native kernel, more on oneDNN over the plain weight. From memory on a Zen 5 EPYC, native ÷
# oneDNN packed time over the LLaMA-style and GPT-2 matrices: with VDPBF16PS (AVX-512 BF16) 0.83-0.99x at 1 row,
# 0.87-1.03x at 4, 0.79-1.05x at 8, 1.08-1.25x at 16; widening to fp32 0.81-0.97x at 1, 0.93-1.07x at 4,
# 1.07-1.41x at 8
ONEDNN_HOST_BF16_ROWS = {"dot products": 8, "widened": 4}


def native_max_rows(dtype: torch.dtype) -> int:
    """The most rows a product over a native blocked copy of this dtype runs there (more: the plain weight)."""
    if dtype == torch.bfloat16 and ONEDNN_BF16:
        return ONEDNN_HOST_BF16_ROWS["dot products" if native_bf16.dp_available() else "widened"]
    return native_bf16.MAX_ROWS if dtype == torch.bfloat16 else native_fp32.MAX_ROWS


def native_mm(x: torch.Tensor, w: native_fp32.Blocked, bias: torch.Tensor | None = None) -> torch.Tensor | None:
    """x [M, in] over a native blocked copy (fp32 or bf16 weights; result in the weight's dtype), or None where
    the kernel does not serve it (more than :func:`native_max_rows` rows, or not available)."""
    if x.shape[0] > native_max_rows(w.data.dtype):
        return None
    if w.data.dtype == torch.bfloat16:
        return native_bf16.mm(x, w, bias) if native_bf16.available() else None
    return native_fp32.mm(x, w, bias) if native_fp32.available() else None


class _OneDNNLinear(torch.autograd.Function):
    """y = x W^T + b with both backward products through oneDNN too (dx = g W, dW = g^T x)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])  # [N, in]
        ctx.save_for_backward(x2, weight)
        ctx.x_shape, ctx.has_bias = x.shape, bias is not None
        return _mm(x2, weight, bias).view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        x2, weight = ctx.saved_tensors
        g2 = g.reshape(-1, g.shape[-1])  # [N, out]
        dx = _mm(g2, weight.t(), None).view(ctx.x_shape) if ctx.needs_input_grad[0] else None
        dw = None
        if ctx.needs_input_grad[1]:
            # oneDNN copies a transposed input to rows (N x its width), and a transposed result costs AccumulateGrad
            # a copy of the whole [out, in] gradient: x^T g, transposed, only where that is the cheaper of the two
            n, d_in, d_out = x2.shape[0], x2.shape[1], g2.shape[1]
            dw = _mm(x2.t(), g2.t(), None).t() if d_in * d_out < n * (d_out - d_in) else _mm(g2.t(), x2.t(), None)
        db = g2.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return dx, dw, db


@torch.library.custom_op("llmarch::packed_linear", mutates_args=())
def packed_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """:func:`linear` as an opaque op for compiled inference: the packed-copy lookup (and its staleness check)
    runs when the graph runs, so a compiled decode step streams the same copies as an eager one."""
    return linear(x, weight, bias)


@packed_linear.register_fake
def _(x, weight, bias):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def _compiled_inference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Inside a compiled region: CPU fp32 / bf16 inference that :func:`packed_linear` can serve."""
    return (packs_dtype(x.dtype) and type(x) in _PLAIN and type(weight) in _PLAIN
            and (bias is None or type(bias) in _PLAIN) and x.device.type == "cpu" and weight.device.type == "cpu"
            and x.dtype == weight.dtype and (bias is None or bias.dtype == x.dtype)
            and not _needs_grad(x, weight, bias) and not torch.is_autocast_enabled("cpu"))


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear``: x [..., in], weight [out, in] -> [..., out]; oneDNN for fp32 CPU tensors, on the packed copy
    of the weight when inference has one (see the module). Compiled regions: :func:`packed_linear` for CPU
    inference, else ``F.linear``."""
    if torch.compiler.is_compiling():
        return packed_linear(x, weight, bias) if _compiled_inference(x, weight, bias) else F.linear(x, weight, bias)
    if _PACKED:
        w = packed(weight)
        if w is not None and _inference(x, weight, bias):
            x2 = x.reshape(-1, x.shape[-1])
            if not isinstance(w, native_fp32.Blocked):
                return _mm(x2, w, bias).view(*x.shape[:-1], weight.shape[0])
            y = native_mm(x2, w, bias)
            if y is not None:
                return y.view(*x.shape[:-1], weight.shape[0])
            # more rows (a prefill): oneDNN or the bf16 route over the plain weight, below
    if widened.ROUTE and widened.applies(x, weight, bias):  # bf16 where the CPU has no bf16 products
        return widened.linear(x, weight, bias)
    if not onednn_applies(x, weight, bias):
        return F.linear(x, weight, bias)
    if _needs_grad(x, weight, bias):
        return _OneDNNLinear.apply(x, weight, bias)
    return _mm(x.reshape(-1, x.shape[-1]), weight, bias).view(*x.shape[:-1], weight.shape[0])


from llmarch.nn import widened  # noqa: E402 (it reads this module's names when called)


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters, names and state dict) whose forward is :func:`linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
