"""Key/value caches for incremental decoding.

``KVCache`` layout, per self-attention layer ``i``: ``k[i]`` [B, G, S_i, Dh], ``v[i]`` [B, G, S_i, Dv] and
``start[i]``, the absolute slot of the first stored key. A layer whose pattern only looks back W-1 keys
(sliding window) keeps only those, so ``start[i]`` moves forward and its memory stays O(W). ``length`` counts the
slots (tokens, padding included) the cache has seen; the model advances it once per forward.
"""
from __future__ import annotations

import torch


class KVCache:
    """A growing (dynamic) cache; sliding-window aware through each layer's ``lookback``."""

    def __init__(self) -> None:
        self.k: dict[int, torch.Tensor] = {}
        self.v: dict[int, torch.Tensor] = {}
        self.start: dict[int, int] = {}
        self.length = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor,
               lookback: int | None) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Append new k/v [B, G, T, *] of ``layer``; return all keys/values the new queries may need and the
        absolute slot of the first one. Keeps at most ``lookback`` keys for the next call."""
        if layer in self.k:
            k = torch.cat([self.k[layer], k], dim=2)
            v = torch.cat([self.v[layer], v], dim=2)
            start = self.start[layer]
        else:
            start = self.length
        keep_from = 0 if lookback is None else max(0, k.shape[2] - lookback)
        self.k[layer], self.v[layer] = k[:, :, keep_from:], v[:, :, keep_from:]
        self.start[layer] = start + keep_from
        return k, v, start

    def advance(self, n: int) -> None:
        self.length += n

    def reorder(self, index: torch.Tensor) -> None:
        """Select batch rows (beam search / dropping finished rows)."""
        for i in self.k:
            self.k[i], self.v[i] = self.k[i][index], self.v[i][index]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for d in (self.k, self.v) for t in d.values())


class LatentCache(KVCache):
    """The cache of multi-head latent attention (DeepSeek-V2): per layer ``i``, ``k[i]`` holds the normalised
    compressed latent [B, 1, S_i, R] and ``v[i]`` the rotated, head-shared RoPE key [B, 1, S_i, Dr], so a token
    costs R + Dr numbers per layer whatever the head count. Keys and values are re-expanded (or absorbed into the
    query and output) at attention time."""

    def latent(self, layer: int) -> torch.Tensor:
        return self.k[layer]

    def rope_key(self, layer: int) -> torch.Tensor:
        return self.v[layer]

    def numbers_per_token(self, layer: int) -> int:
        return self.k[layer].shape[-1] + self.v[layer].shape[-1]
