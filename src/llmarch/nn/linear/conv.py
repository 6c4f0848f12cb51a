"""The short causal depthwise convolution in front of linear-time mixers (H3, Fu et al. 2023; Mamba; gated delta
networks), with its decoding state: the last K-1 inputs."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ShortConv(nn.Module):
    """Depthwise causal conv over time, kernel K, no bias, then SiLU. x [B, C, T] (+ state [B, C, K-1]) ->
    (y [B, C, T], new state [B, C, K-1]). A zero state is the zero left-padding of a fresh sequence, so a prefill
    and a token-by-token decode agree; ``weight`` [C, 1, K] is laid out like nn.Conv1d's."""

    def __init__(self, channels: int, kernel: int):
        super().__init__()
        self.channels, self.kernel = channels, kernel
        self.weight = nn.Parameter(torch.empty(channels, 1, kernel))

    def forward(self, x: torch.Tensor, state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        B, C, T = x.shape
        if state is None:
            state = x.new_zeros(B, C, self.kernel - 1)
        full = torch.cat([state.to(x.dtype), x], dim=-1)  # [B, C, K-1+T]
        y = F.conv1d(full.to(self.weight.dtype), self.weight, groups=C)  # [B, C, T]
        return F.silu(y).to(x.dtype), full[:, :, full.shape[-1] - (self.kernel - 1):]
