"""Position-wise feed-forward networks: the two-matrix MLP (Vaswani et al. 2017) and gated GLU variants
(Shazeer 2020: SwiGLU with silu, GeGLU with gelu, ReGLU with relu), or none (a mixer-only block, Mamba-2)."""
from __future__ import annotations

import torch
from torch import nn

from llmarch.nn.activation import gate_product, make_activation
from llmarch.nn.dense import Linear
from llmarch.registry import Registry

FFNS: Registry[type[nn.Module]] = Registry("ffn")


@FFNS.register("mlp")
class MLP(nn.Module):
    """down(act(up(x))). [B, T, D] -> [B, T, D] via [B, T, F]."""

    def __init__(self, d_model: int, d_ff: int, activation: str, bias: bool = False, dropout: float = 0.0):
        super().__init__()
        self.activation = activation
        self.act = make_activation(activation)
        self.up = Linear(d_model, d_ff, bias=bias)
        self.down = Linear(d_ff, d_model, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.down(self.act(self.up(x))))


@FFNS.register("glu")
class GLU(nn.Module):
    """down(act(gate(x)) * up(x)), with gate and up fused in one [2F, D] matrix (one GEMM instead of two).

    [B, T, D] -> [B, T, D] via [B, T, 2F]; ``gate_up.weight`` rows [0, F) are the gate, [F, 2F) the up projection.
    """

    def __init__(self, d_model: int, d_ff: int, activation: str, bias: bool = False, dropout: float = 0.0):
        super().__init__()
        self.d_ff = d_ff
        self.activation = activation
        self.act = make_activation(activation)
        self.gate_up = Linear(d_model, 2 * d_ff, bias=bias)
        self.down = Linear(d_ff, d_model, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.down(gate_product(self.act, self.gate_up(x))))  # via [B, T, 2F] -> [B, T, F]


@FFNS.register("none")
class NoFFN(nn.Module):
    """No feed-forward sub-layer (Mamba-2 blocks are the mixer alone): no parameters, and ``has_norm = False``
    tells the builder to put no norm before it. [B, T, D] -> a zero that adds nothing to the residual."""

    has_norm = False

    def __init__(self, d_model: int, d_ff: int, activation: str, bias: bool = False, dropout: float = 0.0):
        super().__init__()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(())
