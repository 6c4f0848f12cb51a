"""Turning next-token logits into a token: greedy, temperature, top-k, nucleus (top-p), min-p and a repetition
penalty. :class:`Sampling` bundles the settings and gives both the filtered distribution (speculative decoding
needs it) and a drawn token."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None,
                  min_p: float | None = None) -> torch.Tensor:
    """Set logits outside the top-k / smallest nucleus of mass top_p / below min_p * p_max to -inf. [B, V]."""
    if top_k is not None:
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k <= 0:
            raise ValueError(f"top_k must be a positive integer, got {top_k}")
        k = min(top_k, logits.shape[-1])
        kth = logits.topk(k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p  # mass before this token already reaches top_p
        drop[..., 0] = False
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    if min_p is not None:
        if isinstance(min_p, bool) or not isinstance(min_p, (int, float)) or not 0.0 < min_p <= 1.0:
            raise ValueError(f"min_p must be in (0, 1], got {min_p}")
        probs = logits.softmax(-1)  # Nguyen et al. 2024: keep tokens with p >= min_p * p_max
        logits = logits.masked_fill(probs < min_p * probs.amax(-1, keepdim=True), float("-inf"))
    return logits


def apply_repetition_penalty(logits: torch.Tensor, ids: torch.Tensor, penalty: float,
                             mask: torch.Tensor | None = None) -> torch.Tensor:
    """CTRL's penalty (Keskar et al. 2019): logits of tokens already in ``ids`` [B, S] are divided by ``penalty``
    when positive and multiplied when negative. ``mask`` [B, S] (1 = real token) leaves padding out, and ids the
    head cannot predict (an image token past the vocabulary) are left out too. [B, V]."""
    if penalty == 1.0:
        return logits
    weight = mask.to(logits.dtype) if mask is not None else torch.ones_like(ids, dtype=logits.dtype)
    V = logits.shape[-1]
    weight = weight * (ids < V).to(logits.dtype)
    seen = torch.zeros_like(logits).scatter_add_(1, ids.clamp(max=V - 1), weight) > 0  # padded slots never count
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


@dataclass(frozen=True)
class Sampling:
    """Decoding settings. Greedy when ``temperature == 0``."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        for name in ("temperature", "repetition_penalty"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0 (1.0 = off), got {self.repetition_penalty}")
        filter_logits(torch.zeros(1, 2), self.top_k, self.top_p, self.min_p)  # validates the filters

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def adjust(self, logits: torch.Tensor, ids: torch.Tensor | None = None,
               mask: torch.Tensor | None = None) -> torch.Tensor:
        """Penalty, temperature and filters applied to fp32 logits [B, V] (``ids`` [B, S]: tokens so far)."""
        logits = logits.float()
        if ids is not None:
            logits = apply_repetition_penalty(logits, ids, self.repetition_penalty, mask)
        if self.greedy:
            return logits
        return filter_logits(logits / self.temperature, self.top_k, self.top_p, self.min_p)

    def probs(self, logits: torch.Tensor, ids: torch.Tensor | None = None,
              mask: torch.Tensor | None = None) -> torch.Tensor:
        """The distribution tokens are drawn from, [B, V] (one-hot at the argmax when greedy)."""
        adjusted = self.adjust(logits, ids, mask)
        if self.greedy:
            return torch.nn.functional.one_hot(adjusted.argmax(-1), adjusted.shape[-1]).float()
        return adjusted.softmax(-1)

    def sample(self, logits: torch.Tensor, ids: torch.Tensor | None = None, mask: torch.Tensor | None = None,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """logits [B, V] -> token ids [B]."""
        adjusted = self.adjust(logits, ids, mask)
        if self.greedy:
            return adjusted.argmax(dim=-1)
        return torch.multinomial(adjusted.softmax(-1), 1, generator=generator).squeeze(-1)


def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None,
                min_p: float | None = None) -> torch.Tensor:
    """logits [B, V] -> token ids [B]. Greedy (argmax) when temperature == 0."""
    return Sampling(temperature, top_k, top_p, min_p).sample(logits, generator=generator)
