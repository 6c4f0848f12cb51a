"""A pre-allocated (static) KV cache and the attention context that goes with it, written so that one decode
step has fixed shapes and no Python numbers that change from step to step: ``torch.compile`` captures it once.

Layout, per self-attention layer ``i``: ``k[i]`` [B, G, S_max, Dh] and ``v[i]`` [B, G, S_max, Dv], written in
place at the slots of the current call. ``pos`` (a 0-d long tensor) is the next free slot, ``key_valid``
[B, S_max] marks slots holding a real token (left padding stays False) and ``n_real`` [B] counts real tokens per
row, so position ids skip padding. Every call attends over all S_max slots; the mask hides slots that are empty,
padded, in the future or outside the layer's pattern (so a sliding window costs S_max memory here, not W).
"""
from __future__ import annotations

import torch

from llmarch.nn.attention import AttnContext
from llmarch.nn.patterns import Pattern
from llmarch.nn.position import PositionScheme, position_limit


class StaticKVCache:
    """Fixed-size cache for ``batch`` rows of up to ``max_len`` slots. Speaks the ``KVCache`` protocol
    (``update``, ``length``, ``advance``) and adds ``rollback`` (speculative decoding rejects draft tokens)."""

    def __init__(self, n_layers: int, batch: int, n_kv_heads: int, max_len: int, head_dim: int,
                 v_head_dim: int | None = None, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None):
        if max_len <= 0:
            raise ValueError(f"max_len must be a positive integer, got {max_len}")
        dv = head_dim if v_head_dim is None else v_head_dim
        self.max_len = max_len
        self.k = [torch.zeros(batch, n_kv_heads, max_len, head_dim, dtype=dtype, device=device)
                  for _ in range(n_layers)]
        self.v = [torch.zeros(batch, n_kv_heads, max_len, dv, dtype=dtype, device=device) for _ in range(n_layers)]
        self.pos = torch.zeros((), dtype=torch.long, device=device)
        self.key_valid = torch.zeros(batch, max_len, dtype=torch.bool, device=device)
        self.n_real = torch.zeros(batch, dtype=torch.long, device=device)
        self.slots = torch.zeros(1, dtype=torch.long, device=device)  # slots written by the current call [T]
        # a compiled step writes these in place; marked as fixed-address inputs, CUDA graphs (reduce-overhead)
        # replay over them instead of refusing a graph with mutated inputs. A new cache re-records, not recompiles.
        for t in self.k + self.v + [self.pos, self.key_valid, self.n_real]:
            torch._dynamo.mark_static_address(t, guard=False)

    @classmethod
    def for_model(cls, model, batch: int, max_len: int) -> "StaticKVCache":
        """Sized from the model's config, on its device and in its dtype."""
        cfg = model.config
        if set(cfg.mixers) != {"attention"}:
            raise ValueError(f"cache: the static cache holds multi-head k/v; mixers {list(cfg.mixers)} decode with "
                             "cache='dynamic'")
        limit = position_limit(model)  # the context rule of generate(): only a learned table has an end
        if limit is not None and max_len > limit:
            raise ValueError(f"max_len={max_len} is longer than the model's learned position table (max_seq_len="
                             f"{limit}); shorten the prompt or max_new_tokens")
        p = next(model.parameters())
        try:
            return cls(cfg.n_layers, batch, cfg.kv_heads, max_len, cfg.dh, dtype=p.dtype, device=p.device)
        except (RuntimeError, MemoryError) as e:  # the allocator's "can't allocate" / out of memory
            if isinstance(e, RuntimeError) and not any(w in str(e).lower() for w in ("alloc", "memory")):
                raise
            need = 2 * cfg.n_layers * batch * cfg.kv_heads * max_len * cfg.dh * p.element_size()
            raise ValueError(f"max_new_tokens: a static cache of {max_len} slots needs {need / 2**30:.1f} GiB, more "
                             f"than {p.device} can allocate; lower max_new_tokens") from None

    # --- the KVCache protocol -----------------------------------------------------------------------------
    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor,
               lookback: int | None) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Write k [B, G, T, Dh] / v at ``slots``; return the whole buffers and key slot 0."""
        self.k[layer].index_copy_(2, self.slots, k.to(self.k[layer].dtype))
        self.v[layer].index_copy_(2, self.slots, v.to(self.v[layer].dtype))
        return self.k[layer], self.v[layer], 0

    @property
    def length(self) -> int:
        return int(self.pos)

    def advance(self, n: int) -> None:
        self.pos += n

    # --- static-cache extras ------------------------------------------------------------------------------
    def begin(self, new_mask: torch.Tensor) -> torch.Tensor:
        """Reserve slots for a call of T tokens with real-token mask [B, T]; returns their position ids [B, T]
        (counting real tokens only). Tensor ops only, so it traces into a compiled step."""
        T = new_mask.shape[1]
        self.slots = self.pos + torch.arange(T, device=self.pos.device)
        real = new_mask.bool()
        self.key_valid.index_copy_(1, self.slots, real)
        position_ids = (self.n_real[:, None] + real.long().cumsum(1) - 1).clamp(min=0)
        self.n_real += real.long().sum(1)
        return position_ids

    def rollback(self, n: int) -> None:
        """Forget the last ``n`` slots (all rows must have been real there)."""
        if n:
            self.pos -= n
            self.n_real -= n
            self.key_valid[:, int(self.pos):int(self.pos) + n] = False

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


class StaticContext(AttnContext):
    """The attention context of one call on a :class:`StaticKVCache`: query slots are a tensor, keys are all
    S_max slots, and the mask is built from tensors (no memo keyed on Python numbers)."""

    def __init__(self, cache: StaticKVCache, positions: PositionScheme, position_ids: torch.Tensor,
                 causal: bool = True):
        self.q_start, self.T, self.causal = None, position_ids.shape[1], causal
        self.q_idx = cache.slots  # [T]
        self.k_idx = torch.arange(cache.max_len, device=cache.slots.device)  # [S_max]
        self.key_valid = cache.key_valid  # [B, S_max]
        self.positions = positions
        self.rotation = positions.rotation(position_ids)

    def mask(self, pattern: Pattern, k_start: int, S: int) -> tuple[torch.Tensor, bool]:
        """[B, 1, T, S_max] bool (True = attend)."""
        m = self.key_valid[:, None, None, :]
        if self.causal:
            m = m & (self.k_idx[None, :] <= self.q_idx[:, None])
        rule = pattern.allowed(self.q_idx, self.k_idx)
        if rule is not None:
            m = m & rule
        # a query with no visible key (a padding slot) attends everything, so softmax stays finite; its output
        # is never used
        return m | ~m.any(-1, keepdim=True), False

    def bias(self, k_start: int, S: int) -> torch.Tensor | None:
        return self.positions.score_bias(self.q_idx, self.k_idx)
