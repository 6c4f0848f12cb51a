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

from llmarch.attention_config import MLAConfig, SparseConfig
from llmarch.linear_config import LinearMixerConfig
from llmarch.moe_config import MoEConfig
from llmarch.retrieval_config import RetrievalConfig
from llmarch.rope_config import ROPE_SCALINGS, RopeConfig  # noqa: F401  (re-exported)
from llmarch.condition_config import ConditionConfig
from llmarch.vision_config import VisionConfig
from llmarch.ssm_config import MixtureConfig, SSMConfig
from llmarch.validation import check_choice as _check_choice
from llmarch.validation import check_positive as _check_positive
from llmarch.validation import check_field_types, read_cli_value, sub_config
from llmarch.validation import check_probability as _check_probability
from llmarch.validation import fail as _fail

KINDS = ("decoder", "encoder", "encoder_decoder")
PLACEMENTS = ("pre", "post")
DECODER_HEADS = ("lm", "last_token")  # heads a decoder may have (the others read an encoder's first position)




SUB_CONFIGS = {"rope": RopeConfig, "sparse": SparseConfig, "mla": MLAConfig, "moe": MoEConfig,
               "retrieval": RetrievalConfig, "vision": VisionConfig, "condition": ConditionConfig,
               "linear": LinearMixerConfig, "ssm": SSMConfig, "mixture": MixtureConfig}


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
    attn_scale_by_layer: bool = False  # scores further divided by (layer + 1) (GPT-2's scale_attn_by_inverse_layer_idx)
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
    fp16_clamp: bool = False  # clamp the fp16 residual stream after each sublayer (T5; nn/block.py Fp16Clamp)
    init_std: float = 0.02
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    # --- encoders and encoder-decoders ----------------------------------------------------------------------
    n_decoder_layers: int | None = None  # encoder_decoder: decoder depth (None = n_layers)
    type_vocab_size: int = 0  # token-type (segment) embeddings, BERT: 2; 0 = none
    position_offset: int = 0  # added to default position ids (RoBERTa: pad_token_id + 1)
    scale_embeddings: bool = False  # token embeddings * sqrt(D) (Vaswani et al. 2017, sec. 3.4)
    scale_head: bool = False  # final hidden states * D**-0.5 before the LM head (T5 with a tied head)
    head: str = "lm"  # registry nn.heads.HEADS: lm | mlm | pretraining (mlm + nsp) | classification | last_token
    n_labels: int = 2  # classification / last_token head outputs (a reward model: 1)
    rel_buckets: int = 32  # position "relative": relative-distance buckets
    rel_max_distance: int = 128  # position "relative": distances from here on share the last bucket
    decoder_start_token_id: int | None = None  # encoder_decoder: first decoder token when generating
    # --- sparse attention and latent attention (issue 6) ----------------------------------------------------
    sparse: SparseConfig = field(default_factory=SparseConfig)  # parameters of the sparse patterns
    mixer: str = "attention"  # registry nn.mixers.MIXERS: attention | longformer (global projections) | latent
    # per-layer mixer schedule cycled over layers, like ``pattern`` (transformers' ``layer_types``); empty = ``mixer``
    # in every layer. E.g. ("gated_delta", "gated_delta", "gated_delta", "attention") for a 3:1 hybrid.
    layer_mixers: tuple[str, ...] = ()
    mla: MLAConfig = field(default_factory=MLAConfig)  # used when mixer == "latent"
    linear: LinearMixerConfig = field(default_factory=LinearMixerConfig)  # sizes of the gated_delta layers
    ssm: SSMConfig = field(default_factory=SSMConfig)  # Mamba-2 sizes; the form of every linear-time mixer
    mixture: MixtureConfig = field(default_factory=MixtureConfig)  # used by mixer "mixture"
    # --- mixture of experts ---------------------------------------------------------------------------------
    moe: MoEConfig | None = None  # set with ffn="moe"; None for dense models

    # --- early exit -----------------------------------------------------------------------------------------------
    exit_heads: bool = False  # decoders: a learned exit classifier per layer (AdaptiveLLM); see nn/exits.py

    # --- retrieval ------------------------------------------------------------------------------------------
    retrieval: RetrievalConfig | None = None  # RETRO chunked cross-attention to retrieved neighbours; None = off
    # --- images and conditions ------------------------------------------------------------------------------
    vision: VisionConfig | None = None  # a ViT tower + image-text fusion (LLaVA projector, gated cross-attn)
    condition: ConditionConfig | None = None  # a style id and/or encoded instruction fused into the hidden states


    def __post_init__(self) -> None:
        for name, cls in SUB_CONFIGS.items():
            nullable = name in ("moe", "retrieval", "vision", "condition")
            hint = "; to turn rotary embeddings off set position='none'" if name == "rope" else ""
            object.__setattr__(self, name, sub_config(cls, getattr(self, name), name, nullable, hint))
        check_field_types(self)  # types first (one rule for every field), then the values
        self.validate()

    # --- derived sizes --------------------------------------------------------------------------------------
    @property
    def kv_heads(self) -> int:
        """G: key/value heads."""
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def input_vocab_size(self) -> int:
        """Rows of the token embedding: V plus ``vision.extra_token_rows`` (ids the head never predicts)."""
        return self.vocab_size + (self.vision.extra_token_rows if self.vision is not None else 0)

    @property
    def dh(self) -> int:
        """Dh: per-head width."""
        return self.d_model // self.n_heads if self.head_dim is None else self.head_dim

    @property
    def rope_head_dim(self) -> int:
        """The per-head width the rotary embedding sees (MLA rotates only its decoupled rope part)."""
        return self.mla.qk_rope_head_dim if self.mixer == "latent" else self.dh

    def layer_mixer(self, layer: int) -> str:
        """The mixer of layer ``layer`` (``layer_mixers`` cycled over layers, or ``mixer`` when it is empty)."""
        return self.layer_mixers[layer % len(self.layer_mixers)] if self.layer_mixers else self.mixer

    @property
    def mixers(self) -> tuple[str, ...]:
        """The distinct mixers of the model, in layer order."""
        # one cycle of the schedule holds every mixer (never a loop over n_layers, which may be huge)
        cycle = min(self.n_layers, len(self.layer_mixers) or 1)
        return tuple(dict.fromkeys(self.layer_mixer(i) for i in range(cycle)))

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
        self.validate_sparse_and_mixer()
        if self.position == "rope":
            self.rope.validate(self.rope_head_dim)
        for name in ("dropout", "attn_dropout"):
            _check_probability(name, getattr(self, name))
        if self.init_std <= 0:
            _fail("init_std", f"must be > 0, got {self.init_std}")
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            tok = getattr(self, name)
            if tok is not None and not 0 <= tok < self.vocab_size:
                _fail(name, f"{tok} is outside the vocabulary [0, {self.vocab_size})")
        validate_encoder_fields(self)
        if self.exit_heads and self.kind != "decoder":
            _fail("exit_heads", f"learned exits are for decoders (kind is {self.kind!r}); set exit_heads=False")
        self.validate_moe()
        if self.retrieval is not None:
            self.retrieval.validate(self)
        if self.vision is not None:
            self.vision.validate_fusion(self)
        if self.condition is not None and (self.kind != "decoder" or self.vision or self.retrieval):
            _fail("condition", "a condition needs a plain decoder (kind='decoder', no vision or retrieval)")

    def validate_sparse_and_mixer(self) -> None:
        from llmarch import nn as lnn

        self.sparse.validate()
        _check_choice("mixer", self.mixer, lnn.MIXERS)
        for m in self.layer_mixers:
            _check_choice("layer_mixers", m, lnn.MIXERS)
        if len(self.layer_mixers) > 1 and self.n_layers % len(self.layer_mixers):
            _fail("layer_mixers", f"has {len(self.layer_mixers)} entries; give n_layers ({self.n_layers}) or a "
                  "divisor, cycled over the layers")
        if self.mixer == "latent":
            self.mla.validate()
        if "gated_delta" in self.mixers:
            self.linear.validate()
        self.ssm.validate_form()
        if "mamba2" in self.mixers:
            self.ssm.validate(self.d_model)
        if "mixture" in self.mixers:
            self.mixture.validate()
        if self.mixer == "longformer" and not all(hasattr(lnn.PATTERNS[p], "global_slots") for p in self.pattern):
            _fail("mixer", f"'longformer' projects global rows separately; every layer's pattern needs global "
                  f"tokens (pattern='longformer'), got {self.pattern}")
        if self.sparse.execution == "blocks" and self.attn_dropout > 0:
            _fail("sparse.execution", "'blocks' has no attention dropout; set attn_dropout=0 or execution='mask'")

    def validate_moe(self) -> None:
        if (self.ffn == "moe") != (self.moe is not None):
            _fail("moe", "set ffn='moe' together with moe=MoEConfig(...) (and neither for a dense model); "
                  f"got ffn={self.ffn!r}, moe={'set' if self.moe is not None else None}")
        if self.moe is not None:
            if self.ffn_bias:
                _fail("ffn_bias", "experts have no biases; set ffn_bias=False for an MoE model")
            self.moe.validate(self.n_layers)

    # --- serialisation --------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["pattern"] = list(self.pattern)
        d["layer_mixers"] = list(self.layer_mixers)
        if self.retrieval is not None:
            d["retrieval"]["cca_layers"] = list(self.retrieval.cca_layers)
        if self.vision is not None:
            d["vision"] = self.vision.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        if not isinstance(d, dict):
            raise ValueError(f"config: expected a mapping of config fields, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown config field(s) {unknown}; known fields are {sorted(known)}")
        d = dict(d)
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
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            raise ValueError(f"{path}: not UTF-8 text; a config is a .json or .yaml file") from None
        if path.suffix in (".yaml", ".yml"):
            import yaml

            try:
                data = yaml.safe_load(text)
            except yaml.YAMLError as e:
                raise ValueError(f"{path}: not valid YAML: {' '.join(str(e).split())}") from None
        else:
            try:
                data = json.loads(text)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping of config fields, got {type(data).__name__}")
        return cls.from_dict(data)

    def replace(self, **changes: Any) -> "ModelConfig":
        """A validated copy with some fields changed; a sub-config (``rope``, ``sparse``, ``mla``, ``moe``,
        ``retrieval``) accepts a dict of its fields to change."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise ValueError(f"unknown config field(s) {unknown}; known fields are {sorted(known)}")
        for name in SUB_CONFIGS:
            current = getattr(self, name)
            if isinstance(changes.get(name), dict) and current is not None:  # checked and built in __post_init__
                changes[name] = {**{f.name: getattr(current, f.name) for f in dataclasses.fields(current)},
                                 **changes[name]}
        return dataclasses.replace(self, **changes)

    def with_path(self, dotted: str, value: Any) -> "ModelConfig":
        """Set one field by dotted name (``rope.theta``), converting a string value to the field's type."""
        return self.with_overrides({dotted: value})

    def with_overrides(self, changes: dict[str, Any]) -> "ModelConfig":
        """A copy with fields set by dotted name (``{"pattern": "sliding", "window": "64", "rope.theta": 1e6}``),
        command-line strings converted to each field's type; validated once, after every change is applied."""
        d = self.to_dict()
        for dotted, value in changes.items():
            head, _, rest = dotted.partition(".")
            names = {f.name: f for f in dataclasses.fields(self)}
            if head not in names:
                raise ValueError(f"unknown config field {head!r}; known fields are {sorted(names)}")
            hints = typing.get_type_hints(type(self))
            if not rest:
                d[head] = read_cli_value(hints[head], value, dotted)
                continue
            sub_cls = SUB_CONFIGS.get(head)
            if sub_cls is None:
                raise ValueError(f"{dotted}: {head} has no sub-fields; set {head}=VALUE")
            if not isinstance(d.get(head), dict):
                d[head] = {}  # a sub-config that is off (moe, retrieval): start from its defaults
            sub_fields = {f.name for f in dataclasses.fields(sub_cls)}
            if rest not in sub_fields:
                raise ValueError(f"unknown config field {dotted!r}; known are {sorted(sub_fields)}")
            d[head][rest] = read_cli_value(typing.get_type_hints(sub_cls)[rest], value, dotted)
        return type(self).from_dict(d)


def validate_encoder_fields(cfg: ModelConfig) -> None:
    """The fields of encoders and encoder-decoders (token types, heads, T5 buckets, decoder depth)."""
    from llmarch.nn.heads import HEADS

    _check_positive("n_decoder_layers", cfg.n_decoder_layers, allow_none=True)
    if cfg.n_decoder_layers is not None and cfg.kind != "encoder_decoder":
        _fail("n_decoder_layers", f"only applies to kind='encoder_decoder' (kind is {cfg.kind!r}); leave it None")
    for name in ("type_vocab_size", "position_offset"):
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            _fail(name, f"must be an integer >= 0, got {value!r}")
    _check_choice("head", cfg.head, HEADS)
    if cfg.head not in DECODER_HEADS and cfg.kind != "encoder":
        _fail("head", f"{cfg.head!r} needs kind='encoder' (kind is {cfg.kind!r}); decoders use one of "
              f"{list(DECODER_HEADS)}")
    if cfg.head == "last_token" and cfg.kind != "decoder":
        _fail("head", f"'last_token' scores a decoder's last real token; it needs kind='decoder' (kind is "
              f"{cfg.kind!r})")
    _check_positive("n_labels", cfg.n_labels)
    if cfg.position == "relative":
        _check_positive("rel_buckets", cfg.rel_buckets)
        if cfg.rel_buckets < 4 or cfg.rel_buckets % 2:
            _fail("rel_buckets", f"must be even and >= 4 (half per direction, half of those exact), "
                  f"got {cfg.rel_buckets}")
        _check_positive("rel_max_distance", cfg.rel_max_distance)
        if cfg.rel_max_distance <= cfg.rel_buckets // 2:
            _fail("rel_max_distance", f"must exceed rel_buckets // 2 = {cfg.rel_buckets // 2} (the exact range of "
                  "the causal direction)")
    tok = cfg.decoder_start_token_id
    if tok is not None and not 0 <= tok < cfg.vocab_size:
        _fail("decoder_start_token_id", f"{tok} is outside the vocabulary [0, {cfg.vocab_size})")


__all__ = ["ModelConfig", "MoEConfig", "RopeConfig", "SparseConfig", "MLAConfig", "RetrievalConfig", "VisionConfig",
           "ConditionConfig", "LinearMixerConfig", "SSMConfig", "MixtureConfig", "KINDS"]
