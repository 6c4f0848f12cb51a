"""Multi-head attention with grouped key/value heads: MHA (G = H), GQA (1 < G < H, Ainslie et al. 2023) and
MQA (G = 1, Shazeer 2019). Masks come from the layer's pattern combined with causality and padding; positions
enter through the shared :class:`AttnContext` (rotation of q/k, additive score bias)."""
from __future__ import annotations

import math

import torch
from torch import nn

from llmarch.nn.cache import KVCache
from llmarch.nn.dense import Linear
from llmarch.nn.execution import EXECUTIONS
from llmarch.nn.kernels import KERNELS
from llmarch.nn.patterns import Pattern, causal_mask
from llmarch.nn.position import PositionScheme


class AttnContext:
    """What every attention layer of one stack shares in one forward: query slots, padding, causality, the
    position scheme's rotation and bias, the batch's global tokens. Masks and biases are memoised per (pattern,
    key range)."""

    def __init__(self, q_start: int, T: int, positions: PositionScheme, position_ids: torch.Tensor,
                 key_padding: torch.Tensor | None, causal: bool, device: torch.device, memory=None,
                 global_mask: torch.Tensor | None = None, document_ids: torch.Tensor | None = None,
                 position_start: int | None = None):
        self.q_start, self.T, self.causal = q_start, T, causal
        self.memory = memory  # CrossMemory: the encoder output a decoder's cross-attention reads (None elsewhere)
        self.q_idx = torch.arange(q_start, q_start + T, device=device)
        self.key_padding = key_padding  # [B, S_total] bool, True = real token
        self.global_mask = global_mask  # [B, S_total] bool, True = global token (patterns that use one)
        self.document_ids = document_ids  # [B, S_total]: packed documents; a query sees keys of its own only
        self.positions = positions
        self.rotation = positions.rotation(position_ids, position_start)  # start: ids are a range in every row
        self._masks: dict = {}
        self._biases: dict = {}

    def mask(self, pattern: Pattern, k_start: int, S: int) -> tuple[torch.Tensor | None, bool]:
        """Boolean mask [B|1, 1, T, S] (True = attend) or None, and whether it is exactly causal (T == S)."""
        key = (id(pattern), k_start, S)
        if key not in self._masks:
            self._masks[key] = self._build_mask(pattern, k_start, S)
        return self._masks[key]

    def _build_mask(self, pattern: Pattern, k_start: int, S: int) -> tuple[torch.Tensor | None, bool]:
        k_idx = torch.arange(k_start, k_start + S, device=self.q_idx.device)
        rule = pattern.allowed(self.q_idx, k_idx, self.q_start + self.T, self.global_mask)  # [T, S] | [B, T, S]
        needs_causal = self.causal and self.q_start < k_start + S - 1  # some key lies in a query's future
        if rule is None and self.key_padding is None and self.document_ids is None:
            if not needs_causal:
                return None, False
            if self.q_start == k_start and S == self.T:
                return None, True
        m = torch.ones(self.T, S, dtype=torch.bool, device=k_idx.device)
        if needs_causal:
            m = m & causal_mask(self.q_idx, k_idx)
        if rule is not None:
            m = m & rule
        m = m[:, None] if m.dim() == 3 else m[None, None]  # [B|1, 1, T, S]
        if self.key_padding is not None:
            m = m & self.key_padding[:, None, None, k_start:k_start + S]  # [B, 1, T, S]
        if self.document_ids is not None:  # block-diagonal: packed documents never attend to each other
            docs = self.document_ids
            m = m & (docs[:, None, self.q_start:self.q_start + self.T, None] == docs[:, None, None, k_start:k_start + S])
        # a query with no visible key (a padding slot) attends everything, so softmax stays finite; its output
        # is never used
        return m | ~m.any(-1, keepdim=True), False

    def memo(self) -> tuple[dict, dict]:
        """The masks and biases memoised so far. Activation checkpointing restores this before recomputing a
        block, so the recomputation repeats the ops its first run did (a learned bias built there, T5's)."""
        return dict(self._masks), dict(self._biases)

    def restore_memo(self, memo: tuple[dict, dict]) -> None:
        self._masks, self._biases = dict(memo[0]), dict(memo[1])

    def bias(self, k_start: int, S: int) -> torch.Tensor | None:
        key = (k_start, S)
        if key not in self._biases:
            k_idx = torch.arange(k_start, k_start + S, device=self.q_idx.device)
            self._biases[key] = self.positions.score_bias(self.q_idx, k_idx)
        return self._biases[key]


class Attention(nn.Module):
    """Self-attention. x [B, T, D] -> [B, T, D]; q [B, H, T, Dh], k/v [B, G, S, Dh] with S = cached + T.

    q, k and v come from one fused projection ``qkv`` whose output is laid out [q (H*Dh) | k (G*Dh) | v (G*Dh)].
    """

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int, head_dim: int, *, layer_idx: int,
                 pattern: Pattern, qkv_bias: bool = False, out_bias: bool = False, scale: float | None = None,
                 kernel: str = "sdpa", dropout: float = 0.0, execution: str = "mask", block: int = 64):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.layer_idx, self.pattern = layer_idx, pattern
        self.scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
        self.kernel_name, self.kernel = kernel, KERNELS[kernel]
        self.dropout = dropout
        self.execution_name, self.execution, self.block = execution, EXECUTIONS[execution], block
        self.qkv = Linear(d_model, (n_heads + 2 * n_kv_heads) * head_dim, bias=qkv_bias)
        self.out = Linear(n_heads * head_dim, d_model, bias=out_bias)

    def forward(self, x: torch.Tensor, ctx: AttnContext, cache: KVCache | None = None) -> torch.Tensor:
        y = self.attend(x, ctx, cache)  # [B, H, T, Dh]
        B, _, T, _ = y.shape  # T from the heads: under sequence parallel x holds only this rank's T / tp
        return self.out(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))

    def attend(self, x: torch.Tensor, ctx: AttnContext, cache: KVCache | None = None) -> torch.Tensor:
        """The heads' outputs before the output projection: x [B, T, D] -> [B, H, T, Dh]."""
        H, G, Dh = self.n_heads, self.n_kv_heads, self.head_dim
        qkv = self.qkv(x)  # [B, T, (H+2G)*Dh] (all T: sequence parallel gathers the sequence here)
        B, T, _ = qkv.shape
        qkv = qkv.view(B, T, H + 2 * G, Dh).transpose(1, 2)  # [B, H+2G, T, Dh]
        qk, v = qkv.split([H + G, G], dim=1)  # v [B, G, T, Dh]
        q, k = ctx.rotation.rotate(qk).split([H, G], dim=1)  # q and k rotated in one pass: [B, H|G, T, Dh]
        k_start = ctx.q_start
        if cache is not None:
            k, v, k_start = cache.update(self.layer_idx, k, v, self.pattern.lookback)
        return self.execution(q, k, v, ctx, self.pattern, k_start, kernel=self.kernel, scale=self.scale,
                              dropout_p=self.dropout if self.training else 0.0, block=self.block)
