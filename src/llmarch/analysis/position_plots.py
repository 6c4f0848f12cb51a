"""Pictures of position schemes, computed with the model's own components: RoPE's rotation frequencies and the
long-term decay of the rotated inner product (Su et al. 2021, §3.4.3), and ALiBi's per-head slopes and biases
(Press et al. 2022)."""
from __future__ import annotations

import math

import torch
from matplotlib.figure import Figure

from llmarch.config import RopeConfig
from llmarch.nn.position import AlibiPositions
from llmarch.nn.rope import RotaryEmbedding


def rope_frequencies(head_dim: int, rope: RopeConfig, max_seq_len: int) -> torch.Tensor:
    """The inverse frequencies theta_i the model uses (scalings applied). [rot_dim/2]"""
    return RotaryEmbedding(head_dim, rope, rope.original_max_seq_len or max_seq_len).inv_freq


def rope_inner_product(head_dim: int, rope: RopeConfig, max_seq_len: int, distances: torch.Tensor) -> torch.Tensor:
    """<R(m) q, R(0) k> / <q, k> for q = k = all ones, through the model's own Rotation: mean_i cos(m·theta_i).
    distances [M] -> [M]"""
    rot = RotaryEmbedding(head_dim, rope, rope.original_max_seq_len or max_seq_len)
    pos = torch.cat([torch.zeros(1), distances.float()]).long()[None]  # [1, 1 + M]
    r = rot(pos)
    ones = torch.ones(1, 1, pos.shape[1], rot.rot_dim)
    q, k = r.apply(ones, ones)  # [1, 1, 1 + M, R]
    scale2 = rot.scale ** 2
    return (q[0, 0, 1:] * k[0, 0, :1]).sum(-1) / (rot.rot_dim * scale2)


def rope_decay_bound(inv_freq: torch.Tensor, distances: torch.Tensor) -> torch.Tensor:
    """RoFormer's bound on the relative-position inner product: (2/d) Σ_j |Σ_{k<j} e^{i m theta_k}|. [M]"""
    phases = distances.double()[:, None] * inv_freq.double()[None, :]  # [M, d/2]
    partial = torch.complex(phases.cos(), phases.sin()).cumsum(-1).abs()  # |S_j|, j = 1..d/2
    return (partial.mean(-1)).float()


def rope_figure(head_dim: int, rope: RopeConfig, max_seq_len: int, title: str = "", max_distance: int = 0) -> Figure:
    M = max_distance or max(4096, max_seq_len)
    inv = rope_frequencies(head_dim, rope, max_seq_len)
    fig = Figure(figsize=(12, 4.2))
    ax1, ax2, ax3 = fig.subplots(1, 3)
    i = torch.arange(inv.numel())
    ax1.semilogy(i, (2 * math.pi / inv).numpy(), label="this config")
    if rope.scaling != "none":
        base = rope_frequencies(head_dim, RopeConfig(theta=rope.theta, fraction=rope.fraction), max_seq_len)
        ax1.semilogy(i, (2 * math.pi / base).numpy(), "--", label="unscaled")
    ax1.axhline(max_seq_len, color="grey", lw=0.8, ls=":", label=f"context {max_seq_len}")
    ax1.set_xlabel("rotation pair i")
    ax1.set_ylabel("wavelength 2π/θ_i (tokens)")
    ax1.set_title("rotation frequencies")
    ax1.legend(fontsize=8)
    d = torch.unique(torch.logspace(0, math.log10(M), 400).round().long())
    ax2.semilogx(d.numpy(), rope_decay_bound(inv, d).numpy())
    ax2.set_xlabel("relative distance m")
    ax2.set_ylabel("(2/d) Σ_j |S_j|")
    ax2.set_title("long-term decay bound (RoFormer §3.4.3)")
    near = torch.arange(0, min(M, 512))
    ax3.plot(near.numpy(), rope_inner_product(head_dim, rope, max_seq_len, near).numpy())
    ax3.set_xlabel("relative distance m")
    ax3.set_ylabel("<R(m)q, k> / <q, k>, q = k = 1")
    ax3.set_title("rotated inner product")
    fig.suptitle(title or f"RoPE: Dh={head_dim}, theta={rope.theta:g}, scaling={rope.scaling}")
    fig.tight_layout()
    return fig


def alibi_bias(n_heads: int, n: int) -> torch.Tensor:
    """The ALiBi score bias for n causal positions, from the model's own component. [H, n, n]"""
    idx = torch.arange(n)
    bias = AlibiPositions(n_heads).score_bias(idx, idx)[0]  # [H, n, n]
    return bias.masked_fill(idx[None, :] > idx[:, None], float("nan"))  # future keys are masked anyway


def alibi_figure(n_heads: int, n: int = 32, title: str = "") -> Figure:
    bias = alibi_bias(n_heads, n)
    slopes = AlibiPositions(n_heads).slopes
    fig = Figure(figsize=(12, 4))
    ax0, ax1, ax2 = fig.subplots(1, 3)
    # points, not a line: a head count that is not a power of 2 interleaves two geometric series
    ax0.semilogy(torch.arange(1, n_heads + 1).numpy(), slopes.numpy(), "o", ms=3)
    ax0.set_xlabel("head")
    ax0.set_ylabel("slope m_h")
    ax0.set_title("per-head slopes")
    for ax, h in ((ax1, 0), (ax2, n_heads - 1)):
        im = ax.imshow(bias[h].numpy(), cmap="viridis", interpolation="nearest")
        ax.set_title(f"head {h + 1}: bias = -{slopes[h]:.3g}·(i - j)")
        ax.set_xlabel("key j")
        ax.set_ylabel("query i")
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.suptitle(title or f"ALiBi, {n_heads} heads")
    fig.tight_layout()
    return fig
