"""int8 expert banks: what ``quantize(model, "int8")`` makes of a mixture of experts' routed experts, which hold
most of an MoE model's weights (a Mixtral-style model's experts are ~90 % of its bytes).

Each expert's two matrices become :class:`~llmarch.infer.quantize.Int8Linear` (per output channel, symmetric), so
an expert's product runs where an int8 projection runs: the native kernel for few rows (decoding), oneDNN's bf16
matmul or the native kernel for more. The bank keeps the protocol of :mod:`llmarch.nn.experts` (``one``,
``batched``, ``grouped``, ``sliced``), so every dispatcher runs it; ``auto`` takes ``sliced`` (one product per
expert that has rows). The native decode layer (:mod:`llmarch.nn.fused_moe`) reads the experts' int8 copies.
"""
from __future__ import annotations

import torch
from torch import nn

from llmarch.nn.activation import gate_product, make_activation
from llmarch.nn.experts import GLUExperts, MLPExperts


class Int8Experts(nn.Module):
    """E experts of a GLU (``gated``: ``up[e]`` gives [gate | up], 2F outputs) or MLP bank, int8. ``up[e]``:
    [D] -> [2F or F]; ``down[e]``: [F] -> [D]."""

    def __init__(self, n_experts: int, d_model: int, d_ff: int, activation: str, gated: bool):
        from llmarch.infer.quantize import Int8Linear

        super().__init__()
        self.n_experts, self.d_model, self.d_ff, self.activation, self.gated = (n_experts, d_model, d_ff, activation,
                                                                                gated)
        self.act = make_activation(activation)
        self.up = nn.ModuleList(Int8Linear(d_model, 2 * d_ff if gated else d_ff) for _ in range(n_experts))
        self.down = nn.ModuleList(Int8Linear(d_ff, d_model) for _ in range(n_experts))

    @classmethod
    def from_bank(cls, bank: nn.Module) -> "Int8Experts":
        """The int8 form of a :class:`~llmarch.nn.experts.GLUExperts` or :class:`~llmarch.nn.experts.MLPExperts`."""
        from llmarch.infer.quantize import Int8Linear

        gated = type(bank) is GLUExperts
        up = bank.gate_up if gated else bank.up
        m = cls(bank.n_experts, bank.d_model, bank.d_ff, bank.activation, gated).to(up.device)
        for e in range(bank.n_experts):  # the bank stores [in, out]; Int8Linear [out, in]
            m.up[e] = Int8Linear.from_weight(up[e].t())
            m.down[e] = Int8Linear.from_weight(bank.down[e].t())
        return m

    def _mid(self, h: torch.Tensor) -> torch.Tensor:
        return gate_product(self.act, h) if self.gated else self.act(h)

    def one(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e on x [n, D] -> [n, D]."""
        return self.down[e](self._mid(self.up[e](x)))

    def sliced(self, x: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """x [A, D] sorted by expert, counts[e] rows each -> [A, D]."""
        return torch.cat([self.one(e, xe) for e, xe in enumerate(x.split(counts)) if counts[e]])

    def batched(self, x: torch.Tensor) -> torch.Tensor:
        """x [E, C, D] -> [E, C, D]."""
        return torch.stack([self.one(e, x[e]) for e in range(self.n_experts)])

    def grouped(self, x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """x [A, D] sorted by expert; offsets [E] cumulative group ends -> [A, D]."""
        ends = offsets.tolist()
        return self.sliced(x, [b - a for a, b in zip([0] + ends[:-1], ends)])

    def packed_ready(self, x: torch.Tensor) -> bool:
        """``auto`` dispatch runs ``sliced`` (an int8 product per expert with rows) at every size."""
        return True


def quantize_banks(model: nn.Module, skip: tuple[str, ...] = ()) -> int:
    """Replace every plain GLU or MLP expert bank of ``model`` (except names in ``skip``) by its
    :class:`Int8Experts`, in place (a LoRA-adapted bank is a subclass and stays). Returns how many."""
    banks = [(name, m) for name, m in model.named_modules() if type(m) in (GLUExperts, MLPExperts) and name not in skip]
    for name, bank in banks:
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, Int8Experts.from_bank(bank))
    return len(banks)
