"""Attention mask patterns: rules over (query slot, key slot) that combine with causality and padding.

A pattern answers ``allows(q, k, length, global_q, global_k)`` elementwise on broadcastable tensors of absolute
slots (None = no restriction); ``allowed(q_idx, k_idx)`` is that rule as a [T, S] (or per-batch [B, T, S]) matrix
and ``render(n)`` draws it as an [n, n] boolean matrix for tests and pictures. ``length`` is the number of slots
in the sequence (BigBird's "last block" depends on it); ``global_q``/``global_k`` say which slots the batch marks
global (Longformer's ``global_attention_mask``). ``lookback`` says how many past keys a query can ever need, so a
cache may drop older ones. ``plan(length, block)`` lists, per query block, a superset of the keys it may attend
(a :class:`~llmarch.nn.block_sparse.BlockPlan`), which the block-sparse execution gathers; None means dense.
"""
from __future__ import annotations

import torch

from llmarch.registry import Registry

PATTERNS: Registry[type["Pattern"]] = Registry("pattern")


class Pattern:
    """Base pattern: every key allowed (dense attention)."""

    needs_window = False
    uses_global_mask = False  # reads a per-batch global_attention_mask
    causal = True  # whether the stack using it is causal (build_pattern sets it)

    def __init__(self, **_: object):
        pass

    @property
    def lookback(self) -> int | None:
        """Keys older than this many positions before the newest query are never attended (None = all needed)."""
        return None

    def allows(self, q: torch.Tensor, k: torch.Tensor, length: int, global_q: torch.Tensor | None = None,
               global_k: torch.Tensor | None = None) -> torch.Tensor | None:
        """Elementwise rule on broadcastable slot tensors q and k (True = may attend); None = no restriction."""
        return None

    def allowed(self, q_idx: torch.Tensor, k_idx: torch.Tensor, length: int | None = None,
                global_mask: torch.Tensor | None = None) -> torch.Tensor | None:
        """The rule as a matrix: q_idx [T], k_idx [S] -> [T, S], or [B, T, S] with ``global_mask`` [B, length]."""
        length = int(max(q_idx.max(), k_idx.max())) + 1 if length is None else length
        gq = gk = None
        if global_mask is not None and self.uses_global_mask:
            gq, gk = global_mask[:, q_idx, None], global_mask[:, None, k_idx]  # [B, T, 1], [B, 1, S]
        return self.allows(q_idx[:, None], k_idx[None, :], length, gq, gk)

    def render(self, n: int, causal: bool = True, global_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The [n, n] (or [B, n, n] with a global mask) boolean mask (True = query row may attend key column)."""
        idx = torch.arange(n)
        mask = torch.ones(n, n, dtype=torch.bool)
        rule = self.allowed(idx, idx, n, global_mask)
        if rule is not None:
            mask = mask & rule
        if causal:
            mask = mask & causal_mask(idx, idx)
        return mask

    def plan(self, length: int, block: int):
        """A BlockPlan for the block-sparse execution, or None (dense: run the plain kernel)."""
        return None

    def pairs(self, n: int, causal: bool = True) -> int | None:
        """How many (query, key) pairs of an n-token sequence the mask allows (the attention FLOPs a kernel that
        skips masked pairs does). Counted by rendering ``PAIRS_ROWS`` query rows at a time; None when n is over
        ``PAIRS_MAX_N`` (too long to render); patterns with a closed form override this for any n."""
        if n > PAIRS_MAX_N:
            return None
        idx, total = torch.arange(n), 0
        for start in range(0, n, PAIRS_ROWS):
            q = idx[start:start + PAIRS_ROWS]
            rule = self.allowed(q, idx, n)
            mask = torch.ones(len(q), n, dtype=torch.bool) if rule is None else rule.expand(len(q), n)
            total += int((mask & causal_mask(q, idx)).sum() if causal else mask.sum())
        return total


PAIRS_MAX_N = 32768  # rendering past this (n² cells) takes longer than an analysis should
PAIRS_ROWS = 1024


@PATTERNS.register("dense")
class Dense(Pattern):
    """Full attention (within causality and padding)."""

    def pairs(self, n: int, causal: bool = True) -> int:
        """n(n+1)/2 causal pairs (the lower triangle with its diagonal), n² without the causal mask."""
        return n * (n + 1) // 2 if causal else n * n


@PATTERNS.register("sliding")
class Sliding(Pattern):
    """Sliding window of W (Child et al. 2019 local band; Mistral): |i - j| < W, so a causal query sees itself
    and the W-1 keys before it."""

    needs_window = True

    def __init__(self, window: int, **_: object):
        super().__init__()
        self.window = window

    @property
    def lookback(self) -> int:
        return self.window - 1

    def allows(self, q, k, length, global_q=None, global_k=None):
        return (q - k).abs() < self.window

    def plan(self, length, block):
        from llmarch.nn.block_sparse import BlockPlan

        return BlockPlan.band(length, block, reach=self.window - 1)

    def pairs(self, n: int, causal: bool = True) -> int:
        """Causal: query i sees min(i + 1, W) keys; without causality the band |i - j| < W is twice that less the
        diagonal."""
        w = min(self.window, n)
        one_side = w * (w + 1) // 2 + (n - w) * w
        return one_side if causal else 2 * one_side - n


def causal_mask(q_idx: torch.Tensor, k_idx: torch.Tensor) -> torch.Tensor:
    """k <= q. [T, S] bool."""
    return k_idx[None, :] <= q_idx[:, None]


def build_pattern(name: str, *, window: int | None, sparse=None, causal: bool = True) -> Pattern:
    """Instantiate pattern ``name`` with the window and the sparse sub-config (SparseConfig) it may need, for a
    causal or bidirectional stack (random attention draws among earlier keys only when causal)."""
    from llmarch.attention_config import SparseConfig

    pattern = PATTERNS[name](window=window, sparse=sparse or SparseConfig(), causal=causal)
    pattern.causal = causal
    return pattern
