"""Window + global patterns: Longformer (Beltagy et al. 2020) and BigBird (Zaheer et al. 2020, ITC variant)."""
from __future__ import annotations

import torch

from llmarch.nn.block_sparse import BlockPlan
from llmarch.nn.patterns import PATTERNS, Pattern


@PATTERNS.register("longformer")
class Longformer(Pattern):
    """Sliding window |i - j| < W plus symmetric global attention: a global token attends every key and every
    query attends it. Global tokens are the positions ``sparse.global_tokens`` and, per batch row, the slots set
    in ``global_attention_mask``."""

    needs_window = True
    uses_global_mask = True

    def __init__(self, window: int, sparse, **_: object):
        super().__init__()
        self.window = window
        self.global_tokens = torch.tensor(sparse.global_tokens, dtype=torch.long)

    def is_global(self, x: torch.Tensor, flags: torch.Tensor | None) -> torch.Tensor:
        g = torch.isin(x, self.global_tokens.to(x.device))
        return g if flags is None else g | flags

    def allows(self, q, k, length, global_q=None, global_k=None):
        return ((q - k).abs() < self.window) | self.is_global(q, global_q) | self.is_global(k, global_k)

    def global_slots(self, n: int, global_mask: torch.Tensor | None, device) -> torch.Tensor:
        """[B|1, n] bool: which of slots [0, n) are global (``sparse.global_tokens`` or set in the mask)."""
        return self.is_global(torch.arange(n, device=device)[None], None if global_mask is None
                              else global_mask[:, :n])

    def plan(self, length, block):
        return BlockPlan.band(length, block, reach=self.window - 1, shared=self.global_tokens, shared_global=True,
                              rows=self.global_tokens, rows_global=True)


@PATTERNS.register("bigbird")
class BigBird(Pattern):
    """Blocks of ``sparse.block`` slots; query block i sees key blocks i-1, i, i+1 (window), the global blocks
    (``sparse.global_blocks``, negative = from the end; global blocks also see everything) and
    ``sparse.random_blocks`` others drawn per query block from ``sparse.seed``, so a run is reproducible. The
    random blocks are shared by all heads (the HF implementation draws them per head). A sequence of at most
    ``sparse.dense_up_to_blocks`` blocks attends densely."""

    def __init__(self, sparse, **_: object):
        super().__init__()
        self.block, self.n_random, self.global_blocks = sparse.block, sparse.random_blocks, sparse.global_blocks
        self.seed, self.dense_up_to_blocks = sparse.seed, sparse.dense_up_to_blocks
        self._layouts: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def globals_of(self, nb: int) -> list[int]:
        return sorted({g % nb for g in self.global_blocks if -nb <= g < nb})

    def random_table(self, nb: int) -> torch.Tensor:
        """[nb, r] random key blocks per query block (-1 where too few candidates remain)."""
        glob = set(self.globals_of(nb))
        table = torch.full((nb, self.n_random), -1, dtype=torch.long)
        for i in range(nb):
            cands = torch.tensor([j for j in range(nb) if abs(i - j) > 1 and j not in glob], dtype=torch.long)
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
            pick = cands[torch.randperm(len(cands), generator=g)[: self.n_random]]
            table[i, : len(pick)] = pick
        return table

    def layout(self, nb: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Block-level relations [nb, nb] bool: (all allowed, allowed except through global query blocks)."""
        if nb not in self._layouts:
            idx = torch.arange(nb)
            local = (idx[:, None] - idx[None, :]).abs() <= 1
            rand = self.random_table(nb)
            local[idx[:, None].expand_as(rand)[rand >= 0], rand[rand >= 0]] = True
            local[:, self.globals_of(nb)] = True
            full = local.clone()
            full[self.globals_of(nb), :] = True
            self._layouts[nb] = (full, local)
        return self._layouts[nb]

    def allows(self, q, k, length, global_q=None, global_k=None):
        nb = -(-length // self.block)
        if nb <= self.dense_up_to_blocks:
            return None
        full, _ = self.layout(nb)
        full = full.to(q.device)
        return full[(q // self.block).clamp(0, nb - 1), (k // self.block).clamp(0, nb - 1)]

    def plan(self, length, block):
        if block != self.block:
            raise ValueError(f"sparse.block: bigbird runs with its own block ({self.block}), got {block}")
        nb = -(-length // block)
        if nb <= self.dense_up_to_blocks:
            return None
        _, local = self.layout(nb)
        width = int(local.sum(-1).max())
        order = torch.sort((~local).to(torch.int8), dim=-1, stable=True).indices[:, :width]
        table = torch.where(local.gather(1, order), order, -1)
        rows = (torch.tensor(self.globals_of(nb), dtype=torch.long)[:, None] * block + torch.arange(block)).flatten()
        return BlockPlan(table, rows=rows[rows < length])
