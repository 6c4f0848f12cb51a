"""ModelConfig: the one description of an architecture, validated at construction.

Every choice the supported architectures differ in is a field. Enumerated fields take a value from a registry in
``llmarch.nn`` (norms, activations, FFNs, position schemes, attention patterns, attention kernels), so the error for
an unknown value lists what is allowed. Configs are frozen; derive variants with :meth:`ModelConfig.replace`.
"""
from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

KINDS = ("decoder", "encoder", "encoder_decoder")
PLACEMENTS = ("pre", "post")
ROPE_SCALINGS = ("none", "linear", "dynamic", "llama3", "yarn")


def _fail(field_name: str, message: str) -> None:
    raise ValueError(f"{field_name}: {message}")


def _check_choice(field_name: str, value: Any, choices) -> None:
    if value not in choices:
        _fail(field_name, f"{value!r} is not allowed; choose one of {sorted(choices)}")


def _check_positive(field_name: str, value: Any, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        _fail(field_name, f"must be a positive integer, got {value!r}")


def _check_probability(field_name: str, value: float) -> None:
    if not 0.0 <= value < 1.0:
        _fail(field_name, f"must be in [0, 1), got {value!r}")


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

    def validate(self, head_dim: int) -> None:
        if self.theta <= 0:
            _fail("rope.theta", f"must be > 0, got {self.theta}")
        if not 0.0 < self.fraction <= 1.0:
            _fail("rope.fraction", f"must be in (0, 1], got {self.fraction}")
        rot = int(head_dim * self.fraction)
        if rot % 2 or rot == 0:
            _fail("rope.fraction", f"rotary dim head_dim*fraction = {head_dim}*{self.fraction} = {rot} must be even "
                  "and > 0; pick a fraction that gives an even number of dims")
        _check_choice("rope.scaling", self.scaling, ROPE_SCALINGS)
        if self.scaling != "none" and self.factor < 1.0:
            _fail("rope.factor", f"must be >= 1 for scaling {self.scaling!r}, got {self.factor}")
        if self.scaling in ("llama3", "yarn") and self.original_max_seq_len is None:
            _fail("rope.original_max_seq_len", f"is required for scaling {self.scaling!r}")
        if self.scaling == "llama3" and self.high_freq_factor <= self.low_freq_factor:
            _fail("rope.high_freq_factor", "must be greater than rope.low_freq_factor")


@dataclass(frozen=True)
class ModelConfig:
    """A complete architecture. Sizes use the glossary: D d_model, H n_heads, G n_kv_heads, Dh head_dim, F d_ff."""

    # --- overall shape --------------------------------------------------------------------------------------
    kind: str = "decoder"
    vocab_size: int = 32000
    d_model: int = 512
    n_layers: int = 8
    n_heads: int = 8
    n_kv_heads: int | None = None  # None = n_heads (MHA); 1 = MQA; otherwise GQA
    head_dim: int | None = None  # None = d_model // n_heads
    d_ff: int = 2048
    max_seq_len: int = 2048
    # --- normalisation --------------------------------------------------------------------------------------
    norm: str = "rmsnorm"  # registry nn.norm.NORMS
    norm_eps: float = 1e-5
    norm_bias: bool = True  # LayerNorm only
    norm_placement: str = "pre"  # pre | post
    embed_norm: bool = False  # a norm right after the token embeddings (BLOOM, BERT)
    final_norm: bool = True  # a norm after the last block (pre-norm models)
    # --- feed-forward ---------------------------------------------------------------------------------------
    ffn: str = "glu"  # registry nn.ffn.FFNS
    activation: str = "silu"  # registry nn.activation.ACTIVATIONS
    ffn_bias: bool = False
    # --- attention ------------------------------------------------------------------------------------------
    qkv_bias: bool = False
    out_bias: bool = False
    attn_scale: float | None = None  # None = 1/sqrt(Dh)
    attn_kernel: str = "sdpa"  # registry nn.kernels.KERNELS
    pattern: tuple[str, ...] = ("dense",)  # per-layer attention pattern, cycled over layers; nn.patterns.PATTERNS
    window: int | None = None  # W for the sliding pattern: a query sees itself and the W-1 keys before it
    # --- positions ------------------------------------------------------------------------------------------
    position: str = "rope"  # registry nn.position.POSITIONS
    rope: RopeConfig = field(default_factory=RopeConfig)
    # --- embeddings and head --------------------------------------------------------------------------------
    tie_embeddings: bool = False
    head_bias: bool = False
    dropout: float = 0.0
    attn_dropout: float = 0.0
    init_std: float = 0.02
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.rope, dict):
            object.__setattr__(self, "rope", RopeConfig(**self.rope))
        if isinstance(self.pattern, str):
            object.__setattr__(self, "pattern", (self.pattern,))
        elif isinstance(self.pattern, list):
            object.__setattr__(self, "pattern", tuple(self.pattern))
        self.validate()

    # --- derived sizes --------------------------------------------------------------------------------------
    @property
    def kv_heads(self) -> int:
        """G: key/value heads."""
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def dh(self) -> int:
        """Dh: per-head width."""
        return self.d_model // self.n_heads if self.head_dim is None else self.head_dim

    def layer_pattern(self, layer: int) -> str:
        """The attention pattern of layer ``layer`` (the ``pattern`` tuple cycled over layers)."""
        return self.pattern[layer % len(self.pattern)]

    # --- validation -----------------------------------------------------------------------------------------
    def validate(self) -> None:
        from llmarch import nn as lnn  # registries live with their components

        _check_choice("kind", self.kind, KINDS)
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "max_seq_len"):
            _check_positive(name, getattr(self, name))
        _check_positive("n_kv_heads", self.n_kv_heads, allow_none=True)
        _check_positive("head_dim", self.head_dim, allow_none=True)
        if self.head_dim is None and self.d_model % self.n_heads:
            _fail("n_heads", f"must divide d_model ({self.d_model} % {self.n_heads} != 0); or set head_dim")
        if self.n_heads % self.kv_heads:
            _fail("n_kv_heads", f"must divide n_heads ({self.n_heads} % {self.kv_heads} != 0)")
        _check_choice("norm", self.norm, lnn.NORMS)
        if self.norm_eps <= 0:
            _fail("norm_eps", f"must be > 0, got {self.norm_eps}")
        _check_choice("norm_placement", self.norm_placement, PLACEMENTS)
        _check_choice("ffn", self.ffn, lnn.FFNS)
        _check_choice("activation", self.activation, lnn.ACTIVATIONS)
        _check_choice("attn_kernel", self.attn_kernel, lnn.KERNELS)
        _check_choice("position", self.position, lnn.POSITIONS)
        if self.attn_scale is not None and self.attn_scale <= 0:
            _fail("attn_scale", f"must be > 0 or None, got {self.attn_scale}")
        if not self.pattern:
            _fail("pattern", "needs at least one entry")
        for p in self.pattern:
            _check_choice("pattern", p, lnn.PATTERNS)
        if len(self.pattern) not in (1, self.n_layers) and self.n_layers % len(self.pattern):
            _fail("pattern", f"has {len(self.pattern)} entries; give 1, n_layers ({self.n_layers}) or a divisor")
        if any(lnn.PATTERNS[p].needs_window for p in self.pattern):
            if self.window is None:
                _fail("window", "is required by the sliding pattern; set window to W > 0")
        if self.window is not None:
            _check_positive("window", self.window)
        if self.position == "rope":
            self.rope.validate(self.dh)
        for name in ("dropout", "attn_dropout"):
            _check_probability(name, getattr(self, name))
        if self.init_std <= 0:
            _fail("init_std", f"must be > 0, got {self.init_std}")
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            tok = getattr(self, name)
            if tok is not None and not 0 <= tok < self.vocab_size:
                _fail(name, f"{tok} is outside the vocabulary [0, {self.vocab_size})")

    # --- serialisation --------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["pattern"] = list(self.pattern)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown config field(s) {unknown}; known fields are {sorted(known)}")
        d = dict(d)
        if isinstance(d.get("rope"), dict):
            rope_known = {f.name for f in dataclasses.fields(RopeConfig)}
            bad = sorted(set(d["rope"]) - rope_known)
            if bad:
                raise ValueError(f"unknown rope field(s) {bad}; known fields are {sorted(rope_known)}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def to_file(self, path: str | Path) -> None:
        path = Path(path)
        if path.suffix in (".yaml", ".yml"):
            import yaml

            path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))
        else:
            path.write_text(self.to_json() + "\n")

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist")
        text = path.read_text()
        if path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping of config fields, got {type(data).__name__}")
        return cls.from_dict(data)

    def replace(self, **changes: Any) -> "ModelConfig":
        """A validated copy with some fields changed; ``rope`` accepts a dict of RopeConfig fields to change."""
        if isinstance(changes.get("rope"), dict):
            changes["rope"] = dataclasses.replace(self.rope, **changes["rope"])
        return dataclasses.replace(self, **changes)

    def with_path(self, dotted: str, value: Any) -> "ModelConfig":
        """Set one field by dotted name (``rope.theta``), converting a string value to the field's type."""
        head, _, rest = dotted.partition(".")
        names = {f.name: f for f in dataclasses.fields(self)}
        if head not in names:
            raise ValueError(f"unknown config field {head!r}; known fields are {sorted(names)}")
        if rest:
            sub = getattr(self, head)
            sub_fields = {f.name: f for f in dataclasses.fields(sub)}
            if rest not in sub_fields:
                raise ValueError(f"unknown config field {dotted!r}; known are {sorted(sub_fields)}")
            hints = typing.get_type_hints(type(sub))
            return self.replace(**{head: dataclasses.replace(sub, **{rest: _coerce(hints[rest], value, dotted)})})
        hints = typing.get_type_hints(type(self))
        return self.replace(**{head: _coerce(hints[head], value, dotted)})


def _coerce(hint: Any, value: Any, name: str) -> Any:
    """Convert a command-line string to the annotated type of a config field."""
    if not isinstance(value, str):
        return value
    if typing.get_origin(hint) is tuple:  # "dense,sliding" or "dense+sliding"
        return tuple(v for v in value.replace("+", ",").split(",") if v)
    args = typing.get_args(hint)
    if value.lower() in ("none", "null") and type(None) in args:
        return None
    base = next((a for a in args if a is not type(None)), hint) if args else hint
    if typing.get_origin(base) is tuple:
        return tuple(v for v in value.replace("+", ",").split(",") if v)
    try:
        if base is bool:
            if value.lower() not in ("true", "false", "1", "0"):
                raise ValueError
            return value.lower() in ("true", "1")
        if base is int:
            return int(value)
        if base is float:
            return float(value)
    except ValueError:
        raise ValueError(f"{name}: cannot read {value!r} as {getattr(base, '__name__', base)}") from None
    return value


__all__ = ["ModelConfig", "RopeConfig", "KINDS"]
