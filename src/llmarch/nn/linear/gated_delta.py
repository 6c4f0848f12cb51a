"""The gated delta rule mixer (Yang et al. 2024, "Gated Delta Networks"; Qwen3-Next's GatedDeltaNet): fused input
projections, a short causal convolution, L2-normalised q/k, the decay and write gates, the delta rule (three forms,
:mod:`llmarch.nn.linear.delta_rule`), an RMSNorm gated by z, and the output projection."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from llmarch.nn.cache import StateCache
from llmarch.nn.linear import delta_rule
from llmarch.nn.linear.conv import ShortConv


class GatedRMSNorm(nn.Module):
    """RMSNorm of each head's output, then times silu(z) (the output gate). x, z [..., Dv] -> [..., Dv]; the
    statistics and the gate in fp32, the gain applied in x's dtype."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.dim, self.eps = dim, eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        h = self.weight * h.to(dtype)
        return (h * F.silu(z.float())).to(dtype)


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x / sqrt(|x|² + eps) over the last dim."""
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)


class GatedDeltaNet(nn.Module):
    """x [B, T, D] -> [B, T, D]. Heads: Hk q/k heads of Dk, Hv v heads of Dv (Hv a multiple of Hk; v head j reads
    q/k head j // (Hv / Hk)). State per layer: conv [B, C, K-1] and the delta-rule state [B, Hv, Dk, Dv] in a
    :class:`~llmarch.nn.cache.StateCache`.

    Parameters: ``qkvz`` [D -> 2·Hk·Dk + 2·Hv·Dv] laid out [q | k | v | z]; ``ba`` [D -> 2·Hv] laid out [b | a]
    (beta = sigmoid(b), decay g = -exp(A_log)·softplus(a + dt_bias)); ``conv`` over [q | k | v]; ``norm`` (gated
    RMSNorm over Dv); ``out`` [Hv·Dv -> D]. Padding slots (``ctx.key_padding``) are zeroed at the input and leave
    the state untouched (g = 0, k = 0 there)."""

    def __init__(self, d_model: int, n_k_heads: int, n_v_heads: int, k_head_dim: int, v_head_dim: int, *,
                 conv_kernel: int, layer_idx: int, chunk_size: int = 64, eps: float = 1e-6):
        super().__init__()
        if n_v_heads % n_k_heads:
            raise ValueError(f"linear.n_v_heads: must be a multiple of n_k_heads ({n_v_heads} % {n_k_heads} != 0)")
        self.d_model, self.n_k_heads, self.n_v_heads = d_model, n_k_heads, n_v_heads
        self.k_head_dim, self.v_head_dim, self.conv_kernel = k_head_dim, v_head_dim, conv_kernel
        self.layer_idx, self.chunk_size, self.eps = layer_idx, chunk_size, eps
        key, value = n_k_heads * k_head_dim, n_v_heads * v_head_dim
        self.qkvz = nn.Linear(d_model, 2 * key + 2 * value, bias=False)
        self.ba = nn.Linear(d_model, 2 * n_v_heads, bias=False)
        self.conv = ShortConv(2 * key + value, conv_kernel)
        self.dt_bias = nn.Parameter(torch.ones(n_v_heads))
        self.A_log = nn.Parameter(torch.zeros(n_v_heads))
        self.norm = GatedRMSNorm(v_head_dim, eps=eps)
        self.out = nn.Linear(value, d_model, bias=False)

    def after_init(self) -> None:
        """Decay rates A spread over [1, 16] across heads (slow to fast forgetting), dt_bias 1, conv like nn.Conv1d."""
        self.A_log.copy_(torch.linspace(1.0, 16.0, self.n_v_heads).log())
        self.dt_bias.fill_(1.0)
        nn.init.kaiming_uniform_(self.conv.weight, a=math.sqrt(5))

    def forward(self, x: torch.Tensor, ctx, cache: StateCache | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        Hk, Hv, Dk, Dv = self.n_k_heads, self.n_v_heads, self.k_head_dim, self.v_head_dim
        real = None if ctx.key_padding is None else ctx.key_padding[:, -T:]  # [B, T] bool, True = real token
        if real is not None:
            x = x * real[..., None].to(x.dtype)
        q, k, v, z = self.qkvz(x).split([Hk * Dk, Hk * Dk, Hv * Dv, Hv * Dv], dim=-1)
        b, a = self.ba(x).split([Hv, Hv], dim=-1)  # [B, T, Hv]
        conv_state = cache.conv.get(self.layer_idx) if cache is not None else None
        qkv, conv_state = self.conv(torch.cat([q, k, v], dim=-1).transpose(1, 2), conv_state)  # [B, C, T]
        q, k, v = qkv.transpose(1, 2).split([Hk * Dk, Hk * Dk, Hv * Dv], dim=-1)
        r = Hv // Hk
        q, k = (l2norm(t.float().view(B, T, Hk, Dk).repeat_interleave(r, dim=2).transpose(1, 2), self.eps)
                for t in (q, k))  # [B, Hv, T, Dk]
        q = q * Dk ** -0.5
        v = v.float().view(B, T, Hv, Dv).transpose(1, 2)  # [B, Hv, T, Dv]
        beta = torch.sigmoid(b.float()).transpose(1, 2)  # [B, Hv, T]
        g = (-self.A_log.float().exp() * F.softplus(a.float() + self.dt_bias.float())).transpose(1, 2)
        if real is not None:
            g = g * real[:, None, :].to(g.dtype)  # a padding slot neither decays nor writes the state
        state = cache.state.get(self.layer_idx) if cache is not None else None
        o, state = self.rule(q, k, v, g, beta, state, T)
        if cache is not None:
            cache.conv[self.layer_idx], cache.state[self.layer_idx] = conv_state, state
        o = o.transpose(1, 2).to(x.dtype)  # [B, T, Hv, Dv]
        o = self.norm(o, z.view(B, T, Hv, Dv))
        return self.out(o.reshape(B, T, Hv * Dv))

    def rule(self, q, k, v, g, beta, state, T: int):
        """The recurrent form for single-token steps on a state, the chunked form otherwise."""
        if T == 1 and state is not None:
            return delta_rule.recurrent(q, k, v, g, beta, state)
        return delta_rule.chunked(q, k, v, g, beta, state, chunk_size=self.chunk_size)
