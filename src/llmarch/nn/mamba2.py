"""The Mamba-2 mixer (Dao & Gu 2024, "Transformers are SSMs"; transformers' Mamba2Mixer is the reference for the
layout): one input projection to [z | x B C | dt], a short causal depthwise convolution over x B C, SiLU, the SSD
scan with a per-head scalar decay A = -exp(A_log) and step dt = clamp(softplus(dt + dt_bias)), a D skip, a gated
grouped RMSNorm (the gate z applied before the norm) and the output projection. Also the short causal convolution
every recurrent mixer uses, with its cached last K-1 inputs."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from llmarch.nn.ssd import SSD_FORMS


def new_tokens_mask(ctx, T: int) -> torch.Tensor | None:
    """[B, T] bool (True = real token) for the T new tokens of this forward, or None when nothing is padded."""
    return None if ctx.key_padding is None else ctx.key_padding[:, -T:]


def causal_conv(x: torch.Tensor, conv: nn.Conv1d, cache, layer) -> torch.Tensor:
    """Depthwise causal convolution of x [B, T, C] with kernel K, continuing from the cache's last K-1 inputs
    (zeros at the start); stores the new last K-1 inputs. -> [B, T, C] (before any activation)."""
    B, T, C = x.shape
    K = conv.kernel_size[0]
    x = x.transpose(1, 2)  # [B, C, T]
    prev = cache.conv.get(layer) if cache is not None else None
    if prev is None:
        prev = x.new_zeros(B, C, K - 1)
    full = torch.cat([prev.to(x.dtype), x], dim=-1)  # [B, C, K-1+T]
    if cache is not None:
        cache.conv[layer] = full[:, :, full.shape[-1] - (K - 1):]
    return F.conv1d(full, conv.weight, conv.bias, groups=C).transpose(1, 2)


class GatedRMSNorm(nn.Module):
    """RMSNorm of y · silu(z) over groups of ``group_size`` channels, then a gain (transformers'
    MambaRMSNormGated). y, z [..., Di] -> [..., Di]; computed in fp32."""

    def __init__(self, dim: int, group_size: int, eps: float = 1e-6):
        super().__init__()
        self.dim, self.group_size, self.eps = dim, group_size, eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        dtype = y.dtype
        h = y.float() * F.silu(z.float())
        g = h.view(*h.shape[:-1], self.dim // self.group_size, self.group_size)
        g = g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * g.view(h.shape).to(dtype)


class Mamba2Mixer(nn.Module):
    """x [B, T, D] -> [B, T, D]. Inner width Di = expand·D in H heads of Dh; B/C [B, T, G, N] shared by H/G
    heads. ``in_proj`` rows: z [Di] | x [Di] | B [G·N] | C [G·N] | dt [H]. Cache (StateCache): ``conv[layer]``
    [B, Di + 2GN, K-1] and ``state[layer]`` [B, H, Dh, N]. Left padding is skipped: its x, B, C are zeroed
    before and after the convolution and its dt is 0, so it neither decays nor adds to the state."""

    def __init__(self, d_model: int, *, d_state: int, n_groups: int, expand: int, head_dim: int, conv_kernel: int,
                 layer_idx, form: str = "chunked", chunk_size: int = 256, proj_bias: bool = False,
                 conv_bias: bool = True, norm_eps: float = 1e-5,
                 time_step_limit: tuple[float, float] = (0.0, float("inf")),
                 time_step_range: tuple[float, float, float] = (0.001, 0.1, 1e-4)):
        super().__init__()
        self.d_inner = expand * d_model
        self.n_heads, self.head_dim = self.d_inner // head_dim, head_dim
        self.d_state, self.n_groups = d_state, n_groups
        self.layer_idx, self.form, self.chunk_size = layer_idx, form, chunk_size
        self.time_step_limit, self.time_step_range = tuple(time_step_limit), tuple(time_step_range)
        H, Di, GN = self.n_heads, self.d_inner, n_groups * d_state
        self.conv_dim = Di + 2 * GN
        self.in_proj = nn.Linear(d_model, 2 * Di + 2 * GN + H, bias=proj_bias)
        self.conv = nn.Conv1d(self.conv_dim, self.conv_dim, conv_kernel, groups=self.conv_dim, bias=conv_bias)
        self.dt_bias = nn.Parameter(torch.zeros(H))
        self.A_log = nn.Parameter(torch.zeros(H))
        self.D = nn.Parameter(torch.ones(H))
        self.norm = GatedRMSNorm(Di, Di // n_groups, eps=norm_eps)
        self.out = nn.Linear(Di, d_model, bias=proj_bias)

    @torch.no_grad()
    def after_init(self) -> None:
        """S4D-real decays A_h = h (h = 1..H), D = 1, dt_bias = softplus⁻¹(dt) for dt log-uniform in
        [time_step_min, time_step_max] floored at time_step_floor; the convolution as nn.Conv1d initialises it."""
        lo, hi, floor = self.time_step_range
        H = self.n_heads
        self.A_log.copy_(torch.log(torch.arange(1, H + 1, dtype=torch.float32)))
        self.D.fill_(1.0)
        dt = torch.exp(torch.rand(H) * (math.log(hi) - math.log(lo)) + math.log(lo)).clamp(min=floor)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        nn.init.kaiming_uniform_(self.conv.weight, a=math.sqrt(5))

    def forward(self, x: torch.Tensor, ctx, cache=None) -> torch.Tensor:
        Bsz, T, _ = x.shape
        H, Dh, G, N, Di = self.n_heads, self.head_dim, self.n_groups, self.d_state, self.d_inner
        real = new_tokens_mask(ctx, T)  # [B, T] | None
        z, xBC, dt = self.in_proj(x).split([Di, self.conv_dim, H], dim=-1)
        if real is not None:
            xBC = xBC * real[..., None]
        xBC = F.silu(causal_conv(xBC, self.conv, cache, self.layer_idx))
        if real is not None:
            xBC = xBC * real[..., None]
        xs, Bs, Cs = xBC.split([Di, G * N, G * N], dim=-1)
        dt = F.softplus(dt.float() + self.dt_bias.float()).clamp(*self.time_step_limit)  # [B, T, H]
        if real is not None:
            dt = dt * real[..., None]
        xs = xs.reshape(Bsz, T, H, Dh)
        Bs = Bs.reshape(Bsz, T, G, 1, N).expand(Bsz, T, G, H // G, N).reshape(Bsz, T, H, N)
        Cs = Cs.reshape(Bsz, T, G, 1, N).expand(Bsz, T, G, H // G, N).reshape(Bsz, T, H, N)
        state = cache.state.get(self.layer_idx) if cache is not None else None
        form = "recurrent" if cache is not None and T == 1 else self.form  # decoding: the O(1) step
        y, state = SSD_FORMS[form](xs, dt, -torch.exp(self.A_log.float()), Bs, Cs, state, chunk_size=self.chunk_size)
        if cache is not None:
            cache.state[self.layer_idx] = state
        y = y + xs.float() * self.D.float()[:, None]  # [B, T, H, Dh]
        y = self.norm(y.reshape(Bsz, T, Di).to(x.dtype), z)
        return self.out(y)
