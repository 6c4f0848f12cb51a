"""What a Hugging Face model type must provide, the registry of them, and shared config helpers."""
from __future__ import annotations

from typing import Any, Sequence

from llmarch.config import ModelConfig
from llmarch.hf.convert import Rule, rule
from llmarch.registry import Registry


class Family:
    """One HF ``model_type``: config translation both ways and the weight rules.

    ``prefixes`` are optional leading names some checkpoints carry (``transformer.``); ``ignore`` are regexes of
    checkpoint tensors that hold nothing to load (buffers), each with its reason in a comment where declared."""

    model_type: str = ""
    architecture: str = ""
    prefixes: tuple[str, ...] = ()
    ignore: tuple[str, ...] = ()
    top_level: tuple[str, ...] = ("lm_head", "score")  # checkpoint names written without the model prefix (heads)
    sequence_classifier: str = ""  # transformers' *ForSequenceClassification class (head "last_token"); "" = none

    def to_config(self, hf: dict[str, Any]) -> ModelConfig:
        raise NotImplementedError

    def from_config(self, cfg: ModelConfig) -> dict[str, Any]:
        raise NotImplementedError

    def rules(self, cfg: ModelConfig) -> Sequence[Rule]:
        raise NotImplementedError

    def accepts(self, cfg: ModelConfig) -> str | None:
        """None if this model type can represent ``cfg`` exactly, else the first reason it cannot."""
        raise NotImplementedError

    def ignore_for(self, cfg: ModelConfig) -> tuple[str, ...]:
        """Regexes of checkpoint tensors to skip for this config (default: ``ignore``)."""
        return self.ignore

    def head_and_embedding(self, cfg: ModelConfig) -> tuple[str | None, str | None]:
        """Checkpoint names of the LM head and the token embedding (None where the family has no such rule)."""
        rules = {r.ours: r.theirs for r in self.rules(cfg.replace(tie_embeddings=False))}
        return rules.get("lm_head.weight", (None,))[0], rules.get("embed.tokens.weight", (None,))[0]

    def tie_from_weights(self, cfg: ModelConfig, tensors: dict[str, Any]) -> ModelConfig:
        """transformers' tying at load time (``PreTrainedModel.tie_weights``): a head the config ties is kept
        apart when the checkpoint holds it with values that differ from the embedding's."""
        if not cfg.tie_embeddings:
            return cfg
        head, embed = self.head_and_embedding(cfg)
        if head in tensors and embed in tensors and not same_values(tensors[head], tensors[embed]):
            return cfg.replace(tie_embeddings=False)
        return cfg

    def decoder_head_rules(self, cfg: ModelConfig) -> list[Rule]:
        """The decoder head's weights: an untied LM head, or the reward / classification ``score``."""
        if cfg.head == "last_token":
            return [rule("lm_head.score.weight", "score.weight")]
        return [] if cfg.tie_embeddings else [rule("lm_head.weight", "lm_head.weight")]

    def score_head_from_hf(self, hf: dict[str, Any], cfg: ModelConfig) -> ModelConfig:
        """``cfg`` with the head the ``architectures`` field names (a *ForSequenceClassification: last_token)."""
        if not self.sequence_classifier or self.sequence_classifier not in (hf.get("architectures") or ()):
            return cfg
        n_labels = len(hf["id2label"]) if hf.get("id2label") else int(hf.get("num_labels", 2))
        return cfg.replace(head="last_token", n_labels=n_labels)

    def score_head_to_hf(self, cfg: ModelConfig, hf: dict[str, Any]) -> dict[str, Any]:
        if cfg.head != "last_token":
            return hf
        labels = {str(i): f"LABEL_{i}" for i in range(cfg.n_labels)}
        return {**hf, "architectures": [self.sequence_classifier], "id2label": labels,
                "label2id": {v: int(k) for k, v in labels.items()}}

    def accepts_score_head(self, cfg: ModelConfig) -> str | None:
        if cfg.head == "last_token" and not self.sequence_classifier:
            return f"{self.model_type} has no *ForSequenceClassification mapped here for head='last_token'"
        return None

    def model_prefix(self) -> str:
        """The prefix written on save (the LM-head model's base-model attribute)."""
        return self.prefixes[0] if self.prefixes else ""


def same_values(a: Any, b: Any) -> bool:
    return a.shape == b.shape and bool((a == b).all())


FAMILIES: Registry[type[Family]] = Registry("HF model_type")


ACT_FROM_HF = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh",
               "gelu": "gelu", "relu": "relu", "silu": "silu", "swish": "silu", "quick_gelu": "quick_gelu",
               "tanh": "tanh", "sigmoid": "sigmoid"}
ACT_TO_HF = {"gelu_tanh": "gelu_pytorch_tanh", "gelu": "gelu", "relu": "relu", "silu": "silu",
             "quick_gelu": "quick_gelu", "tanh": "tanh", "sigmoid": "sigmoid"}


def activation_from_hf(name: str, field: str = "hidden_act") -> str:
    if not isinstance(name, str) or name not in ACT_FROM_HF:
        raise ValueError(f"config.json {field}={name!r} is not supported; supported: {sorted(ACT_FROM_HF)}")
    return ACT_FROM_HF[name]


def activation_to_hf(name: str) -> str:
    if name not in ACT_TO_HF:
        raise ValueError(f"activation {name!r} has no Hugging Face name; use one of {sorted(ACT_TO_HF)}")
    return ACT_TO_HF[name]


def require(hf: dict[str, Any], *names: str) -> list[Any]:
    missing = [n for n in names if n not in hf]
    if missing:
        raise ValueError(f"config.json lacks {missing} (model_type {hf.get('model_type')!r})")
    return [hf[n] for n in names]


def rope_dict(hf: dict[str, Any]) -> dict[str, Any]:
    """The RoPE mapping transformers keeps: a non-empty ``rope_scaling`` replaces ``rope_parameters`` whole."""
    key = "rope_scaling" if hf.get("rope_scaling") else "rope_parameters"
    merged = hf.get(key) or {}
    if not isinstance(merged, dict):
        raise ValueError(f"config.json {key} must be a mapping of rope settings, got {merged!r}")
    merged = dict(merged)
    if isinstance(merged.get("full_attention"), dict):  # per-layer-type layout
        merged = dict(merged["full_attention"])
    return merged


def rope_from_hf(hf: dict[str, Any], default_theta: float = 10000.0) -> dict[str, Any]:
    """RoPE settings with transformers' precedence (``RotaryEmbeddingConfigMixin.convert_rope_params_to_dict``):
    a non-empty ``rope_scaling`` replaces ``rope_parameters`` whole (they are not merged); inside the winner,
    ``rope_theta`` / ``partial_rotary_factor`` beat the top-level keys, which beat the config class's default
    theta; the type key is ``rope_type``, else ``type``; ``original_max_position_embeddings`` at the top level
    beats the one inside (else ``max_position_embeddings``). A per-layer-type dict is read at ``full_attention``."""
    merged = rope_dict(hf)
    theta = merged.get("rope_theta", hf.get("rope_theta", default_theta))
    if "original_max_position_embeddings" in hf:
        merged["original_max_position_embeddings"] = hf["original_max_position_embeddings"]
    if "partial_rotary_factor" not in merged and hf.get("partial_rotary_factor") is not None:
        merged["partial_rotary_factor"] = hf["partial_rotary_factor"]
    kind = merged.get("rope_type", merged.get("type", "default"))
    kinds = {"default": "none", "linear": "linear", "dynamic": "dynamic", "llama3": "llama3", "yarn": "yarn"}
    if kind not in kinds:
        raise ValueError(f"config.json rope type {kind!r} is not supported; supported: {sorted(kinds)}")
    rope: dict[str, Any] = dict(theta=float(theta), scaling=kinds[kind])
    fraction = merged.get("partial_rotary_factor")
    if fraction is not None:
        rope["fraction"] = float(fraction)
    if kind != "default":
        rope["factor"] = float(merged.get("factor", 1.0))
    if kind in ("llama3", "yarn"):
        rope["original_max_seq_len"] = int(merged.get("original_max_position_embeddings")
                                           or hf["max_position_embeddings"])
    if kind == "llama3":
        rope["low_freq_factor"] = float(merged["low_freq_factor"])
        rope["high_freq_factor"] = float(merged["high_freq_factor"])
    if kind == "yarn":
        for ours, theirs in (("beta_fast", "beta_fast"), ("beta_slow", "beta_slow"),
                             ("attention_factor", "attention_factor")):
            if merged.get(theirs) is not None:
                rope[ours] = float(merged[theirs])
        if "truncate" in merged:
            rope["truncate"] = bool(merged["truncate"])
    return rope


def rope_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """``rope_parameters`` as the installed transformers writes it."""
    r = cfg.rope
    kind = {"none": "default"}.get(r.scaling, r.scaling)
    out: dict[str, Any] = {"rope_type": kind, "rope_theta": r.theta}
    if r.fraction != 1.0:
        out["partial_rotary_factor"] = r.fraction
    if kind != "default":
        out["factor"] = r.factor
    if kind in ("llama3", "yarn"):
        out["original_max_position_embeddings"] = r.original_max_seq_len
    if kind == "llama3":
        out.update(low_freq_factor=r.low_freq_factor, high_freq_factor=r.high_freq_factor)
    if kind == "yarn":
        out.update(beta_fast=r.beta_fast, beta_slow=r.beta_slow, truncate=r.truncate)
        if r.attention_factor is not None:
            out["attention_factor"] = r.attention_factor
    return out


def tokens_from_hf(hf: dict[str, Any], vocab_size: int) -> dict[str, Any]:
    """bos/eos/pad ids (an id outside the vocabulary, or a list, is dropped: it cannot index our embedding)."""
    out = {}
    for ours, theirs in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                         ("pad_token_id", "pad_token_id")):
        v = hf.get(theirs)
        if isinstance(v, list):
            v = v[0] if v else None
        out[ours] = v if isinstance(v, int) and 0 <= v < vocab_size else None
    return out


def tokens_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    return {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "pad_token_id": cfg.pad_token_id}
