"""Key/value caches for incremental decoding.

``KVCache`` layout, per self-attention layer ``i``: ``k[i]`` [B, G, S_i, Dh], ``v[i]`` [B, G, S_i, Dv] and
``start[i]``, the absolute slot of the first stored key. A layer whose pattern only looks back W-1 keys
(sliding window) keeps only those, so ``start[i]`` moves forward and its memory stays O(W). ``length`` counts the
slots (tokens, padding included) the cache has seen; the model advances it once per forward.

Storage: ``k[i]`` / ``v[i]`` are views into per-layer buffers with spare room along S. A step writes its new keys
into that room (no copy of the old ones); only a full buffer is reallocated, ``chunk`` slots larger than needed
(or, for a sliding layer, compacted to its window), so decoding N tokens copies O(N) slots rather than O(N^2).
"""
from __future__ import annotations

import torch


class _Slots:
    """One layer's buffer [B, G, capacity, *] and the live range [lo, hi) along dim 2."""

    def __init__(self, buf: torch.Tensor, lo: int, hi: int):
        self.buf, self.lo, self.hi = buf, lo, hi

    @property
    def view(self) -> torch.Tensor:
        return self.buf[:, :, self.lo:self.hi]

    def append(self, new: torch.Tensor, keep_max: int | None, chunk: int) -> torch.Tensor:
        """Write new [B, G, T, *] after the live range and return live + new (a view)."""
        T = new.shape[2]
        if self.hi + T > self.buf.shape[2]:  # no room: move the live range to the front of a (new) buffer
            live = self.hi - self.lo
            cap = live + T + chunk if keep_max is None else max(self.buf.shape[2], keep_max + T + chunk)
            buf = self.buf if cap <= self.buf.shape[2] and self.lo >= live else self.buf.new_empty(
                *self.buf.shape[:2], cap, *self.buf.shape[3:])
            buf[:, :, :live] = self.buf[:, :, self.lo:self.hi]
            self.buf, self.lo, self.hi = buf, 0, live
        self.buf[:, :, self.hi:self.hi + T] = new
        self.hi += T
        return self.view


class KVCache:
    """A growing (dynamic) cache; sliding-window aware through each layer's ``lookback``."""

    def __init__(self, chunk: int = 256) -> None:
        self.chunk = chunk
        self.start: dict[int, int] = {}
        self.length = 0
        self._k: dict[int, _Slots] = {}
        self._v: dict[int, _Slots] = {}

    @property
    def k(self) -> dict[int, torch.Tensor]:
        """Stored keys per layer, [B, G, S_i, Dh] (read-only views)."""
        return {i: s.view for i, s in self._k.items()}

    @property
    def v(self) -> dict[int, torch.Tensor]:
        """Stored values per layer, [B, G, S_i, Dv] (read-only views)."""
        return {i: s.view for i, s in self._v.items()}

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor,
               lookback: int | None) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Append new k/v [B, G, T, *] of ``layer``; return all keys/values the new queries may need and the
        absolute slot of the first one. Keeps at most ``lookback`` keys for the next call."""
        if layer in self._k:
            start = self.start[layer]
            k = self._k[layer].append(k, lookback, self.chunk)
            v = self._v[layer].append(v, lookback, self.chunk)
        else:
            start = self.length
            T = k.shape[2]
            cap = T + self.chunk
            self._k[layer] = _Slots(k.new_empty(*k.shape[:2], cap, *k.shape[3:]), 0, 0)
            self._v[layer] = _Slots(v.new_empty(*v.shape[:2], cap, *v.shape[3:]), 0, 0)
            k = self._k[layer].append(k, lookback, self.chunk)
            v = self._v[layer].append(v, lookback, self.chunk)
        keep_from = 0 if lookback is None else max(0, k.shape[2] - lookback)
        for slots in (self._k[layer], self._v[layer]):
            slots.lo += keep_from
        self.start[layer] = start + keep_from
        return k, v, start

    def advance(self, n: int) -> None:
        self.length += n

    def reorder(self, index: torch.Tensor) -> None:
        """Select batch rows (beam search / dropping finished rows)."""
        for slots in (*self._k.values(), *self._v.values()):
            slots.buf = slots.buf[index]

    def nbytes(self) -> int:
        """Bytes allocated for keys and values (buffers, spare room included)."""
        return sum(s.buf.numel() * s.buf.element_size() for d in (self._k, self._v) for s in d.values())
