"""Weight layout for decoding: one token at a time, every linear layer is a matrix-vector product that streams
its whole weight from memory, and how fast it streams depends on the layout.

With torch's CPU BLAS, ``x [1, in] @ W^T`` for a row-major ``W [out, in]`` (nn.Linear's layout) runs as per-row
dot products and streams about half as fast as the same product over a column-major copy of ``W`` when
``out >= in`` (measured in ``benchmarks/decoder.py``; e.g. the 8192 x 512 and 50257 x 768 LM heads). Storing
those weights column-major changes no value, only strides, so parameters, state dicts and checkpoints stay as
they were (savers call ``.contiguous()``).

Where oneDNN is present, decoding also packs the fp32 and bf16 linear weights and expert banks
(:func:`pack_weights`, ``llmarch.nn.dense.pack``): a second, blocked copy that oneDNN's products stream faster
at every row count measured (1, 8 and 128 rows). The copy is made once and reused while the weight is
unchanged; it costs its bytes in memory, so it is skipped when they exceed half the available memory, and
:func:`unpack_weights` frees it. Packing itself runs at only 1-5 GB/s (on an AVX2 host GPT-2-124M took ~0.65 s,
the LLaMA-style benchmark model ~0.09 s), and what it saves is per token: there, with the native decode layers
that need the copies (``llmarch.nn.fused_decode``), 19.5 and 9 ms per batch-1 token, repaid after ~35 and ~10
tokens. So :func:`prepare_for_decoding` packs only what will pay back: a call that generates at least
``PACK_MIN_TOKENS`` tokens (rows x new tokens), or any call on weights unchanged since the previous one (a chat,
an evaluation, a benchmark), never a train-then-sample loop's short generations.
"""
from __future__ import annotations

import os
import weakref

import torch
from torch import nn

from llmarch import native
from llmarch.nn import dense

PACK_MIN_TOKENS = 64  # rows x new tokens from which one call repays its packing (see the module)
_SEEN: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()  # weights at the last call


def wants_column_major(weight: torch.Tensor) -> bool:
    """A [out, in] CPU weight with out >= in that is still row-major (the speed-up was measured with the CPU BLAS
    only; other devices keep nn.Linear's layout until measured there)."""
    return (weight.device.type == "cpu" and weight.dim() == 2 and weight.shape[0] >= weight.shape[1] > 1
            and weight.is_contiguous())


@torch.no_grad()
def decode_layout(model: nn.Module) -> int:
    """Re-store every wide (out >= in) nn.Linear weight of ``model`` column-major, in place; values unchanged
    (weights with a current packed copy are left as they are: their products read the copy). Returns how many
    weights were re-laid. Idempotent."""
    n = 0
    for m in model.modules():
        if isinstance(m, nn.Linear) and wants_column_major(m.weight) and dense.packed(m.weight) is None:
            m.weight.data = m.weight.data.t().contiguous().t()  # same [out, in] values, strides (1, out)
            n += 1
    return n


def _free_bytes() -> int | None:
    """Memory available for new allocations in bytes (Linux's MemAvailable, which counts reclaimable page cache;
    else the free physical pages; None where the platform says neither)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _packable(model: nn.Module) -> list[torch.Tensor]:
    """The weights to pack: every nn.Linear's and every expert bank's matrices (each once)."""
    weights = {}
    for m in model.modules():
        mats = [m.weight] if isinstance(m, nn.Linear) else (
            list(m.parameters(recurse=False)) if getattr(m, "packs_for_inference", False) else [])
        weights.update({id(w): w for w in mats if dense.packable(w)})
    return list(weights.values())


@torch.no_grad()
def pack_weights(model: nn.Module) -> int:
    """Pack every CPU nn.Linear weight and expert bank (fp32, bf16) of ``model`` for inference
    (``llmarch.nn.dense.pack``; a tied head is packed once). Only the weights without a current packed copy are
    packed, and none when their bytes exceed half the available memory. Returns how many were packed now."""
    todo = [w for w in _packable(model) if dense.packed(w) is None]
    free = _free_bytes()
    if not todo or (free is not None and 2 * sum(w.numel() * w.element_size() for w in todo) > free):
        return 0
    return sum(dense.pack(w) for w in todo)


def unpack_weights(model: nn.Module) -> None:
    """Free the packed copies :func:`pack_weights` made for ``model``."""
    for w in _packable(model):
        dense.unpack(w)


def _signature(model: nn.Module) -> tuple:
    return tuple((id(w), w.data_ptr(), native.version(w)) for w in _packable(model))


def prepare_for_decoding(model: nn.Module, tokens: int) -> None:
    """What ``generate`` does to the weights before decoding ``tokens`` (rows x new tokens): pack them when that
    pays back (``tokens >= PACK_MIN_TOKENS``, or the weights are unchanged since the previous call), then the
    column-major layout for the weights left unpacked."""
    if tokens >= PACK_MIN_TOKENS or _SEEN.get(model) == _signature(model):
        pack_weights(model)
    decode_layout(model)
    _SEEN[model] = _signature(model)
