"""Rotary position embeddings (Su et al. 2021, RoFormer) in the half-rotation layout, with the context-extension
scalings: linear position interpolation (Chen et al. 2023), dynamic NTK, Llama 3's frequency bands, and YaRN
(Peng et al. 2023)."""
from __future__ import annotations

import math

import torch
from torch import nn

from llmarch.config import RopeConfig
from llmarch import native
from llmarch.native import rows as native_rows


def base_inv_freq(theta: float, dim: int) -> torch.Tensor:
    """theta^(-2i/dim) for i < dim/2, fp32. [dim/2]"""
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def llama3_inv_freq(inv: torch.Tensor, cfg: RopeConfig) -> torch.Tensor:
    """Llama 3.1: long wavelengths divided by ``factor``, short ones kept, a smooth blend in between."""
    old = cfg.original_max_seq_len
    low_wavelen, high_wavelen = old / cfg.low_freq_factor, old / cfg.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / cfg.factor, inv)
    smooth = (old / wavelen - cfg.low_freq_factor) / (cfg.high_freq_factor - cfg.low_freq_factor)
    blended = (1 - smooth) * scaled / cfg.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, blended, scaled)


def yarn_inv_freq(cfg: RopeConfig, dim: int) -> tuple[torch.Tensor, float]:
    """YaRN: interpolate low frequencies, keep high ones, a linear ramp between; returns (inv_freq, cos/sin scale)."""
    factor, base, orig = cfg.factor, cfg.theta, cfg.original_max_seq_len

    def correction_dim(rotations: float) -> float:
        return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(cfg.beta_fast), correction_dim(cfg.beta_slow)
    if cfg.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    powers = base ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation, interpolation = 1.0 / powers, 1.0 / (factor * powers)
    keep = 1 - ramp  # 1 where the dimension keeps its original frequency
    inv = interpolation * (1 - keep) + extrapolation * keep
    scale = cfg.attention_factor
    if scale is None:
        scale = 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0
    return inv, scale


class RotaryEmbedding(nn.Module):
    """Computes cos/sin tables for given position ids and applies the rotation to q and k.

    The first ``rot_dim = fraction * head_dim`` dims of each head are rotated, pairing dim i with i + rot_dim/2.
    """

    def __init__(self, head_dim: int, rope: RopeConfig, max_seq_len: int):
        super().__init__()
        self.rope, self.max_seq_len = rope, max_seq_len
        self.rot_dim = int(head_dim * rope.fraction)
        inv, scale = base_inv_freq(rope.theta, self.rot_dim), 1.0
        if rope.scaling == "linear":
            inv = inv / rope.factor
        elif rope.scaling == "llama3":
            inv = llama3_inv_freq(inv, rope)
        elif rope.scaling == "yarn":
            inv, scale = yarn_inv_freq(rope, self.rot_dim)
        self.scale = scale
        self.register_buffer("inv_freq", inv, persistent=False)

    def frequencies(self, position_ids: torch.Tensor) -> torch.Tensor:
        """Inverse frequencies for this call. Dynamic NTK grows the base once positions pass ``max_seq_len``."""
        if self.rope.scaling != "dynamic":
            return self.inv_freq
        seq_len = int(position_ids.max()) + 1
        if seq_len <= self.max_seq_len:
            return self.inv_freq
        d, f = self.rot_dim, self.rope.factor
        base = self.rope.theta * ((f * seq_len / self.max_seq_len) - (f - 1)) ** (d / (d - 2))
        return base_inv_freq(base, d).to(self.inv_freq.device)

    SPAN = 64  # positions a range's table covers at least (one table serves the next SPAN - 1 decode steps)

    def forward(self, position_ids: torch.Tensor, start: int | None = None) -> "Rotation":
        """position_ids [B, T] -> a Rotation holding cos/sin [B, 1, T, rot_dim] in fp32. ``start``: the caller
        knows every row's ids are ``start, ..., start + T - 1``; without a gradient (and outside compilation) the
        rotation is then a view [1, 1, T, rot_dim] of a table of :attr:`SPAN` positions kept from an earlier call
        (the same values: computed by the same ops), so a decode step does not recompute its angles."""
        if (start is None or self.rope.scaling == "dynamic" or torch.is_grad_enabled()
                or torch.compiler.is_compiling()):
            return self._rotation(position_ids)
        T, inv = position_ids.shape[1], self.inv_freq
        key = (inv.data_ptr(), inv.dtype, inv.device, native.version(inv))
        table = getattr(self, "_table", None)
        if table is None or table[0] != key or not table[1] <= start <= start + T <= table[1] + table[2].shape[2]:
            ids = torch.arange(start, start + max(T, self.SPAN), device=inv.device)[None]
            r = self._rotation(ids)
            table = self._table = (key, start, r.cos, r.sin)
        return Rotation(table[2].narrow(2, start - table[1], T), table[3].narrow(2, start - table[1], T))

    def _rotation(self, position_ids: torch.Tensor) -> "Rotation":
        inv = self.frequencies(position_ids)
        angles = position_ids[:, :, None].float() * inv[None, None, :]  # [B, T, rot/2]
        emb = torch.cat([angles, angles], dim=-1)[:, None]  # [B, 1, T, rot]
        return Rotation(emb.cos() * self.scale, emb.sin() * self.scale)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[x1, x2] -> [-x2, x1] on the last dim."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def _half_rotation(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    out = x * cos
    out[..., :h] -= x[..., h:] * sin[..., :h]
    out[..., h:] += x[..., :h] * sin[..., h:]
    return out


class _HalfRotation(torch.autograd.Function):
    """x * cos + rotate_half(x) * sin for x [..., R] written half by half (out1 = x1 c1 - x2 s1, out2 = x2 c2 +
    x1 s2), and its backward likewise, without the negated copy and the concatenations of the plain form; the same
    products and sums, so the same values bit for bit (tests). cos/sin get no gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(cos, sin)
        return _half_rotation(x, cos, sin)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        cos, sin = ctx.saved_tensors
        h = g.shape[-1] // 2
        dx = g * cos
        dx[..., :h] += g[..., h:] * sin[..., h:]
        dx[..., h:] -= g[..., :h] * sin[..., :h]
        return dx, None, None


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin (x [..., R], cos/sin broadcastable): :class:`_HalfRotation` for plain
    tensors in eager mode with constant tables, else the plain form (the reference)."""
    if type(x) is torch.Tensor and not cos.requires_grad and not torch.compiler.is_compiling():
        # without autograd (decoding) the same ops run directly: Function.apply costs a per-call overhead; and in
        # one native call where it builds (llmarch.native.rows: the same bits)
        if torch.is_grad_enabled() and (x.requires_grad or sin.requires_grad):
            return _HalfRotation.apply(x, cos, sin)
        y = native_rows.rotate_half(x, cos, sin) if native_rows.applies(x, cos, sin) else None
        return _half_rotation(x, cos, sin) if y is None else y
    return x * cos + rotate_half(x) * sin


class Rotation:
    """cos/sin [B, 1, T, R]; ``apply(q, k)`` rotates the first R dims of q [B, H, T, Dh] and k [B, G, T, Dh]."""

    def __init__(self, cos: torch.Tensor, sin: torch.Tensor):
        self.cos, self.sin = cos, sin

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        """Rotate the first R dims of x [B, N, T, Dh] (any number N of q or k heads)."""
        return self._one(x)

    def _one(self, x: torch.Tensor) -> torch.Tensor:
        r = self.cos.shape[-1]
        cos, sin = self.cos.to(x.dtype), self.sin.to(x.dtype)
        if r == x.shape[-1]:
            return rotate(x, cos, sin)
        x_rot, x_pass = x[..., :r], x[..., r:]
        return torch.cat([rotate(x_rot, cos, sin), x_pass], dim=-1)

    def apply(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._one(q), self._one(k)


class NoRotation:
    """The rotation of schemes that do not rotate q/k."""

    def apply(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return q, k

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        return x
