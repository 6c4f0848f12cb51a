"""Dense projections: ``nn.Linear`` with the fp32 CPU matrix products sent to oneDNN.

torch sends fp32 CPU matmuls to its BLAS (MKL); oneDNN, which torch already uses for bf16, ran the training shapes
of this library about 2x faster on the benchmark machine (an AMD EPYC with AVX-512, one thread: [2048, 512] x [512,
2752] 87 -> 200 GFLOP/s, and the transposed products of the backward alike; batch-8 decode through the 50257 x 768
GPT-2 head 3-4 -> 8-10 GB/s). A single row (batch-1 decoding) keeps torch's BLAS unless the weight has >= 2^24
elements: with every one-row product on oneDNN, LLaMA-style batch-1 decoding ran 8-17 % slower in each of three
interleaved A/Bs (its 512 x 512 .. 2752 x 512 products do not pay oneDNN's per-call cost); for GPT-2's 50257 x 768
head the A/Bs were within the noise (-13 % .. +25 %). Same function, fp32 rounding order aside: tests hold values
and gradients to ``F.linear``. On a CPU without AVX-512 the order reverses (MKL ahead: ``ONEDNN_FP32`` below), and
plain-weight fp32 products stay on ``F.linear`` there. Everything else (other devices and dtypes, autocast, compiled
regions, tensor subclasses such as sharded DTensors) takes ``F.linear`` unchanged.

Inference can also run on *packed* weights (:func:`pack`): a copy of the weight in the blocked layout oneDNN picks
for 128-row products, held outside the module (state dicts, parameters and checkpoints are untouched) and used
by :func:`linear` only while it is current (same tensor, storage and version: an in-place update, a
``load_state_dict`` or a dtype change makes it stale, and the plain path runs) and no gradient is needed.
(Writes through ``weight.data`` escape the version counter, hence this check: :func:`unpack` after them.)
Measured on the benchmark machine (``benchmarks/decode.py --kernels``, one thread, weights streamed from memory):
the LLaMA-style matrices at 1 row streamed 21-31 GB/s packed against 17-21 for the best plain kernel and layout,
at 8 rows 15-21 against 10-20; GPT-2's 50257 x 768 head 35 against 29 (1 row) and 24 against 16 (8 rows).
fp32 and bf16 weights (bf16 where the CPU has oneDNN's bf16 products: ``ONEDNN_BF16``; and expert banks, one copy
per expert); the bf16 products are bit-identical to ``F.linear``'s. It costs one more copy of the packed weights
in memory; ``llmarch.infer.layout.pack_weights`` decides when. Where llmarch's native kernel builds
(:mod:`llmarch.native.fp32`: x86-64 with AVX-512 or AVX2 and a C compiler), a 2-D fp32 weight's copy is that
kernel's blocked layout instead: products of up to ``native_fp32.MAX_ROWS`` rows run there (1.06-1.18x whole decode
steps against oneDNN's packed copy, ``benchmarks/decode.py``), more rows on oneDNN over the plain weight. An fp32
expert bank's copies are that layout too, one per expert (``llmarch.nn.banks.packed_mm``; AVX2 host, one expert's
two matrices at 1 / 4 / 16 rows: 311 / 543 / 1331 us against 530 / 713 / 1365 on oneDNN's packed copies).

Expert banks ([E, in, out], ``llmarch.nn.experts``) run their per-expert products through
``llmarch.nn.banks.bank_linear``: the same oneDNN products, forward and backward (fp32 training; fp32 and bf16
inference).
"""
from __future__ import annotations

import math
import os
import weakref

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils import flop_counter

from llmarch.native import fp32 as native_fp32

_OPS = getattr(torch.ops, "mkldnn", None)
ONEDNN = torch.backends.mkldnn.is_available() and _OPS is not None and hasattr(_OPS, "_linear_pointwise")
# oneDNN's bf16 products need AVX-512 (BW, VL, DQ) or AVX-NE-CONVERT; elsewhere bf16 stays on torch's kernels
ONEDNN_BF16 = ONEDNN and hasattr(_OPS, "_is_mkldnn_bf16_supported") and bool(_OPS._is_mkldnn_bf16_supported())
# fp32 products over plain weights (training, prefills) go to oneDNN on hosts where it beats torch's BLAS: AVX-512
# ones (see above). On an AVX2-only EPYC (Zen 3, one thread, [2048, in] x [in, out] at the training shapes of
# benchmarks/decoder.py) MKL was ahead in 20 of 27 forward / dx / dW products and 1.1-2.2x in most backward ones
# (GPT-2-124M training step 0.69x transformers on oneDNN). ``LLMARCH_ONEDNN_FP32=1`` / ``0`` overrides.
_FP32_ENV = os.environ.get("LLMARCH_ONEDNN_FP32", "")
ONEDNN_FP32 = ONEDNN and (_FP32_ENV == "1" or (_FP32_ENV != "0"
                                               and torch.backends.cpu.get_cpu_capability().startswith("AVX512")))
_PLAIN = (torch.Tensor, nn.Parameter)
MATVEC_MIN_ELEMENTS = 1 << 24  # a one-row product goes to oneDNN only for weights this large (see above)
PACK_ROWS = 128  # the row count the packed layout is chosen for; measured fastest at 1, 8 and 128 rows alike
_PACKED: dict[int, tuple] = {}  # id(weight) -> (weakref to it, its storage pointer, its version, packed copy)


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


def _operands_fit(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """oneDNN can take these: plain CPU tensors of one dtype it supports (the bias's too), eager, no autocast."""
    return (onednn_dtype(x.dtype) and x.device.type == "cpu" and x.dtype == weight.dtype and x.numel() > 0
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
    return (onednn_dtype(weight.dtype) and type(weight) in _PLAIN and weight.device.type == "cpu"
            and weight.numel() > 0 and weight.dim() in (2, 3))


def packed(weight: torch.Tensor) -> torch.Tensor | list[torch.Tensor] | None:
    """The current packed copy of ``weight`` (a bank's: one per expert), or None (never packed, or stale since)."""
    entry = _PACKED.get(id(weight))
    if entry is None or entry[0]() is not weight or entry[1] != weight.data_ptr() or entry[2] != weight._version:
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
    native = w.dtype == torch.float32 and native_fp32.available()
    if w.dim() == 3:  # a bank [E, in, out]: one copy per expert, of its [out, in] matrix
        copy = [native_fp32.Blocked(w[e].t()) if native else _reorder(w[e].t()) for e in range(w.shape[0])]
    else:
        copy = native_fp32.Blocked(w) if native else _reorder(w)
    _PACKED[key] = (weakref.ref(weight), weight.data_ptr(), weight._version, copy)
    if fresh:
        weakref.finalize(weight, _PACKED.pop, key, None)
    return True


def unpack(weight: torch.Tensor) -> None:
    """Drop ``weight``'s packed copy, if any."""
    entry = _PACKED.get(id(weight))
    if entry is not None and entry[0]() is weight:
        del _PACKED[id(weight)]


def _inference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """A packed copy of ``weight`` can serve these operands: oneDNN takes them and no gradient is needed."""
    return _operands_fit(x, weight, bias) and not _needs_grad(x, weight, bias)


def packed_banks(x: torch.Tensor, *banks: torch.Tensor) -> list[list[torch.Tensor]] | None:
    """The packed copies of these expert banks if inference on ``x`` can use them (all current, no gradient
    needed), else None. ``packed_banks(x, b)[0][e]`` is expert e's matrix for ``llmarch.nn.banks.packed_mm``."""
    if not _PACKED or torch.compiler.is_compiling():
        return None
    copies = [packed(b) for b in banks]
    if any(c is None for c in copies) or not all(_inference(x, b, None) for b in banks):
        return None
    return copies


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
    return (onednn_dtype(x.dtype) and type(x) in _PLAIN and type(weight) in _PLAIN
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
            if x2.shape[0] <= native_fp32.MAX_ROWS and native_fp32.available():
                return native_fp32.mm(x2, w, bias).view(*x.shape[:-1], weight.shape[0])
            # more rows (a prefill): oneDNN over the plain weight, below
    if not onednn_applies(x, weight, bias):
        return F.linear(x, weight, bias)
    if _needs_grad(x, weight, bias):
        return _OneDNNLinear.apply(x, weight, bias)
    return _mm(x.reshape(-1, x.shape[-1]), weight, bias).view(*x.shape[:-1], weight.shape[0])


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters, names and state dict) whose forward is :func:`linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
