"""A study: one base model, a list of variants that each change a few config fields, and the training settings
every variant shares (same data, tokenizer, seed, token budget and schedule).

Two ways to write one:

- the command line: ``--vary FIELD=V1,V2`` (one axis; several ``--vary`` give their cross product) and
  ``--variant NAME:FIELD=V,FIELD=V`` (one named variant setting several fields at once). Tuple values such as
  ``pattern`` separate their items with ``+`` (``pattern=sliding+dense``).
- a YAML file::

    name: ffn
    claim: SwiGLU beats a GELU MLP at equal parameter count
    preset: llama-tiny            # or  config: path/to/config.yaml
    set: {d_model: 128}           # fields of every variant
    train: {steps: 300, seq_len: 128, warmup: 30}   # TrainConfig fields
    eval_lengths: [128, 256]
    vary: {norm: [rmsnorm, layernorm]}               # axes (cross product), and/or
    variants:                                        # named variants with several fields each
      swiglu: {ffn: glu, activation: silu, d_ff: 344}
      gelu: {ffn: mlp, activation: gelu, d_ff: 512}

Field names are dotted for sub-configs (``rope.theta``); a ``train.`` prefix changes a training setting for that
variant only (``train.warmup: 0``), for studies whose subject is the recipe. String values are converted to the
field's type as ``ModelConfig.with_path`` does; all fields of a variant are applied together and validated once.
"""
from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmarch.config import ModelConfig

TRAIN_PREFIX = "train."
# settings the runner owns: each variant gets its own run directory, one checkpoint, no samples
RUNNER_OWNED = ("out", "resume", "stop_at", "samples", "save_every", "keep_last")
STUDY_KEYS = ("name", "claim", "preset", "config", "set", "train", "eval_lengths", "vary", "variants", "command")


@dataclass(frozen=True)
class Variant:
    """One arm of a study: config ``fields`` (dotted path -> value) and training overrides ``train``."""

    name: str
    fields: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        items = [f"{k}={_show(v)}" for k, v in self.fields.items()]
        items += [f"{TRAIN_PREFIX}{k}={_show(v)}" for k, v in self.train.items()]
        return ", ".join(items) or "(base)"


@dataclass(frozen=True)
class Study:
    """What to train and compare. ``base`` is a preset name or a config file path."""

    base: str
    variants: tuple[Variant, ...]
    set: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)
    eval_lengths: tuple[int, ...] = ()
    name: str = "study"
    claim: str = ""
    command: str = ""

    def __post_init__(self) -> None:
        if not self.variants:
            raise ValueError("a study needs at least one variant: give --vary FIELD=V1,V2 or --variant NAME:FIELD=V")
        names = [v.name for v in self.variants]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"variant names must be unique; repeated: {dupes}")
        for n in names:
            if not re.fullmatch(r"[A-Za-z0-9_.=+,-]+", n):
                raise ValueError(f"variant name {n!r}: use letters, digits and _ . = + , - only (it names a folder)")
        for L in self.eval_lengths:
            if isinstance(L, bool) or not isinstance(L, int) or L <= 0:
                raise ValueError(f"eval_lengths: must be positive integers, got {L!r}")
        owned = sorted(set(self.train) & set(RUNNER_OWNED))
        owned += sorted(k for v in self.variants for k in v.train if k in RUNNER_OWNED)
        if owned:
            raise ValueError(f"train settings {owned} are chosen by the ablation runner per variant; remove them")

    def base_config(self) -> ModelConfig:
        from llmarch import presets

        cfg = ModelConfig.from_file(self.base) if _is_file(self.base) else presets.get(self.base)
        return apply_fields(cfg, self.set) if self.set else cfg

    def variant_config(self, variant: Variant) -> ModelConfig:
        """The validated config of ``variant`` (a ValueError naming the field when it is invalid)."""
        return apply_fields(self.base_config(), variant.fields)

    def train_settings(self, variant: Variant) -> dict[str, Any]:
        """TrainConfig fields of ``variant`` (without ``out``): the study's, then the variant's overrides."""
        return {**self.train, **variant.train}


def apply_fields(cfg: ModelConfig, fields: dict[str, Any]) -> ModelConfig:
    """``cfg`` with several dotted fields changed at once, validated once (so coupled fields such as ``ffn`` and
    its sub-config can change together). String values are converted to the field's type."""
    return cfg.with_overrides(fields)


def split_train(fields: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Separate ``train.X`` entries (training settings) from config fields."""
    model = {k: v for k, v in fields.items() if not k.startswith(TRAIN_PREFIX)}
    train = {k[len(TRAIN_PREFIX):]: v for k, v in fields.items() if k.startswith(TRAIN_PREFIX)}
    return model, train


def parse_vary(text: str) -> tuple[str, list[str]]:
    """``FIELD=V1,V2,...`` -> (FIELD, [V1, V2, ...])."""
    name, sep, values = text.partition("=")
    items = [v.strip() for v in values.split(",") if v.strip()]
    if not sep or not name.strip() or not items:
        raise ValueError(f"--vary {text!r}: expected FIELD=V1,V2,... (e.g. norm=rmsnorm,layernorm)")
    return name.strip(), items


def parse_variant(text: str) -> Variant:
    """``NAME:FIELD=V,FIELD=V`` -> a named variant setting several fields."""
    name, sep, body = text.partition(":")
    pairs = [p.strip() for p in body.split(",") if p.strip()]
    if not sep or not name.strip() or not all("=" in p for p in pairs):
        raise ValueError(f"--variant {text!r}: expected NAME:FIELD=V,FIELD=V (e.g. swiglu:ffn=glu,d_ff=344)")
    fields = dict(p.split("=", 1) for p in pairs)
    model, train = split_train({k.strip(): v.strip() for k, v in fields.items()})
    return Variant(name.strip(), model, train)


def axes_variants(axes: list[tuple[str, list[Any]]]) -> list[Variant]:
    """The cross product of axes; a variant is named by its settings (``norm=rmsnorm,position=alibi``)."""
    out = []
    for combo in itertools.product(*[[(k, v) for v in values] for k, values in axes]):
        model, train = split_train(dict(combo))
        out.append(Variant(",".join(f"{k}={_show(v)}" for k, v in combo), model, train))
    return out


def load_study(path: str | Path) -> Study:
    """Read a YAML (or JSON) study file; unknown keys are refused."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"study file {path} does not exist")
    data = yaml.safe_load(path.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping with keys {list(STUDY_KEYS)}")
    unknown = sorted(set(data) - set(STUDY_KEYS))
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {unknown}; known keys are {list(STUDY_KEYS)}")
    if ("preset" in data) == ("config" in data):
        raise ValueError(f"{path}: give exactly one of 'preset' or 'config'")
    base = data.get("preset") or str((path.parent / data["config"]).resolve())
    variants: list[Variant] = []
    for name, fields in (data.get("variants") or {}).items():
        if not isinstance(fields, dict):
            raise ValueError(f"{path}: variant {name!r} must be a mapping of FIELD: VALUE")
        model, train = split_train(fields)
        variants.append(Variant(str(name), model, train))
    vary = data.get("vary") or {}
    if vary:
        axes = [(k, v if isinstance(v, list) else [v]) for k, v in vary.items()]
        variants += axes_variants(axes)
    return Study(base=base, variants=tuple(variants), set=dict(data.get("set") or {}),
                 train=dict(data.get("train") or {}), eval_lengths=tuple(data.get("eval_lengths") or ()),
                 name=str(data.get("name") or path.stem), claim=str(data.get("claim") or ""),
                 command=str(data.get("command") or f"llmarch ablate --study {path}"))


def _is_file(base: str) -> bool:
    return base.endswith((".json", ".yaml", ".yml")) or Path(base).is_file()


def _show(value: Any) -> str:
    if isinstance(value, (tuple, list)):
        return "+".join(str(v) for v in value)
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}={_show(v)}" for k, v in value.items()) + "}"
    return str(value)


__all__ = ["Study", "Variant", "apply_fields", "parse_vary", "parse_variant", "axes_variants", "load_study",
           "split_train"]
