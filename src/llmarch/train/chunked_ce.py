"""Chunked cross-entropy: the summed next-token loss without a second full copy of the logits.

``F.cross_entropy(logits.float(), ...)`` keeps, besides the logits themselves, an fp32 copy (for half-precision
logits) and the fp32 log-softmax [N, V] for the backward pass. Here the forward walks the tokens in chunks, upcasts
one chunk at a time and keeps only the log-sum-exp per token [N]; the backward recomputes softmax - onehot chunk by
chunk straight into the gradient buffer. Same values as ``F.cross_entropy`` up to float rounding order (tests hold
loss and gradients within 1e-6 in fp32). The trick of never holding the vocabulary-wide probabilities for all
tokens at once follows Wijmans et al. 2024, "Cut Your Losses in Large-Vocabulary Language Models" (applied here to
logits the model already returned, so every head and objective keeps its interface).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# fp32 values per chunk. CPU: 4 MB, cache-sized; measured at N 2048, V 32000 (fwd+bwd of the loss alone, one
# thread): 8-32 rows per chunk ~1.05 s, 64 rows 1.1-1.3 s, 262 rows 1.24 s, 1024 rows 1.96 s, F.cross_entropy 1.7 s.
# Accelerators: 256 MB, so a step launches a handful of chunks rather than hundreds of small kernels (not measured).
CHUNK_ELEMENTS = {"cpu": 1 << 20}
CHUNK_ELEMENTS_DEFAULT = 1 << 26


def chunk_rows(V: int, device: torch.device | str = "cpu") -> int:
    """Tokens per chunk for a vocabulary of V on ``device``."""
    return max(1, CHUNK_ELEMENTS.get(torch.device(device).type, CHUNK_ELEMENTS_DEFAULT) // max(V, 1))


class ChunkedCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy over the tokens whose label is not ``ignore_index``. logits [N, V] (any float dtype),
    labels [N] long -> scalar fp32 (fp64 for fp64 logits). The gradient has the logits' dtype."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, rows: int) -> torch.Tensor:
        N, acc = logits.shape[0], torch.promote_types(logits.dtype, torch.float32)  # fp32 (fp64 stays fp64)
        lse = torch.empty(N, dtype=acc, device=logits.device)  # [N] log-sum-exp per token
        total = torch.zeros((), dtype=acc, device=logits.device)
        for s in range(0, N, rows):
            x = logits[s:s + rows].to(acc)  # [n, V]
            y = labels[s:s + rows]
            valid = y != ignore_index
            lse[s:s + rows] = torch.logsumexp(x, dim=-1)
            picked = x.gather(1, y.clamp(min=0)[:, None]).squeeze(1)  # [n] the label's logit
            total = total + torch.where(valid, lse[s:s + rows] - picked, 0.0).sum()
        ctx.save_for_backward(logits, labels, lse)
        ctx.ignore_index, ctx.rows = ignore_index, rows
        return total

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        logits, labels, lse = ctx.saved_tensors
        grad = torch.empty_like(logits)  # [N, V]
        g = grad_out.to(lse.dtype)
        for s in range(0, logits.shape[0], ctx.rows):
            y = labels[s:s + ctx.rows]
            valid = y != ctx.ignore_index
            p = (logits[s:s + ctx.rows].to(lse.dtype) - lse[s:s + ctx.rows, None]).exp_()  # [n, V] softmax
            p.scatter_add_(1, y.clamp(min=0)[:, None], torch.full_like(p[:, :1], -1.0))  # - onehot
            p.mul_(torch.where(valid, g, 0.0)[:, None])
            grad[s:s + ctx.rows] = p
        return grad, None, None, None


def chunked_ce_sum(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100,
                   rows: int | None = None) -> torch.Tensor:
    """Summed fp32 cross-entropy. logits [..., V], labels [...] -> scalar; labels equal to ``ignore_index`` count
    nothing. Tensor subclasses (e.g. sharded DTensor logits) take ``F.cross_entropy``, which knows their layout."""
    flat, y = logits.flatten(0, -2), labels.flatten()
    if type(logits) is not torch.Tensor:
        return F.cross_entropy(flat.float(), y, ignore_index=ignore_index, reduction="sum")
    return ChunkedCrossEntropy.apply(flat, y, ignore_index, rows or chunk_rows(flat.shape[-1], flat.device))


__all__ = ["ChunkedCrossEntropy", "chunked_ce_sum", "chunk_rows"]
