"""ConditionConfig: a condition fused into a decoder's hidden states (seed 002's conditioned LLM: a style id
through an embedding table), by addition to the inputs or by adaptive norm (a scale and shift of the final
hidden states computed from the condition, Perez et al. 2018 FiLM / Peebles & Xie 2023 adaLN)."""
from __future__ import annotations

from dataclasses import dataclass

from llmarch.validation import check_choice as _check_choice
from llmarch.validation import check_positive as _check_positive

CONDITION_FUSIONS = ("add", "adanorm")


@dataclass(frozen=True)
class ConditionConfig:
    """``n_styles`` condition ids (a learned [n_styles, D] table); ``fusion`` add | adanorm."""

    n_styles: int = 4
    fusion: str = "add"

    def __post_init__(self) -> None:
        _check_positive("condition.n_styles", self.n_styles)
        _check_choice("condition.fusion", self.fusion, CONDITION_FUSIONS)


__all__ = ["ConditionConfig", "CONDITION_FUSIONS"]
