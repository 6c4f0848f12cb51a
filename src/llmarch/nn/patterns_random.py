"""Random attention as a pattern of its own (the random part of BigBird, Zaheer et al. 2020, at token level): each
query sees itself plus r = ``sparse.random_keys`` keys drawn from ``sparse.seed``: r of the earlier keys in a
causal stack, r of all the other keys in a bidirectional one (all of them when there are fewer than r).

The draw is a hash of (seed, query, key): query q keeps the r candidate keys of smallest hash. It depends on
nothing else (not the batch, not the sequence length in a causal stack), so cached decoding sees the keys a full
forward sees, and the same seed always gives the same pattern.
"""
from __future__ import annotations

import torch

from llmarch.nn.patterns import PATTERNS, Pattern

_M32 = 0xFFFFFFFF
_KEY_BITS = 21  # keys below 2^21 slots; the hash fills the bits above, so ties are impossible


@PATTERNS.register("random")
class RandomKeys(Pattern):
    """Itself plus r seeded random keys per query (causal: earlier keys; bidirectional: any other key)."""

    def __init__(self, sparse, causal: bool = True, **_: object):
        super().__init__()
        self.random_keys, self.seed, self.causal = sparse.random_keys, sparse.seed, causal

    def rank_key(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """A per-(seed, q, k) pseudo-random int64 (a 32-bit integer hash), unique within a query's row."""
        x = (q * 0x9E3779B1 + k * 0x85EBCA77 + self.seed * 0xC2B2AE3D + 0x165667B1) & _M32
        x = x ^ (x >> 15)
        x = (x * 0x2C1B3C6D) & _M32
        x = x ^ (x >> 12)
        x = (x * 0x297A2D39) & _M32
        x = x ^ (x >> 15)
        return (x << _KEY_BITS) | k

    def candidates(self, q: torch.Tensor, k: torch.Tensor, length: int) -> torch.Tensor:
        return k < q if self.causal else (k != q) & (k < length)

    def thresholds(self, qs: torch.Tensor, length: int) -> torch.Tensor:
        """For queries qs [n]: the largest rank key each keeps ([n] int64; int64 max keeps every candidate)."""
        k = torch.arange(length, device=qs.device)[None, :]
        big = torch.iinfo(torch.int64).max
        keys = self.rank_key(qs[:, None], k).masked_fill(~self.candidates(qs[:, None], k, length), big)
        r = min(self.random_keys, length)
        if r == 0:
            return torch.full_like(qs, -1)
        return keys.kthvalue(r, dim=-1).values  # = big when fewer than r candidates: keep them all

    def allows(self, q, k, length, global_q=None, global_k=None):
        if length >= 1 << _KEY_BITS:
            raise ValueError(f"pattern 'random' supports sequences below {1 << _KEY_BITS} slots, got {length}")
        q, k = torch.broadcast_tensors(q.long(), k.long())
        qs = torch.unique(q)
        thr = self.thresholds(qs, length)[torch.searchsorted(qs, q.contiguous())]
        return (k == q) | (self.candidates(q, k, length) & (self.rank_key(q, k) <= thr))
