"""ConditionConfig: a condition fused into a decoder's hidden states (seed 002's conditioned LLM): a style id
through an embedding table and/or an instruction (token ids) through an encoder stack of our blocks, mean-pooled
over its non-pad tokens; the sum c [B, D] enters by addition to the inputs, a fusion layer, or adaptive norm (the
``fusion`` value, registry ``nn.condition_fusion.CONDITION_FUSIONS``)."""
from __future__ import annotations

from dataclasses import dataclass

from llmarch.validation import check_choice as _check_choice
from llmarch.validation import fail as _fail


@dataclass(frozen=True)
class ConditionConfig:
    """``n_styles`` style ids (a learned [n_styles, D] table; 0 = none); ``instruction_layers`` encoder blocks
    over an instruction's tokens (0 = no instruction input); ``fusion`` add | adanorm | fusion_layer."""

    n_styles: int = 4
    fusion: str = "add"
    instruction_layers: int = 0

    def __post_init__(self) -> None:
        from llmarch.nn.condition_fusion import CONDITION_FUSIONS

        for name in ("n_styles", "instruction_layers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                _fail(f"condition.{name}", f"must be an integer >= 0, got {value!r}")
        if not self.n_styles and not self.instruction_layers:
            _fail("condition", "needs a source: n_styles > 0 (style ids) or instruction_layers > 0 (an encoded "
                  "instruction)")
        _check_choice("condition.fusion", self.fusion, CONDITION_FUSIONS)


__all__ = ["ConditionConfig"]
