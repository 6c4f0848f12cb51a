"""Position schemes. Each answers three questions, so callers never branch on the kind:

- ``embed(position_ids)``: a [B, T, D] term added to the token embeddings, or None;
- ``rotation(position_ids)``: a rotation applied to q/k in every attention layer (identity if none);
- ``score_bias(q_idx, k_idx)``: an additive [1, H, T, S] bias on attention scores, or None.

``position_ids`` [B, T] count real tokens (left padding does not advance them); ``q_idx`` [T] and ``k_idx`` [S]
are absolute slots in the (padded) sequence, which is what relative biases and masks use.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from llmarch.nn.device import assert_on_device, host_reads_ok
from llmarch.nn.rope import NoRotation, RotaryEmbedding, Rotation
from llmarch.registry import Registry

POSITIONS: Registry[type[nn.Module]] = Registry("position")


class PositionScheme(nn.Module):
    """Base with the do-nothing answers; subclasses override what they provide."""

    rotates = False
    max_positions: int | None = None  # positions it can represent (None = any); a learned table has a size

    def embed(self, position_ids: torch.Tensor) -> torch.Tensor | None:
        return None

    def rotation(self, position_ids: torch.Tensor, start: int | None = None) -> Rotation | NoRotation:
        """The q/k rotation at position_ids [B, T]; ``start``: they are ``start, ..., start + T - 1`` in every
        row (a scheme may use it to skip work)."""
        return NoRotation()

    def score_bias(self, q_idx: torch.Tensor, k_idx: torch.Tensor) -> torch.Tensor | None:
        return None


def position_limit(model: nn.Module) -> int | None:
    """The fewest positions any position scheme of ``model`` can represent (None = unlimited)."""
    limits = [m.max_positions for m in model.modules() if getattr(m, "max_positions", None) is not None]
    return min(limits) if limits else None


@POSITIONS.register("none")
class NoPositions(PositionScheme):
    """No position information (NoPE): the causal mask alone orders tokens."""

    def __init__(self, **_: object):
        super().__init__()


@POSITIONS.register("learned")
class LearnedPositions(PositionScheme):
    """A learned [max_seq_len, D] table (GPT-2, BERT)."""

    def __init__(self, d_model: int, max_seq_len: int, **_: object):
        super().__init__()
        self.max_seq_len = max_seq_len
        self.weight = nn.Parameter(torch.zeros(max_seq_len, d_model))

    @property
    def max_positions(self) -> int:
        return self.max_seq_len

    def embed(self, position_ids: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():  # a compiled decode step sizes its static cache within max_seq_len
            return nn.functional.embedding(position_ids, self.weight)
        if not host_reads_ok(position_ids):  # an accelerator checks on the device (no host sync)
            assert_on_device((position_ids < self.max_seq_len).all(), f"position ids: past the learned position "
                             f"table (max_seq_len={self.max_seq_len}); shorten the input")
            return nn.functional.embedding(position_ids, self.weight)
        top = int(position_ids.max()) if position_ids.numel() else 0
        if top >= self.max_seq_len:
            raise ValueError(f"position {top} is past the learned position table (max_seq_len={self.max_seq_len}); "
                             "shorten the input or use a position scheme that extrapolates (rope, alibi)")
        return nn.functional.embedding(position_ids, self.weight)


def sinusoid_table(n: int, dim: int, base: float = 10000.0) -> torch.Tensor:
    """Vaswani et al. 2017: PE[p, 2i] = sin(p / base^(2i/D)), PE[p, 2i+1] = cos(...). [n, D] fp32."""
    pos = torch.arange(n, dtype=torch.float32)[:, None]
    inv = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(base) / dim))
    table = torch.zeros(n, dim)
    table[:, 0::2] = torch.sin(pos * inv)
    table[:, 1::2] = torch.cos(pos * inv)[:, : dim // 2]
    return table


@POSITIONS.register("sinusoidal")
class SinusoidalPositions(PositionScheme):
    """Fixed sinusoids (Vaswani et al. 2017), computed on the fly so any length works."""

    def __init__(self, d_model: int, **_: object):
        super().__init__()
        self.d_model = d_model

    def embed(self, position_ids: torch.Tensor) -> torch.Tensor:
        dim = self.d_model
        inv = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32, device=position_ids.device)
                        * (-math.log(10000.0) / dim))
        angles = position_ids[..., None].float() * inv  # [B, T, D/2]
        out = torch.stack([angles.sin(), angles.cos()], dim=-1).flatten(-2)  # interleave sin, cos
        return out[..., :dim]


@POSITIONS.register("sinusoidal_halves")
class SinusoidalHalvesPositions(PositionScheme):
    """The same sinusoids laid out [sin of every frequency | cos of every frequency] instead of interleaved, as
    tensor2tensor's reference code for Vaswani et al. 2017 (and Marian) computes them."""

    def __init__(self, d_model: int, **_: object):
        super().__init__()
        self.d_model = d_model

    def embed(self, position_ids: torch.Tensor) -> torch.Tensor:
        dim = self.d_model
        half = (dim + 1) // 2  # an odd width gets one more sin than cos
        inv = torch.pow(10000.0, -torch.arange(0, dim, 2, dtype=torch.float64, device=position_ids.device) / dim)
        angles = position_ids[..., None].double() * inv  # [B, T, half], fp64 so long positions stay exact
        return torch.cat([angles.sin(), angles[..., : dim - half].cos()], dim=-1).float()


@POSITIONS.register("rope")
class RopePositions(PositionScheme):
    """Rotary embeddings applied to q and k in every layer."""

    rotates = True

    def __init__(self, head_dim: int, rope, max_seq_len: int, **_: object):
        super().__init__()
        self.rotary = RotaryEmbedding(head_dim, rope, rope.original_max_seq_len or max_seq_len)

    def rotation(self, position_ids: torch.Tensor, start: int | None = None) -> Rotation:
        return self.rotary(position_ids, start)


def alibi_slopes(n_heads: int) -> torch.Tensor:
    """Press et al. 2022: geometric slopes 2^(-8/n), 2^(-16/n), ...; for a head count that is not a power of two,
    the slopes of the nearest lower power of two followed by every other slope of the next power of two. [H]"""

    def power_of_two(n: int) -> list[float]:
        start = 2.0 ** (-(2.0 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]

    if math.log2(n_heads).is_integer():
        return torch.tensor(power_of_two(n_heads))
    closest = 2 ** math.floor(math.log2(n_heads))
    extra = power_of_two(2 * closest)[0::2][: n_heads - closest]
    return torch.tensor(power_of_two(closest) + extra)


@POSITIONS.register("alibi")
class AlibiPositions(PositionScheme):
    """Attention with linear biases: score(i, j) -= slope_h * |i - j| (BLOOM, MPT)."""

    def __init__(self, n_heads: int, **_: object):
        super().__init__()
        self.register_buffer("slopes", alibi_slopes(n_heads), persistent=False)

    def score_bias(self, q_idx: torch.Tensor, k_idx: torch.Tensor) -> torch.Tensor:
        dist = (q_idx[:, None] - k_idx[None, :]).abs().float()  # [T, S]
        return -(self.slopes[:, None, None] * dist)[None]  # [1, H, T, S]


def build_positions(kind: str, *, d_model: int, n_heads: int, head_dim: int, max_seq_len: int, rope,
                    **extra: object) -> nn.Module:
    """Instantiate a registry entry with the sizes it needs (``extra``: scheme-specific settings such as the
    relative-bias buckets and whether the stack is causal)."""
    return POSITIONS[kind](d_model=d_model, n_heads=n_heads, head_dim=head_dim, max_seq_len=max_seq_len, rope=rope,
                           **extra)


def relative_buckets(rel: torch.Tensor, bidirectional: bool, n_buckets: int, max_distance: int) -> torch.Tensor:
    """Raffel et al. 2020 (T5): bucket of each relative distance ``rel = key - query``. Half the buckets (per
    direction) hold exact small distances, the rest grow logarithmically up to ``max_distance``; farther distances
    share the last bucket. A causal stack only sees keys at or before the query, so it spends every bucket on that
    side. [T, S] long -> [T, S] long in [0, n_buckets)."""
    if bidirectional:
        n_buckets //= 2
        side = (rel > 0).long() * n_buckets
        dist = rel.abs()
    else:
        side = torch.zeros_like(rel)
        dist = (-rel).clamp(min=0)
    exact = n_buckets // 2
    # float32 with this operation order, so distances on a bucket edge round as the reference does
    far = exact + (torch.log(dist.clamp(min=1).float() / exact) / math.log(max_distance / exact)
                   * (n_buckets - exact)).long()
    far = far.clamp(max=n_buckets - 1)
    return side + torch.where(dist < exact, dist, far)


@POSITIONS.register("relative")
class RelativeBias(PositionScheme):
    """T5's learned relative position bias (Raffel et al. 2020): one scalar per (bucket, head) added to the scores
    of every layer of the stack; bidirectional buckets in an encoder, causal ones in a decoder. ``weight`` [R, H]
    with R = buckets."""

    def __init__(self, n_heads: int, rel_buckets: int = 32, rel_max_distance: int = 128, causal: bool = False,
                 **_: object):
        super().__init__()
        self.rel_buckets, self.rel_max_distance, self.causal = rel_buckets, rel_max_distance, causal
        self.weight = nn.Parameter(torch.zeros(rel_buckets, n_heads))

    def score_bias(self, q_idx: torch.Tensor, k_idx: torch.Tensor) -> torch.Tensor:
        rel = k_idx[None, :] - q_idx[:, None]  # [T, S]
        buckets = relative_buckets(rel, not self.causal, self.rel_buckets, self.rel_max_distance)
        return nn.functional.embedding(buckets, self.weight).permute(2, 0, 1)[None]  # [1, H, T, S]
