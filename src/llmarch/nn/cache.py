"""Key/value caches for incremental decoding.

``KVCache`` layout, per self-attention layer ``i``: ``k[i]`` [B, G, S_i, Dh], ``v[i]`` [B, G, S_i, Dv] and
``start[i]``, the absolute slot of the first stored key. A layer whose pattern only looks back W-1 keys
(sliding window) keeps only those, so ``start[i]`` moves forward and its memory stays O(W). ``length`` counts the
slots (tokens, padding included) the cache has seen; the model advances it once per forward.

A native decode step (:mod:`llmarch.nn.fused_decode`) writes every layer's new slot itself and may leave the views
for later (:meth:`KVCache.defer`): the first read of ``k``, ``v`` or ``start`` brings them up to date.
"""
from __future__ import annotations

import torch


class KVCache:
    """A growing (dynamic) cache; sliding-window aware through each layer's ``lookback``."""

    GROW = 256  # most spare slots a buffer is allocated with

    def __init__(self) -> None:
        self.expected: int | None = None  # the slots a caller expects to fill (generate: prompt + new tokens), a hint
        self._pending = None  # a native step's record of slots written but not yet in k / v / start (see defer)
        self.k: dict[int, torch.Tensor] = {}
        self.v: dict[int, torch.Tensor] = {}
        self.start: dict[int, int] = {}
        self.length = 0
        self._buffers: dict[int, tuple] = {}  # layer -> (k buffer, v buffer, offset of k[layer] in them)

    def _views(self, name: str) -> dict:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.sync(self)
        return self.__dict__[name]

    k = property(lambda self: self._views("_k"), lambda self, d: self.__dict__.__setitem__("_k", d))
    v = property(lambda self: self._views("_v"), lambda self, d: self.__dict__.__setitem__("_v", d))
    start = property(lambda self: self._views("_start"), lambda self, d: self.__dict__.__setitem__("_start", d))

    def defer(self, pending) -> None:
        """Leave ``k`` / ``v`` / ``start`` behind the buffers until first read, when ``pending.sync(cache)`` sets
        them (without reading them through these properties) from what a native step wrote."""
        self._pending = pending

    @property
    def pending(self):
        """What :meth:`defer` was given, while ``k`` / ``v`` / ``start`` have not been read since."""
        return self._pending

    def set_views(self, layer: int, bk: torch.Tensor, bv: torch.Tensor, first: int, end: int, start: int) -> None:
        """k[layer] / v[layer]: the buffers' slots [first, end), the first of them absolute slot ``start``."""
        k, v = bk.narrow(2, first, end - first), bv.narrow(2, first, end - first)
        self._k[layer], self._v[layer], self._start[layer] = k, v, start
        self._buffers[layer] = (bk, bv, first, k, v)

    def __getstate__(self) -> dict:
        self._views("_k")  # a copy gets the views, not the native step's record (which points at these buffers)
        return dict(self.__dict__)

    def reserve(self, layer: int, T: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, int, int]:
        """Buffers (k, v: [B, G, capacity, *]) holding k[layer] / v[layer] at slots [offset, offset + n) with room
        for T more slots after them, and (offset, n); the buffers are made (with spare slots) when k[layer] is
        not a view of them any more, they are full, or of another dtype. The caller writes the new slots and then
        records them (:meth:`update` by appending; a native step through :meth:`set_views`)."""
        old_k, old_v = self.k[layer], self.v[layer]
        n = old_k.shape[2]
        bk, bv, off, view_k, view_v = self._buffers.get(layer, (None,) * 5)
        if (view_k is not old_k or view_v is not old_v or off + n + T > bk.shape[2]
                or bk.dtype != dtype or bv.dtype != dtype):
            cap, off = n + T + min(self.GROW, n + T), 0  # spare: at most the cache's own size
            # the spare slots are left untouched (not copied as torch.cat would): their pages are only faulted
            # in as steps write them
            bk = old_k.new_empty(*old_k.shape[:2], cap, old_k.shape[3], dtype=dtype)
            bv = old_v.new_empty(*old_v.shape[:2], cap, old_v.shape[3], dtype=dtype)
            bk.narrow(2, 0, n).copy_(old_k)
            bv.narrow(2, 0, n).copy_(old_v)
        self._buffers[layer] = (bk, bv, off, old_k, old_v)
        return bk, bv, off, n

    def _append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k/v of ``layer`` followed by the new ones, written into buffers with spare slots (no copy of the
        whole cache per call, as torch.cat would); k[layer] / v[layer] stay views of them. Under autograd
        (in-place writes would invalidate saved views) or after k[layer] was replaced from outside: torch.cat."""
        old_k, old_v = self.k[layer], self.v[layer]
        if torch.is_grad_enabled() and (k.requires_grad or v.requires_grad or old_k.requires_grad):
            self._buffers.pop(layer, None)
            return torch.cat([old_k, k], dim=2), torch.cat([old_v, v], dim=2)
        T = k.shape[2]
        bk, bv, off, n = self.reserve(layer, T, k.dtype)
        bk.narrow(2, off + n, T).copy_(k)
        bv.narrow(2, off + n, T).copy_(v)
        self._buffers[layer] = (bk, bv, off)
        return bk.narrow(2, off, n + T), bv.narrow(2, off, n + T)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor,
               lookback: int | None) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Append new k/v [B, G, T, *] of ``layer``; return all keys/values the new queries may need and the
        absolute slot of the first one. Keeps at most ``lookback`` keys for the next call."""
        if layer in self.k:
            k, v = self._append(layer, k, v)
            start = self.start[layer]
        else:
            start = self.length
        self._keep(layer, k, v, start, lookback)
        return k, v, start

    def _keep(self, layer: int, k: torch.Tensor, v: torch.Tensor, start: int, lookback: int | None) -> None:
        """Store k/v (all keys of ``layer`` from absolute slot ``start``), at most the last ``lookback``."""
        keep_from = 0 if lookback is None else max(0, k.shape[2] - lookback)
        kept_k, kept_v = (k[:, :, keep_from:], v[:, :, keep_from:]) if keep_from else (k, v)
        self.k[layer], self.v[layer] = kept_k, kept_v
        self.start[layer] = start + keep_from
        if layer in self._buffers:  # remember the views kept: the next append checks it still owns them
            bk, bv, off = self._buffers[layer][:3]
            self._buffers[layer] = (bk, bv, off + keep_from, kept_k, kept_v)

    def advance(self, n: int) -> None:
        self.length += n

    def reorder(self, index: torch.Tensor) -> None:
        """Select batch rows (beam search / dropping finished rows)."""
        for i in self.k:
            self.k[i], self.v[i] = self.k[i][index], self.v[i][index]
        self._buffers.clear()

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for d in (self.k, self.v) for t in d.values())


class CrossMemory:
    """What a decoder attends to across: the encoder output ``states`` [B, S, D] and its ``key_padding`` [B, S]
    (bool, True = real token; None = no padding)."""

    def __init__(self, states: torch.Tensor, key_padding: torch.Tensor | None = None):
        self.states, self.key_padding = states, key_padding

    def mask(self) -> torch.Tensor | None:
        """Boolean [B, 1, 1, S] (True = attend) or None."""
        return None if self.key_padding is None else self.key_padding[:, None, None, :]

    def reorder(self, index: torch.Tensor) -> None:
        self.states = self.states[index]
        if self.key_padding is not None:
            self.key_padding = self.key_padding[index]


class EncoderDecoderCache(KVCache):
    """The decoder's growing self-attention cache plus the encoder side, fixed for the whole generation:
    ``memory`` (the encoder output, encoded once) and, per decoder layer ``i``, the cross-attention keys/values
    ``cross_k[i]`` [B, G, S, Dh] / ``cross_v[i]``, projected on the first step and reused by every later one."""

    def __init__(self, memory: CrossMemory | None = None) -> None:
        super().__init__()
        self.memory = memory
        self.cross_k: dict[int, torch.Tensor] = {}
        self.cross_v: dict[int, torch.Tensor] = {}

    def cross(self, layer: int, project, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-attention k/v of ``layer``: ``project(states)`` on first use, stored afterwards."""
        if layer not in self.cross_k:
            self.cross_k[layer], self.cross_v[layer] = project(states)
        return self.cross_k[layer], self.cross_v[layer]

    def reorder(self, index: torch.Tensor) -> None:
        super().reorder(index)
        for i in self.cross_k:
            self.cross_k[i], self.cross_v[i] = self.cross_k[i][index], self.cross_v[i][index]
        if self.memory is not None:
            self.memory.reorder(index)

    def nbytes(self) -> int:
        cross = sum(t.numel() * t.element_size() for d in (self.cross_k, self.cross_v) for t in d.values())
        return super().nbytes() + cross


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


class StateCache(KVCache):
    """The cache of recurrent (linear-time) mixers, composed with the KV cache of a hybrid's attention layers.

    Per recurrent layer ``i``: ``conv[i]`` [B, C, K-1], the last K-1 inputs of its short causal convolution
    (C channels, kernel K), and ``state[i]``, its fixed-size recurrent state (e.g. [B, H, Dk, Dv] for a gated
    delta rule, [B, H, Dh, N] for an SSM). Both stay the same size however long the context; attention layers of
    the same model use the inherited ``k``/``v`` dicts."""

    def __init__(self) -> None:
        super().__init__()
        self.conv: dict[int, torch.Tensor] = {}
        self.state: dict[int, torch.Tensor] = {}

    def reorder(self, index: torch.Tensor) -> None:
        super().reorder(index)
        for d in (self.conv, self.state):
            for i in d:
                d[i] = d[i][index]

    def nbytes(self) -> int:
        return super().nbytes() + sum(t.numel() * t.element_size() for d in (self.conv, self.state)
                                      for t in d.values())
