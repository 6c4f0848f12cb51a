"""How a condition vector c [B, D] enters a decoder (the ``condition.fusion`` value): each fusion may change the
stack's input x [B, T, D] (``inputs``) and the final hidden states h [B, T, D] (``outputs``); the other is the
identity. Every fusion starts as the unconditioned model or as a plain addition of c.

- ``add``: x + c at every input position;
- ``adanorm``: h * (1 + s) + b with (s, b) = Linear(c), zero at init (FiLM, Perez et al. 2018; adaLN-Zero,
  Peebles & Xie 2023);
- ``fusion_layer``: Linear([x; c]) back to D, initialised to [I | 0] so it starts as the unconditioned model.
"""
from __future__ import annotations

import torch
from torch import nn

from llmarch.registry import Registry

CONDITION_FUSIONS: Registry[type["ConditionFusion"]] = Registry("condition.fusion")


class ConditionFusion(nn.Module):
    """Identity on both sides; entries override one."""

    def __init__(self, d_model: int):
        super().__init__()

    def inputs(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return x

    def outputs(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return h


@CONDITION_FUSIONS.register("add")
class AddCondition(ConditionFusion):
    """x [B, T, D] + c [B, D] at every position."""

    def inputs(self, x, c):
        return x + c[:, None].to(x.dtype)


@CONDITION_FUSIONS.register("adanorm")
class AdaNormCondition(ConditionFusion):
    """h * (1 + scale) + shift, (scale, shift) = ``modulation``(c) [B, 1, D] each; zero-initialised."""

    def __init__(self, d_model: int):
        super().__init__(d_model)
        self.modulation = nn.Linear(d_model, 2 * d_model)

    def after_init(self) -> None:
        nn.init.zeros_(self.modulation.weight)
        nn.init.zeros_(self.modulation.bias)

    def outputs(self, h, c):
        scale, shift = self.modulation(c)[:, None].chunk(2, dim=-1)
        return h * (1 + scale) + shift


@CONDITION_FUSIONS.register("fusion_layer")
class FusionLayerCondition(ConditionFusion):
    """``proj``([x; c]) : [B, T, 2D] -> [B, T, D]; weight [I | 0] and bias 0 at init (the identity on x)."""

    def __init__(self, d_model: int):
        super().__init__(d_model)
        self.proj = nn.Linear(2 * d_model, d_model)

    def after_init(self) -> None:
        D = self.proj.out_features
        with torch.no_grad():
            self.proj.weight.zero_()
            self.proj.weight[:, :D].copy_(torch.eye(D))
            self.proj.bias.zero_()

    def inputs(self, x, c):
        return self.proj(torch.cat([x, c[:, None].to(x.dtype).expand_as(x)], dim=-1))


__all__ = ["CONDITION_FUSIONS", "AddCondition", "AdaNormCondition", "ConditionFusion", "FusionLayerCondition"]
