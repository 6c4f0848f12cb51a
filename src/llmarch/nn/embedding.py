"""The input embedding: token table, optional token types (segments), the stack's absolute positions, an optional
norm, dropout."""
from __future__ import annotations

import torch
from torch import nn


class Embeddings(nn.Module):
    """Token embedding (* scale) (+ token types) (+ absolute positions) (+ norm) + dropout. ids [B, T] -> [B, T, D].

    ``scale`` is sqrt(D) in Vaswani et al. 2017; ``type_vocab_size`` > 0 adds BERT's segment embeddings."""

    def __init__(self, vocab_size: int, d_model: int, norm: nn.Module, dropout: float, type_vocab_size: int = 0,
                 scale: float = 1.0):
        super().__init__()
        self.vocab_size, self.type_vocab_size, self.scale = vocab_size, type_vocab_size, scale
        self.tokens = nn.Embedding(vocab_size, d_model)
        self.token_types = nn.Embedding(type_vocab_size, d_model) if type_vocab_size else None
        self.norm = norm
        self.dropout = nn.Dropout(dropout)

    def forward(self, input_ids: torch.Tensor, positions: nn.Module, position_ids: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        x = self.tokens(input_ids)
        if self.scale != 1.0:
            x = x * self.scale
        if self.token_types is not None:
            if token_type_ids is None:
                token_type_ids = torch.zeros_like(input_ids)
            x = x + self.token_types(token_type_ids)
        absolute = positions.embed(position_ids)
        if absolute is not None:
            x = x + absolute.to(x.dtype)
        return self.dropout(self.norm(x))
