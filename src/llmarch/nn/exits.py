"""Learned early exits (seed 002's AdaptiveLLM): a classifier per decoder layer (but the last) reads that layer's
output and says how confident an exit there would be; intermediate predictions go through the model's own final
norm and LM head. Trained with intermediate losses (objective ``causal_lm_exits``); used at inference by the
``learned`` exit criterion of :mod:`llmarch.infer.early_exit`."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn


class ExitGates(nn.Module):
    """One Linear(D, 1) per exit layer: h [B, T, D] of layer i -> exit confidence sigmoid(gate_i(h)) [B, T]."""

    def __init__(self, d_model: int, n_exits: int):
        super().__init__()
        self.gates = nn.ModuleList(nn.Linear(d_model, 1) for _ in range(n_exits))

    def forward(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.gates[layer](h).squeeze(-1).float())


@contextmanager
def record_layer_outputs(stack: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Yields a list that collects each block's output [B, T, D] of ``stack.layers`` during forwards inside."""
    states: list[torch.Tensor] = []
    handles = [layer.register_forward_hook(lambda _m, _i, out: states.append(out)) for layer in stack.layers]
    try:
        yield states
    finally:
        for h in handles:
            h.remove()
