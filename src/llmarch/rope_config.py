"""RopeConfig: rotary position embedding settings and their context-extension scalings, validated against the
head width they rotate."""
from __future__ import annotations

from dataclasses import dataclass

from llmarch.validation import check_choice as _check_choice
from llmarch.validation import check_field_types
from llmarch.validation import check_positive as _check_positive
from llmarch.validation import fail as _fail

ROPE_SCALINGS = ("none", "linear", "dynamic", "llama3", "yarn")


@dataclass(frozen=True)
class RopeConfig:
    """Rotary position embedding settings (Su et al. 2021) and context-extension scalings.

    ``fraction`` rotates only the first ``fraction * head_dim`` dims of each head (partial rotary).
    ``scaling``: none | linear (position interpolation) | dynamic (dynamic NTK) | llama3 | yarn.
    """

    theta: float = 10000.0
    fraction: float = 1.0
    scaling: str = "none"
    factor: float = 1.0
    original_max_seq_len: int | None = None
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    beta_fast: float = 32.0  # yarn
    beta_slow: float = 1.0  # yarn
    attention_factor: float | None = None  # yarn: scale of cos/sin; None = 0.1 ln(factor) + 1
    truncate: bool = True  # yarn: round the correction range to whole dims

    def __post_init__(self) -> None:
        check_field_types(self, "rope.")

    def validate(self, head_dim: int) -> None:
        if self.theta <= 0:
            _fail("rope.theta", f"must be > 0, got {self.theta}")
        if not 0.0 < self.fraction <= 1.0:
            _fail("rope.fraction", f"must be in (0, 1], got {self.fraction}")
        rot = int(head_dim * self.fraction)
        if rot % 2 or rot == 0:
            _fail("rope.fraction", f"rotary dim head_dim*fraction = {head_dim}*{self.fraction} = {rot} must be even "
                  "and > 0 (head_dim is the head_dim field, else d_model / n_heads); pick a fraction, d_model, "
                  "n_heads or head_dim that gives an even number of dims")
        _check_choice("rope.scaling", self.scaling, ROPE_SCALINGS)
        if self.scaling != "none" and self.factor < 1.0:
            _fail("rope.factor", f"must be >= 1 for scaling {self.scaling!r}, got {self.factor}")
        if self.scaling in ("llama3", "yarn") and self.original_max_seq_len is None:
            _fail("rope.original_max_seq_len", f"is required for scaling {self.scaling!r}")
        _check_positive("rope.original_max_seq_len", self.original_max_seq_len, allow_none=True)
        if self.scaling == "llama3":
            if self.low_freq_factor <= 0:
                _fail("rope.low_freq_factor", f"must be > 0 (it divides original_max_seq_len), got "
                      f"{self.low_freq_factor}")
            if self.high_freq_factor <= self.low_freq_factor:
                _fail("rope.high_freq_factor", "must be greater than rope.low_freq_factor")
        if self.scaling == "yarn":
            if self.theta <= 1:
                _fail("rope.theta", f"must be > 1 for yarn scaling (its correction range divides by ln theta), "
                      f"got {self.theta}")
            for name in ("beta_fast", "beta_slow"):
                if getattr(self, name) <= 0:
                    _fail(f"rope.{name}", f"must be > 0, got {getattr(self, name)}")
            if self.attention_factor is not None and self.attention_factor <= 0:
                _fail("rope.attention_factor", f"must be > 0 or None, got {self.attention_factor}")
