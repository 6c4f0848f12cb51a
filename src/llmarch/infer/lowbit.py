"""Weights below 4 bits: group-wise 3- and 2-bit codes and ternary weights, for post-training quantization and for
quantization-aware training (QAT) from ``llmarch train --qat MODE``.

- ``int3`` / ``int2``: each run of ``group_size`` input weights of a row gets a scale and a minimum,
  w ≈ q * s + m with q in [0, 2^bits - 1] (the int4 scheme of :mod:`llmarch.infer.quantize` with fewer levels).
- ``ternary``: BitNet b1.58 (Ma et al. 2024): one absmean scale per matrix, gamma = mean |W|,
  w ≈ gamma * RoundClip(W / gamma, -1, 1), so every weight is -gamma, 0 or +gamma (log2 3 = 1.58 bits).

:func:`fake_quantize` is the rounding as a differentiable op (straight-through estimator: the forward sees the
quantized weight, the gradient reaches the float weight unchanged), used by :class:`QATLinear` during training;
:class:`LowBitLinear` stores the codes for inference. Both give the same dequantized weight, so a model trained
with QAT and then quantized computes what it computed in training.
"""
from __future__ import annotations

import torch
from torch import nn

from llmarch.nn.dense import Linear

LOWBIT_MODES = {"int3": 3, "int2": 2, "ternary": None}
QAT_MODES = ("int8", "int4", "int3", "int2", "ternary")


def _groupwise(w: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes [N, K] uint8, scales and minimums [N, K / group_size] of w [N, K] (round to nearest)."""
    N, K = w.shape
    if K % group_size:
        raise ValueError(f"group_size {group_size} does not divide in_features {K}; pick a divisor")
    g = w.float().view(N, K // group_size, group_size)
    lo, hi = g.amin(-1), g.amax(-1)
    scales = ((hi - lo) / (2 ** bits - 1)).clamp(min=1e-12)
    q = ((g - lo[..., None]) / scales[..., None]).round().clamp(0, 2 ** bits - 1)
    return q.to(torch.uint8).view(N, K), scales, lo


def _ternary(w: torch.Tensor, eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes in {-1, 0, 1} [N, K] int8 and the absmean scale gamma (a 0-d tensor) of w [N, K]."""
    gamma = w.float().abs().mean().clamp(min=eps)
    return (w.float() / gamma).round().clamp(-1, 1).to(torch.int8), gamma


def quantized_weight(w: torch.Tensor, mode: str, group_size: int = 64) -> torch.Tensor:
    """The dequantized weight ``mode`` stores for w [N, K] (float32). int8: per output channel absmax; int4, int3,
    int2: group-wise min/max; ternary: absmean."""
    if mode == "int8":
        s = (w.float().abs().amax(1, keepdim=True) / 127).clamp(min=1e-12)
        return (w.float() / s).round().clamp(-127, 127) * s
    if mode == "ternary":
        q, gamma = _ternary(w)
        return q.float() * gamma
    bits = 4 if mode == "int4" else LOWBIT_MODES.get(mode)
    if bits is None:
        raise ValueError(f"quantization mode {mode!r} is unknown; choose one of {list(QAT_MODES)}")
    q, scales, mins = _groupwise(w, bits, group_size)
    N, K = w.shape
    return (q.float().view(N, K // group_size, group_size) * scales[..., None] + mins[..., None]).view(N, K)


def fake_quantize(w: torch.Tensor, mode: str, group_size: int = 64) -> torch.Tensor:
    """w with the forward value of its quantized version and the gradient of the identity (STE)."""
    return w + (quantized_weight(w.detach(), mode, group_size).to(w.dtype) - w).detach()


class LowBitLinear(nn.Module):
    """y = x Wᵀ + b with W stored as 3-bit, 2-bit (group-wise) or ternary codes, one uint8/int8 per weight (the
    format is about quality, not packing). x [*, K] -> [*, N]."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, mode: str = "int2",
                 group_size: int = 64):
        super().__init__()
        if mode not in LOWBIT_MODES:
            raise ValueError(f"low-bit mode {mode!r} is unknown; choose one of {list(LOWBIT_MODES)}")
        self.in_features, self.out_features, self.mode, self.group_size = in_features, out_features, mode, group_size
        groups = 1 if mode == "ternary" else in_features // group_size
        codes = torch.int8 if mode == "ternary" else torch.uint8
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=codes))
        self.register_buffer("scales", torch.ones(out_features if mode != "ternary" else 1, groups))
        self.register_buffer("mins", torch.zeros(out_features if mode != "ternary" else 1, groups))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, mode: str, group_size: int = 64) -> "LowBitLinear":
        w = linear.weight.detach()
        m = cls(w.shape[1], w.shape[0], linear.bias is not None, mode, group_size).to(w.device)
        if mode == "ternary":
            q, gamma = _ternary(w)
            m.qweight.copy_(q)
            m.scales.fill_(float(gamma))
        else:
            q, scales, mins = _groupwise(w, LOWBIT_MODES[mode], group_size)
            m.qweight.copy_(q)
            m.scales.copy_(scales)
            m.mins.copy_(mins)
        if linear.bias is not None:
            m.bias.copy_(linear.bias.detach().float())
        return m

    def dequantize(self) -> torch.Tensor:
        N, K = self.out_features, self.in_features
        if self.mode == "ternary":
            return self.qweight.float() * self.scales[0, 0]
        gs = self.group_size
        q = self.qweight.float().view(N, K // gs, gs)
        return (q * self.scales[..., None] + self.mins[..., None]).view(N, K)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x @ self.dequantize().to(x.dtype).T
        return y if self.bias is None else y + self.bias.to(x.dtype)


class QATLinear(nn.Linear):
    """An ``nn.Linear`` whose forward uses the fake-quantized weight (quantization-aware training); it keeps the
    same ``weight`` / ``bias`` parameters and names, so optimizers, checkpoints and resume are unchanged."""

    qat_mode: str = "int8"
    qat_group_size: int = 64

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, fake_quantize(self.weight, self.qat_mode, self.qat_group_size), self.bias)


def prepare_qat(model: nn.Module, mode: str, group_size: int = 64, skip: tuple[str, ...] = ("lm_head",)) -> list[str]:
    """Turn every ``nn.Linear`` (but those named in ``skip``, and those whose width the group size does not divide)
    into a :class:`QATLinear` in place, sharing its parameters; returns the names changed."""
    if mode not in QAT_MODES:
        raise ValueError(f"qat: {mode!r} is unknown; choose one of {list(QAT_MODES)}")
    changed = []
    for name, m in model.named_modules():
        grouped = mode in ("int4", "int3", "int2")
        if type(m) not in (nn.Linear, Linear) or name in skip or (grouped and m.in_features % group_size):
            continue
        m.__class__ = QATLinear  # same parameters, same names; only the forward changes
        m.qat_mode, m.qat_group_size = mode, group_size
        changed.append(name)
    return changed
