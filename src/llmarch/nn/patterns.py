"""Attention mask patterns: rules over (query slot, key slot) that combine with causality and padding.

A pattern answers ``allowed(q_idx, k_idx)`` -> bool [T, S] (None = no restriction) and ``lookback`` (how many past
keys a query can ever need, so a cache may drop older ones). ``render(n)`` draws the pattern as an [n, n] boolean
matrix for tests and pictures.
"""
from __future__ import annotations

import torch

from llmarch.registry import Registry

PATTERNS: Registry[type["Pattern"]] = Registry("pattern")


class Pattern:
    """Base pattern: every key allowed (dense attention)."""

    needs_window = False

    def __init__(self, **_: object):
        pass

    @property
    def lookback(self) -> int | None:
        """Keys older than this many positions before the newest query are never attended (None = all needed)."""
        return None

    def allowed(self, q_idx: torch.Tensor, k_idx: torch.Tensor) -> torch.Tensor | None:
        return None

    def render(self, n: int, causal: bool = True) -> torch.Tensor:
        """The [n, n] boolean mask of this pattern (True = query row may attend key column)."""
        idx = torch.arange(n)
        mask = torch.ones(n, n, dtype=torch.bool)
        rule = self.allowed(idx, idx)
        if rule is not None:
            mask &= rule
        if causal:
            mask &= causal_mask(idx, idx)
        return mask


@PATTERNS.register("dense")
class Dense(Pattern):
    """Full attention (within causality and padding)."""


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

    def allowed(self, q_idx: torch.Tensor, k_idx: torch.Tensor) -> torch.Tensor:
        return (q_idx[:, None] - k_idx[None, :]).abs() < self.window


def causal_mask(q_idx: torch.Tensor, k_idx: torch.Tensor) -> torch.Tensor:
    """k <= q. [T, S] bool."""
    return k_idx[None, :] <= q_idx[:, None]


def build_pattern(name: str, *, window: int | None) -> Pattern:
    return PATTERNS[name](window=window)
