"""Activation functions by config name (the eager functions are the spec). An entry is a function, or an
``nn.Module`` class for an activation with trainable parameters; :func:`make_activation` gives a callable either way."""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from torch import nn

from llmarch.registry import Registry

ACTIVATIONS: Registry[Callable[[torch.Tensor], torch.Tensor] | type[nn.Module]] = Registry("activation")


def make_activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The activation ``name`` as a callable: the registered function, or a fresh module (own parameters)."""
    entry = ACTIVATIONS[name]
    return entry() if isinstance(entry, type) and issubclass(entry, nn.Module) else entry

ACTIVATIONS.add("relu", F.relu)
ACTIVATIONS.add("gelu", F.gelu)  # exact erf form (BERT, T5 v1.1 "gelu")
ACTIVATIONS.add("gelu_tanh", lambda x: F.gelu(x, approximate="tanh"))  # GPT-2 "gelu_new", BLOOM
ACTIVATIONS.add("silu", F.silu)  # swish with beta = 1 (LLaMA's SwiGLU); quick_gelu is swish with beta = 1.702
ACTIVATIONS.add("sigmoid", torch.sigmoid)  # GLU (Dauphin et al. 2017)
ACTIVATIONS.add("tanh", torch.tanh)


@ACTIVATIONS.register("quick_gelu")
def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """x * sigmoid(1.702 x) (used by some GPT-style checkpoints)."""
    return x * torch.sigmoid(1.702 * x)


@ACTIVATIONS.register("swish_learned")
class LearnedSwish(nn.Module):
    """x * sigmoid(beta x) with a trainable scalar beta, starting at 1 (= silu) (Ramachandran et al. 2017)."""

    n_params = 1

    def __init__(self):
        super().__init__()
        self.beta = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.beta.to(x.dtype) * x)


@ACTIVATIONS.register("relu2")
def relu_squared(x: torch.Tensor) -> torch.Tensor:
    """Squared ReLU (So et al. 2021, Primer)."""
    return F.relu(x).square()


def gelu_tanh_reference(x: torch.Tensor) -> torch.Tensor:
    """The tanh approximation of GELU written out (tests hold the registry entry to it)."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def _silu_gate(h: torch.Tensor) -> torch.Tensor:
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate) * up


class _SiluGate(torch.autograd.Function):
    """silu(h[..., :F]) * h[..., F:] whose backward writes both halves of one [..., 2F] gradient in place, where
    chunk + silu + mul would concatenate two [..., F] gradients; the same ops, so the same values bit for bit.
    Saves only h (silu(gate) is recomputed in the backward)."""

    @staticmethod
    def forward(ctx, h: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(h)
        return _silu_gate(h)

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:
        (h,) = ctx.saved_tensors
        gate, up = h.chunk(2, dim=-1)
        dh = torch.empty_like(h, memory_format=torch.contiguous_format)
        d_gate, d_up = dh.chunk(2, dim=-1)
        torch.mul(g, F.silu(gate), out=d_up)
        torch.ops.aten.silu_backward.grad_input(g * up, gate, grad_input=d_gate)
        return dh


def gate_product(act: Callable[[torch.Tensor], torch.Tensor], h: torch.Tensor) -> torch.Tensor:
    """act(gate) * up for a fused projection h [..., 2F] (gate = the first F columns) -> [..., F]. SiLU (SwiGLU)
    on plain tensors in eager mode goes through :class:`_SiluGate`; other activations, tensor subclasses and
    compiled regions (the compiler fuses the plain form itself) chunk and multiply."""
    if act is F.silu and type(h) is torch.Tensor and not torch.compiler.is_compiling():
        # without autograd (decoding) the same ops run directly: Function.apply costs a per-call overhead
        return _SiluGate.apply(h) if torch.is_grad_enabled() else _silu_gate(h)
    gate, up = h.chunk(2, dim=-1)
    return act(gate) * up
