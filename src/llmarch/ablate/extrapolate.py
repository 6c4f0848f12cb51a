"""Validation perplexity at sequence lengths other than the training length (length extrapolation, Press et
al. 2022, "Train Short, Test Long").

At each length L the validation tokens are cut into non-overlapping windows of L tokens (the first
``token_budget`` tokens, so every length reads about the same text) and the model's mean next-token loss over all
positions of the windows is exponentiated. A model whose position scheme cannot represent position L-1 (a
learned table of N < L positions) is not run: its entry is the string ``"n/a: learned table has N positions"``.
"""
from __future__ import annotations

import logging
import math

import numpy as np
import torch
from torch import nn

from llmarch.data import PackedSequences
from llmarch.nn.position import position_limit

log = logging.getLogger(__name__)


@torch.no_grad()
def perplexity_at_lengths(model: nn.Module, objective, tokens: np.ndarray, lengths: list[int], token_budget: int,
                          batch_size: int = 8, device: torch.device | str = "cpu") -> dict[int, float | str]:
    """{L: perplexity, or "n/a: reason"} for each L. ``objective`` is the training objective (its
    ``make_batch``/``loss_sums``/``main_term``), so the loss is the one training reported as val_loss."""
    limit = position_limit(model)
    was_training = model.training
    model.eval()
    out: dict[int, float | str] = {}
    gen = torch.Generator().manual_seed(0)
    for L in lengths:
        if limit is not None and L > limit:
            out[L] = f"n/a: learned table has {limit} positions"
            continue
        length = L + objective.extra_tokens
        if len(tokens) < length:
            out[L] = f"n/a: the validation split has {len(tokens)} tokens, fewer than one sequence of {L}"
            continue
        seqs = PackedSequences(tokens, length, shuffle=False)
        n = max(1, min(len(seqs), token_budget // L))
        total = count = 0.0
        try:
            for start in range(0, n, batch_size):
                batch = objective.make_batch(seqs.batch(start, min(batch_size, n - start)), gen)
                inputs = {k: v.to(device) for k, v in batch.inputs.items()}
                labels = {k: v.to(device) for k, v in batch.labels.items()}
                sums = objective.loss_sums(model(**inputs), type(batch)(inputs, labels, batch.counts))
                total += float(sums[objective.main_term])
                count += batch.counts[objective.main_term]
        except ValueError as e:  # a model that refuses the length for another reason says why
            out[L] = f"n/a: {e}"
            continue
        out[L] = math.exp(min(total / count, 50.0))
        log.info("length %d: perplexity %.3f over %d windows", L, out[L], n)
    model.train(was_training)
    return out


__all__ = ["perplexity_at_lengths", "position_limit"]
