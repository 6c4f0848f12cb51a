"""Weight layout for decoding: one token at a time, every linear layer is a matrix-vector product that streams
its whole weight from memory, and how fast it streams depends on the layout.

With torch's CPU BLAS, ``x [1, in] @ W^T`` for a row-major ``W [out, in]`` (nn.Linear's layout) runs as per-row
dot products and streams about half as fast as the same product over a column-major copy of ``W`` when
``out >= in`` (measured in ``benchmarks/decoder.py``; e.g. the 8192 x 512 and 50257 x 768 LM heads). Storing
those weights column-major changes no value, only strides, so parameters, state dicts and checkpoints stay as
they were (savers call ``.contiguous()``).
"""
from __future__ import annotations

import torch
from torch import nn


def wants_column_major(weight: torch.Tensor) -> bool:
    """A [out, in] CPU weight with out >= in that is still row-major (the speed-up was measured with the CPU BLAS
    only; other devices keep nn.Linear's layout until measured there)."""
    return (weight.device.type == "cpu" and weight.dim() == 2 and weight.shape[0] >= weight.shape[1] > 1
            and weight.is_contiguous())


@torch.no_grad()
def decode_layout(model: nn.Module) -> int:
    """Re-store every wide (out >= in) nn.Linear weight of ``model`` column-major, in place; values unchanged.
    Returns how many weights were re-laid. Idempotent."""
    n = 0
    for m in model.modules():
        if isinstance(m, nn.Linear) and wants_column_major(m.weight):
            m.weight.data = m.weight.data.t().contiguous().t()  # same [out, in] values, strides (1, out)
            n += 1
    return n
