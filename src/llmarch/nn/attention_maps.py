"""Attention weights as an output. :func:`record_attentions` swaps every attention module's kernel for the
reference kernel (fp32 softmax, the same mask and bias) that also keeps its weights, runs the caller's forward,
and restores the kernels; ``model(..., output_attentions=True)`` uses it. Kernels that never form the weights
(block-sparse execution) are refused rather than approximated."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from llmarch.nn.kernels import _repeat_kv, attention_probs


def attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every module that calls an attention kernel, in forward order of construction."""
    return [(n, m) for n, m in model.named_modules() if hasattr(m, "kernel") and hasattr(m, "kernel_name")]


def _recorder(sink: list[torch.Tensor]):
    def kernel(q, k, v, mask=None, bias=None, scale=None, causal=False, dropout_p=0.0):
        probs = attention_probs(q, k, mask, bias, scale, causal)  # [B, H, T, S]
        sink.append(probs.detach())
        return (probs @ _repeat_kv(v, q.shape[1] // v.shape[1]).float()).to(q.dtype)

    return kernel


@contextmanager
def record_attentions(model: nn.Module) -> Iterator[dict[str, list[torch.Tensor]]]:
    """Yields {module name: [weights [B, H, T, S] per call]}, filled by forwards run inside the block."""
    modules = attention_modules(model)
    for name, m in modules:
        if getattr(m, "execution_name", "mask") == "blocks":
            raise ValueError(f"output_attentions: {name} runs block-sparse attention, which never forms the "
                             "weights; set sparse.execution='mask' to see them")
    maps: dict[str, list[torch.Tensor]] = {name: [] for name, _ in modules}
    saved = [(m, m.kernel) for _, m in modules]
    try:
        for name, m in modules:
            m.kernel = _recorder(maps[name])
        yield maps
    finally:
        for m, kernel in saved:
            m.kernel = kernel
