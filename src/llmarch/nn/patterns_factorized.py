"""The factorised patterns of the Sparse Transformer (Child et al. 2019, section 4.2) and blockwise (chunked)
attention. Each is the union of its parts in one head (the paper's "merged head" integration); alternating
parts over layers is a per-layer ``pattern`` schedule instead.

Cost per query: strided l + T/l keys, fixed l + cT/l keys (both O(T sqrt T) at l ~ sqrt T, as in the paper);
blockwise ``block`` keys.
"""
from __future__ import annotations

import torch

from llmarch.nn.block_sparse import BlockPlan
from llmarch.nn.patterns import PATTERNS, Pattern


@PATTERNS.register("strided")
class Strided(Pattern):
    """Strided: the previous l keys (|i - j| < l) and every l-th key before that ((i - j) % l == 0)."""

    def __init__(self, sparse, **_: object):
        super().__init__()
        self.stride = sparse.stride

    def allows(self, q, k, length, global_q=None, global_k=None):
        d = q - k
        return (d.abs() < self.stride) | (d % self.stride == 0)

    def plan(self, length, block):
        return BlockPlan.band(length, block, reach=self.stride - 1, stride=self.stride)


@PATTERNS.register("fixed")
class Fixed(Pattern):
    """Fixed: keys in the query's own stride block (i // l == j // l) and the c summary columns closing every
    block (j % l >= l - c)."""

    def __init__(self, sparse, **_: object):
        super().__init__()
        self.stride, self.summary = sparse.stride, sparse.summary

    def allows(self, q, k, length, global_q=None, global_k=None):
        l = self.stride
        return (q // l == k // l) | (k % l >= l - self.summary)

    def plan(self, length, block):
        l = self.stride
        nq = -(-length // block)
        first = torch.arange(nq) * block // l * l // block  # first key block of the query block's stride blocks
        last = (torch.arange(nq) * block + block - 1) // l * l + l - 1
        last = last.clamp(max=length - 1) // block
        width = int((last - first).max()) + 1
        table = first[:, None] + torch.arange(width)[None, :]
        table = torch.where(table <= last[:, None], table, -1)
        slots = torch.arange(length)
        return BlockPlan(table, shared=slots[slots % l >= l - self.summary])


@PATTERNS.register("blockwise")
class Blockwise(Pattern):
    """Blockwise (chunked) attention: queries see only keys of their own block of ``sparse.block`` slots."""

    def __init__(self, sparse, **_: object):
        super().__init__()
        self.block = sparse.block

    def allows(self, q, k, length, global_q=None, global_k=None):
        return q // self.block == k // self.block

    def plan(self, length, block):
        if block != self.block:
            raise ValueError(f"sparse.block: blockwise attention runs with its own block ({self.block}), got {block}")
        return BlockPlan(torch.arange(-(-length // block))[:, None])
