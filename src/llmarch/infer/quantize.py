"""Weight quantization of Linear layers, dequantized on the fly inside the matmul (int8 may also quantize the
activations).

- int8, per output channel, symmetric: w ≈ q * s[n], q in [-127, 127] (LLM.int8-style absmax, Dettmers et al.
  2022, without the outlier split). With ``activations="int8"`` an inference product also quantizes its input
  per row and block of 32 and multiplies in integers (dynamic W8A8, :mod:`llmarch.native.w8a8`): faster where
  fp32 arithmetic bounds the int8 kernel (from ~4 rows), less exact.
- int4, group-wise, asymmetric: each run of ``group_size`` input weights of a row gets its own scale and
  minimum, w ≈ q * s + m with q in [0, 15] (the GPTQ/AWQ storage format, here with plain round-to-nearest).

On CPU, int8 products of few rows (decoding) run in llmarch's native AVX-512 / AVX2 kernel in fp32
(:mod:`llmarch.native.int8`, where it builds); the others run in torch's packed kernels
(``_weight_int8pack_mm``, ``_weight_int4pack_mm_for_cpu``) or oneDNN's bf16 matmul, which take bf16 activations:
that rounding, not the weights, dominates their int8 logit error. Elsewhere the
weight is dequantized and multiplied in the activation dtype. Files keep a portable layout (int8 rows; two 4-bit
values per byte); the kernel layout is derived at the first forward.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from torch import nn

from llmarch import native
from llmarch.native import int8 as int8_native
from llmarch.native import w8a8
from llmarch.infer.lowbit import LowBitLinear
from llmarch.nn import dense
from llmarch.nn.heads import swap_projection

MODES = ("int8", "int4", "int3", "int2", "ternary")  # below 4 bits: llmarch.infer.lowbit
ACTIVATIONS = ("fp32", "int8")  # what an int8 layer's inference products multiply its weights with
GROUP_SIZES = (32, 64, 128)
log = logging.getLogger(__name__)


def _kernels_ok(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and not torch.is_grad_enabled()


# The packed kernels as opaque custom ops: inductor (torch 2.13) fails to lower _weight_int8pack_mm when an input
# is a fused expression, so a compiled decode step calls them through these wrappers.
# _weight_int8pack_mm runs row by row: its time grows linearly with M (at one thread, [M, 512] x [2752, 512]:
# 76 us at 2 rows, 657 at 32, 2645 at 128), while oneDNN's bf16 matmul over the weight cast to bf16 (exact: int8
# values fit bf16's mantissa) costs ~280 us at 2 rows and 1080 at 128. From this many rows (a prefill) the
# product takes the oneDNN route (``benchmarks/decode.py --int8-kernels``).
INT8_ONEDNN_MIN_ROWS = 32
_BF16_ONEDNN = dense.ONEDNN_BF16


def int8_mm_eager(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                  scales_bf16: torch.Tensor | None = None, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] (any float) @ (qweight [N, K] int8 * scales [N])ᵀ (+ bias [N]) -> [M, N] in x's dtype. Below
    INT8_ONEDNN_MIN_ROWS rows: llmarch's native kernel in fp32 (:mod:`llmarch.native.int8`; it adds the bias
    too) where it builds, else torch's packed kernel with bf16 activations; from there on, oneDNN's bf16 matmul
    where the CPU has it, else the native kernel again (on an AVX2 host 1.7-2.2x torch's packed kernel at 32 and
    128 rows, ``benchmarks/decode.py --int8-kernels``).
    ``scales_bf16``: the scales already cast (a module caches them). Eager callers call this directly: through
    the custom op below, each call costs ~10 us more (28 against 18 us for a 768 x 512 decode product), ~0.35 ms
    per LLaMA-style token."""
    few = x.shape[0] < INT8_ONEDNN_MIN_ROWS
    if (few or not _BF16_ONEDNN) and int8_native.available():  # fp32 activations, blocked weight
        y = int8_native.mm(x, qweight, scales, bias)
        return y if x.dtype == torch.float32 else y.to(x.dtype)
    xb = x.to(torch.bfloat16)
    if _BF16_ONEDNN and not few:  # bf16 products, fp32 scaling
        y = torch.ops.mkldnn._linear_pointwise(xb, qweight.to(torch.bfloat16), None, "none", [], "")
        y = (y.float() * scales).to(x.dtype)
    else:
        sb = scales.to(torch.bfloat16) if scales_bf16 is None else scales_bf16
        y = torch._weight_int8pack_mm(xb, qweight, sb).to(x.dtype)
    return y if bias is None else y + bias.to(x.dtype)


@torch.library.custom_op("llmarch::int8_mm", mutates_args=())
def int8_mm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
            bias: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`int8_mm_eager` as an opaque op for compiled regions."""
    return int8_mm_eager(x, qweight, scales, None, bias)


@int8_mm.register_fake
def _(x, qweight, scales, bias=None):
    return x.new_empty(x.shape[0], qweight.shape[0])


def w8a8_mm_eager(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] (any float) @ (qweight [N, K] int8 * scales [N])ᵀ (+ bias [N]) with x quantized per row and block of
    32 (:mod:`llmarch.native.w8a8`) -> [M, N] in x's dtype: the native kernel on CPU where it builds, else the same
    arithmetic in torch ops (any device)."""
    if x.device.type == "cpu" and w8a8.available():
        y = w8a8.mm(x, qweight, scales, bias)
    else:
        y = w8a8.reference_mm(x, qweight, scales, bias)
    return y.to(x.dtype)


@torch.library.custom_op("llmarch::w8a8_mm", mutates_args=())
def w8a8_mm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
            bias: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`w8a8_mm_eager` as an opaque op for compiled regions."""
    return w8a8_mm_eager(x, qweight, scales, bias)


@w8a8_mm.register_fake
def _(x, qweight, scales, bias=None):
    return x.new_empty(x.shape[0], qweight.shape[0])


@torch.library.custom_op("llmarch::int4_mm", mutates_args=())
def int4_mm(x: torch.Tensor, packed: torch.Tensor, group_size: int, scales_zeros: torch.Tensor,
            n: int) -> torch.Tensor:
    """x [M, K] @ the first n rows of a CPU-packed int4 weight -> [M, n] in x's dtype, bf16 inside."""
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), packed, group_size, scales_zeros)
    return y[:, :n].to(x.dtype).contiguous()


@int4_mm.register_fake
def _(x, packed, group_size, scales_zeros, n):
    return x.new_empty(x.shape[0], n)


class Int8Linear(nn.Module):
    """y = x Wᵀ + b with W stored int8 per output channel. x [*, K] -> [*, N].

    ``activations``: "fp32" (the dequantized product, x unrounded) or "int8" (without gradients, x is quantized per
    row and block of 32 and the product runs in integers, :func:`w8a8_mm_eager`; with gradients enabled, as
    "fp32": rounding x has no useful gradient). :func:`quantize` sets it for the whole model."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, activations: str = "fp32"):
        super().__init__()
        if activations not in ACTIVATIONS:
            raise ValueError(f"Int8Linear: activations must be one of {ACTIVATIONS}, got {activations!r}")
        self.in_features, self.out_features, self.activations = in_features, out_features, activations
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scales", torch.ones(out_features))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8Linear":
        return cls.from_weight(linear.weight, linear.bias)

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None = None) -> "Int8Linear":
        """The int8 form of ``weight`` [out, in] (+ ``bias`` [out], kept in fp32)."""
        w = weight.detach().float()
        m = cls(w.shape[1], w.shape[0], bias is not None).to(w.device)
        scales = (w.abs().amax(1) / 127).clamp(min=1e-12)
        m.qweight.copy_((w / scales[:, None]).round().clamp(-127, 127).to(torch.int8))
        m.scales.copy_(scales)
        if bias is not None:
            m.bias.copy_(bias.detach().float())
        return m

    def dequantize(self) -> torch.Tensor:
        return self.qweight.float() * self.scales[:, None]  # [N, K]

    def _scales_bf16(self) -> torch.Tensor:
        """The scales cast to bf16, cast once while they stay the same tensor (same storage and version)."""
        key = (self.scales.data_ptr(), native.version(self.scales))
        cached = getattr(self, "_bf16_cache", None)
        if cached is None or cached[0] != key:
            cached = self._bf16_cache = (key, self.scales.to(torch.bfloat16))
        return cached[1]

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"activations={self.activations}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        if self.activations == "int8" and not torch.is_grad_enabled():
            compiling = torch.compiler.is_compiling()
            y = (w8a8_mm if compiling else w8a8_mm_eager)(x2, self.qweight, self.scales, self.bias)
        elif _kernels_ok(x) and not torch.compiler.is_compiling():
            y = int8_mm_eager(x2, self.qweight, self.scales, self._scales_bf16(), self.bias)
        elif _kernels_ok(x):
            y = int8_mm(x2, self.qweight, self.scales, self.bias)
        else:
            y = x2 @ (self.qweight.to(x.dtype) * self.scales[:, None].to(x.dtype)).T
            y = y if self.bias is None else y + self.bias.to(x.dtype)
        return y.view(*x.shape[:-1], self.out_features)


class Int4Linear(nn.Module):
    """y = x Wᵀ + b with W stored 4-bit in groups of ``group_size`` along K. x [*, K] -> [*, N]."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, group_size: int = 64):
        super().__init__()
        if group_size not in GROUP_SIZES:
            raise ValueError(f"group_size must be one of {GROUP_SIZES}, got {group_size}")
        if in_features % group_size:
            raise ValueError(f"int4: in_features {in_features} is not a multiple of group_size {group_size}; "
                             "pick a group size that divides it")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        n_groups = in_features // group_size
        self.register_buffer("qweight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8))
        self.register_buffer("scales", torch.ones(out_features, n_groups))
        self.register_buffer("mins", torch.zeros(out_features, n_groups))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        self._packed: tuple | None = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = 64) -> "Int4Linear":
        w = linear.weight.detach().float()
        N, K = w.shape
        m = cls(K, N, linear.bias is not None, group_size).to(w.device)
        g = w.view(N, K // group_size, group_size)
        lo, hi = g.amin(-1), g.amax(-1)
        scales = ((hi - lo) / 15).clamp(min=1e-12)
        q = ((g - lo[..., None]) / scales[..., None]).round().clamp(0, 15).to(torch.uint8).view(N, K)
        m.qweight.copy_(q[:, 0::2] | (q[:, 1::2] << 4))
        m.scales.copy_(scales)
        m.mins.copy_(lo)
        if linear.bias is not None:
            m.bias.copy_(linear.bias.detach().float())
        return m

    def unpack(self) -> torch.Tensor:
        """4-bit codes [N, K] as uint8."""
        return torch.stack([self.qweight & 15, self.qweight >> 4], -1).view(self.out_features, self.in_features)

    def dequantize(self) -> torch.Tensor:
        N, K, gs = self.out_features, self.in_features, self.group_size
        q = self.unpack().float().view(N, K // gs, gs)
        return (q * self.scales[..., None] + self.mins[..., None]).view(N, K)

    def _kernel_args(self) -> tuple[torch.Tensor, torch.Tensor]:
        """torch's CPU layout: rows padded to a multiple of 16, (scale, zero) [K/gs, N, 2] in bf16, with the
        kernel's convention w = (q - 8) * scale + zero."""
        if self._packed is None:
            pad = -self.out_features % 16
            q = nn.functional.pad(self.unpack().to(torch.int32), (0, 0, 0, pad))
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
            zeros = self.mins + 8 * self.scales
            sz = torch.stack([self.scales, zeros], -1)  # [N, K/gs, 2]
            sz = nn.functional.pad(sz, (0, 0, 0, 0, 0, pad)).transpose(0, 1).contiguous().to(torch.bfloat16)
            self._packed = (packed, sz)
        return self._packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        if _kernels_ok(x):
            packed, sz = self._kernel_args()
            y = int4_mm(x2, packed, self.group_size, sz, self.out_features)
        else:
            y = x2 @ self.dequantize().to(x.dtype).T
        y = y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(x.dtype)


def quantize(model: nn.Module, mode: str = "int8", group_size: int = 64, skip: tuple[str, ...] = (),
             activations: str = "fp32") -> nn.Module:
    """Replace every ``nn.Linear`` (except names in ``skip``) by its quantized version, in place. A tied LM head
    is quantized as its own copy. The embedding table and a mixture of experts' scorers stay in full precision:
    the routers' (``E`` outputs, read in fp32 by design: ``llmarch.nn.router``) and the shared experts' one-output
    gate (``llmarch.nn.moe.GatedSharedExperts``); together a few KB. int8 also quantizes the routed experts'
    banks (:mod:`llmarch.infer.int8_experts`); the other modes leave them in full precision.
    ``activations`` (int8 only): "fp32", or "int8" to quantize each inference product's input too (dynamic W8A8:
    :class:`Int8Linear`); kept in ``model.quantization`` and ``quantization.json``."""
    from llmarch.nn.moe import GatedSharedExperts
    from llmarch.nn.router import Router

    if mode not in MODES:
        raise ValueError(f"quantize mode must be one of {MODES}, got {mode!r}")
    if activations not in ACTIVATIONS:
        raise ValueError(f"quantize: activations must be one of {ACTIVATIONS}, got {activations!r}")
    if activations != "fp32" and mode != "int8":
        raise ValueError(f"quantize: activations={activations!r} needs mode 'int8' (got {mode!r}); drop it or "
                         "use int8")
    scorers = {id(m.proj) for m in model.modules() if isinstance(m, Router)}
    scorers |= {id(m.gate) for m in model.modules() if isinstance(m, GatedSharedExperts)}
    targets = [(name, m) for name, m in model.named_modules()
               if isinstance(m, nn.Linear) and name not in skip and id(m) not in scorers]
    if mode in ("int4", "int3", "int2"):
        misfit = [name for name, m in targets if m.in_features % group_size]
        if misfit:
            log.warning("%s: %d Linear layers have in_features not divisible by group_size %d and stay in full "
                        "precision: %s", mode, len(misfit), group_size, misfit[:4])
            skip = tuple(skip) + tuple(misfit)
            targets = [(name, m) for name, m in targets if name not in misfit]
    for name, linear in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        q = (Int8Linear.from_linear(linear) if mode == "int8" else Int4Linear.from_linear(linear, group_size)
             if mode == "int4" else LowBitLinear.from_linear(linear, mode, group_size))
        setattr(parent, attr, swap_projection(linear, q))
    if mode == "int8":
        from llmarch.infer.int8_experts import quantize_banks

        quantize_banks(model, tuple(skip))
        for m in model.modules():
            if isinstance(m, Int8Linear):
                m.activations = activations
    model.quantization = dict(mode=mode, group_size=group_size if mode in ("int4", "int3", "int2") else None,
                              skip=list(skip), activations=activations)
    return model


def save_quantized(model: nn.Module, path: str | os.PathLike, overwrite: bool = False) -> Path:
    """An llmarch model directory plus ``quantization.json``; :func:`llmarch.checkpoint.load_model` reads it.
    A non-empty ``path`` is refused unless ``overwrite`` (see :mod:`llmarch.outdir`)."""
    from llmarch.checkpoint import state_for_saving
    from llmarch.manifest import write_manifest
    from llmarch.outdir import staged_dir
    from safetensors.torch import save_file

    if not hasattr(model, "quantization"):
        raise ValueError("save_quantized: the model is not quantized; call quantize(model, mode) first")
    with staged_dir(path, overwrite) as tmp:
        save_file(state_for_saving(model), str(tmp / "model.safetensors"), metadata={"format": "llmarch"})
        model.config.to_file(tmp / "config.json")
        (tmp / "quantization.json").write_text(json.dumps(model.quantization) + "\n")
        write_manifest(tmp)
    return Path(path)


def load_quantized(path: str | os.PathLike) -> nn.Module:
    """Rebuild the quantized structure from ``quantization.json`` and load the stored tensors strictly."""
    from safetensors.torch import load_file

    from llmarch.config import ModelConfig
    from llmarch.model import build

    path = Path(path)
    spec = json.loads((path / "quantization.json").read_text())
    model = build(ModelConfig.from_file(path / "config.json"))
    quantize(model, spec["mode"], spec.get("group_size") or 64, tuple(spec.get("skip", ())),
             spec.get("activations", "fp32"))
    state = load_file(str(path / "model.safetensors"))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if model.config.tie_embeddings:  # the head's float weight is gone; the embedding keeps the shared one
        missing = [m for m in missing if m != "lm_head.weight"]
    if missing or unexpected:
        raise ValueError(f"{path}: stored tensors do not match quantization.json: missing {missing[:10]}, "
                         f"unexpected {unexpected[:10]}")
    return model.eval()
