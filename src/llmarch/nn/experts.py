"""A bank of E expert FFNs stored as stacked weights ([E, in, out], one tensor per projection), so a dispatcher
can run all experts in one batched or grouped matrix multiply instead of a loop (Shazeer et al. 2017; the
fine-grained experts of DeepSeekMoE, Dai et al. 2024, are the same bank with a small F and a large E).

Each bank offers three equivalent forms, used by the dispatchers in :mod:`llmarch.nn.dispatch`:
``one(e, x)`` for one expert (the readable spec), ``batched(x)`` for a padded [E, C, D] batch, and
``grouped(x, offsets)`` for tokens sorted by expert with ``torch._grouped_mm``.

The [E, in, out] layout (x @ W, not nn.Linear's x @ W^T) is the one batched and grouped matmuls take as is, and
their weight gradients come out in it too; with [E, out, in] every backward pays a transposing copy of the whole
bank. Checkpoints in the nn.Linear layout are transposed per expert by the translators in ``llmarch.hf``.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from llmarch.nn.activation import gate_product, make_activation
from llmarch.nn import banks, dense
from llmarch.nn.ffn import GLU, MLP
from llmarch.registry import Registry

EXPERTS: Registry[type[nn.Module]] = Registry("moe.expert_ffn")


def _uniform(shape: tuple[int, ...], fan_in: int) -> nn.Parameter:
    """A parameter initialised like nn.Linear's weight (uniform in +-1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)
    return nn.Parameter(torch.empty(shape).uniform_(-bound, bound))


class _Bank(nn.Module):
    """What the banks share: their weights' memory layout follows the dtype. On CPU, bf16 products over a weight
    [in, out] stored column-major (each expert's [out, in] contiguous, nn.Linear's order) run 1.15-1.35x faster at
    1-128 tokens than over row-major (docs/performance.md, MoE layer), while fp32 favours row-major below ~32 rows
    per expert. So moving the bank to CPU bf16 re-stores its weights column-major, and back to row-major otherwise:
    same shapes and values, only strides change (state dicts and checkpoints are unaffected).

    Inference may also pack the banks (``llmarch.infer.layout.pack_weights``; ``llmarch.nn.dense.pack``): one
    copy per expert (fp32: the native kernel's blocked layout where it builds, for up to ``MAX_ROWS`` rows; else
    oneDNN's), which ``sliced`` then runs (no gradient needed, copies current). Few-row
    products stream 1.2-2.3x faster from it (fp32; bf16 ~2x, bit-identical), docs/performance.md, MoE layer."""

    packs_for_inference = True

    def _packed(self, x: torch.Tensor) -> list[list[torch.Tensor]] | None:
        # the weights as the bank reads them: an adapted bank (LoRA) returns W + update, which has no packed copy
        return dense.packed_banks(x, *(getattr(self, name) for name, _ in self.named_parameters(recurse=False)))

    def packed_ready(self, x: torch.Tensor) -> bool:
        """Whether ``sliced`` would run these inputs on packed copies of every matrix of the bank."""
        return self._packed(x) is not None

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        with torch.no_grad():
            for p in self.parameters(recurse=False):
                if type(p.data) is not torch.Tensor or p.dim() != 3 or p.device.type == "meta":
                    continue
                column = p.device.type == "cpu" and p.dtype == torch.bfloat16
                if column and p.is_contiguous():
                    p.data = p.data.transpose(1, 2).contiguous().transpose(1, 2)
                elif not column and not p.is_contiguous():
                    p.data = p.data.contiguous()
        return out


@EXPERTS.register("glu")
class GLUExperts(_Bank):
    """E gated FFNs: down_e(act(gate_e(x)) * up_e(x)). ``gate_up`` [E, D, 2F] (columns [0, F) gate, [F, 2F) up,
    as in :class:`llmarch.nn.ffn.GLU`), ``down`` [E, F, D]."""

    dense = GLU

    def __init__(self, n_experts: int, d_model: int, d_ff: int, activation: str):
        super().__init__()
        self.n_experts, self.d_model, self.d_ff, self.activation = n_experts, d_model, d_ff, activation
        self.act = make_activation(activation)
        self.gate_up = _uniform((n_experts, d_model, 2 * d_ff), d_model)
        self.down = _uniform((n_experts, d_ff, d_model), d_ff)

    def _mid(self, h: torch.Tensor) -> torch.Tensor:
        return gate_product(self.act, h)

    def one(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e on x [n, D] -> [n, D]."""
        return self._mid(x @ self.gate_up[e]) @ self.down[e]

    def batched(self, x: torch.Tensor) -> torch.Tensor:
        """x [E, C, D] (row c of expert e is that expert's c-th token) -> [E, C, D]."""
        return torch.bmm(self._mid(torch.bmm(x, self.gate_up)), self.down)  # via [E, C, F]

    def grouped(self, x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """x [A, D] sorted by expert; offsets [E] int32 cumulative group ends -> [A, D]."""
        h = self._mid(torch._grouped_mm(x, self.gate_up, offs=offsets))  # [A, F]
        return torch._grouped_mm(h, self.down, offs=offsets)

    def sliced(self, x: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """x [A, D] sorted by expert, counts[e] rows each -> [A, D], one matmul per non-empty expert
        (``llmarch.nn.banks.bank_linear``: oneDNN for fp32 CPU tensors, backward included)."""
        packs = self._packed(x)
        if packs is not None:
            mm, (gate_up, down) = banks.packed_mm, packs
            return torch.cat([mm(self._mid(mm(xe, gate_up[e], self.gate_up[e])), down[e], self.down[e])
                              for e, xe in enumerate(x.split(counts)) if counts[e]])
        return banks.bank_linear(self._mid(banks.bank_linear(x, self.gate_up, counts)), self.down, counts)

    def load_dense(self, e: int, ffn: GLU) -> None:
        """Copy a dense GLU's weights into expert e (sparse upcycling)."""
        if ffn.gate_up.bias is not None:
            raise ValueError("ffn_bias: experts have no biases; upcycle a dense model with ffn_bias=False")
        with torch.no_grad():  # in place on the parameter (not .data): its version moves, a packed copy goes stale
            self.gate_up[e].copy_(ffn.gate_up.weight.t())
            self.down[e].copy_(ffn.down.weight.t())


@EXPERTS.register("mlp")
class MLPExperts(_Bank):
    """E two-matrix FFNs: down_e(act(up_e(x))). ``up`` [E, D, F], ``down`` [E, F, D]."""

    dense = MLP

    def __init__(self, n_experts: int, d_model: int, d_ff: int, activation: str):
        super().__init__()
        self.n_experts, self.d_model, self.d_ff, self.activation = n_experts, d_model, d_ff, activation
        self.act = make_activation(activation)
        self.up = _uniform((n_experts, d_model, d_ff), d_model)
        self.down = _uniform((n_experts, d_ff, d_model), d_ff)

    def one(self, e: int, x: torch.Tensor) -> torch.Tensor:
        return self.act(x @ self.up[e]) @ self.down[e]

    def batched(self, x: torch.Tensor) -> torch.Tensor:
        return torch.bmm(self.act(torch.bmm(x, self.up)), self.down)

    def grouped(self, x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        h = self.act(torch._grouped_mm(x, self.up, offs=offsets))
        return torch._grouped_mm(h, self.down, offs=offsets)

    def sliced(self, x: torch.Tensor, counts: list[int]) -> torch.Tensor:
        packs = self._packed(x)
        if packs is not None:
            mm, (up, down) = banks.packed_mm, packs
            return torch.cat([mm(self.act(mm(xe, up[e], self.up[e])), down[e], self.down[e])
                              for e, xe in enumerate(x.split(counts)) if counts[e]])
        return banks.bank_linear(self.act(banks.bank_linear(x, self.up, counts)), self.down, counts)

    def load_dense(self, e: int, ffn: MLP) -> None:
        if ffn.up.bias is not None:
            raise ValueError("ffn_bias: experts have no biases; upcycle a dense model with ffn_bias=False")
        with torch.no_grad():
            self.up[e].copy_(ffn.up.weight.t())
            self.down[e].copy_(ffn.down.weight.t())
