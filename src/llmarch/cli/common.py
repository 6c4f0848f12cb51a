"""Arguments and helpers shared by verbs: choosing a model by preset or config file, JSON output, tables."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

from llmarch.config import ModelConfig


MODEL_SPEC = ("a preset name, a config file (.json/.yaml), a Hugging Face model directory, an llmarch checkpoint "
              "directory or a training run directory")


def add_model_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    g = p.add_mutually_exclusive_group(required=required)
    g.add_argument("--preset", metavar="NAME", help="a named config (see `llmarch presets`)")
    g.add_argument("--config", metavar="FILE", help="a config file (.json or .yaml)")
    p.add_argument("--set", metavar="FIELD=VALUE", action="append", default=[],
                   help="override a config field (repeatable; dotted for sub-fields, e.g. rope.theta=1e6)")


def model_spec(args: argparse.Namespace) -> str | None:
    """What the user named the model with: the positional NAME, ``--preset`` or ``--config``."""
    return getattr(args, "name", None) or args.preset or args.config


def preset_name(args: argparse.Namespace) -> str | None:
    """The preset the model was named by, or None when it came from a file or a directory."""
    from llmarch import presets

    spec = model_spec(args)
    return spec if spec and not Path(spec).exists() and spec.lower() in presets.names() else None


def resolve_model(spec: str, dirs: bool = True) -> ModelConfig:
    """The config of ``spec``: a preset name | a config file | a Hugging Face directory | an llmarch checkpoint
    directory | a training run directory (its newest good checkpoint). ``dirs=False`` accepts names and files only."""
    from llmarch import presets

    path = Path(spec)
    if path.is_dir():
        if not dirs:
            raise ValueError(f"{spec} is a directory; give a config file (.json/.yaml) or a preset here (to start "
                             f"from a checkpoint's weights use --from {spec})")
        from llmarch.train.checkpoints import resolve_model_dir

        model_dir = resolve_model_dir(path)  # a model directory, or a run's newest good checkpoint
        if not is_llmarch_dir(model_dir):
            from llmarch.hf import config_from_hf

            return config_from_hf(model_dir)
        return ModelConfig.from_file(model_dir / "config.json")
    if path.is_file():
        if path.name == "config.json" and not is_llmarch_dir(path.parent):
            raise ValueError(f"{spec} is a Hugging Face config.json: pass its directory {path.parent} instead (it is "
                             f"read as Hugging Face reads it; to train from its weights: --from {path.parent})")
        return ModelConfig.from_file(path)
    if path.suffix in (".json", ".yaml", ".yml") or len(path.parts) > 1:
        raise FileNotFoundError(f"{spec} does not exist; expected {MODEL_SPEC}")
    return presets.get(spec)


def is_llmarch_dir(path: Path) -> bool:
    """An llmarch model directory (config.json of ModelConfig fields); a Hugging Face one has ``model_type``."""
    from llmarch.checkpoint import is_llmarch_dir as llmarch_dir

    try:
        return llmarch_dir(path)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path / 'config.json'} is not valid JSON: {e}") from None


def model_title(args: argparse.Namespace) -> str:
    """A short label for the model named on the command line (preset name, file stem or directory name)."""
    spec = model_spec(args) or "default config"
    path = Path(spec)
    return path.resolve().name if path.is_dir() else path.stem if path.is_file() else spec


def config_from_args(args: argparse.Namespace, dirs: bool = False) -> ModelConfig:
    """The config named by NAME / ``--preset`` / ``--config`` (see :func:`resolve_model`; ``dirs`` says whether
    model and run directories are accepted) with the ``--set`` overrides applied."""
    spec = model_spec(args)
    if spec is None:
        raise ValueError(f"give a model: NAME, --preset NAME or --config FILE ({MODEL_SPEC})")
    return apply_sets(resolve_model(spec, dirs=dirs), args.set)


def apply_sets(cfg: ModelConfig, items: list[str]) -> ModelConfig:
    """``cfg`` with the ``--set FIELD=VALUE`` overrides: every override first, then one validation
    (pattern=sliding needs window=W too)."""
    changes = {}
    for item in items:
        field, sep, value = item.partition("=")
        if not sep or not field.strip():
            raise ValueError(f"--set {item!r}: expected FIELD=VALUE")
        changes[field.strip()] = value.strip()
    return cfg.with_overrides(changes) if changes else cfg


def add_json_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print JSON for machines instead of a table")


def emit_json(obj: Any) -> None:
    json.dump(obj, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")


def table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    """A plain aligned text table (numbers right-aligned)."""
    cells = [[str(h) for h in header]] + [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    numeric = [all(_is_num(r[i]) for r in rows) if rows else False for i in range(len(header))]
    lines = []
    for j, r in enumerate(cells):
        lines.append("  ".join(c.rjust(w) if numeric[i] and j else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))))
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(line.rstrip() for line in lines)


def _is_num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _fmt(x: Any) -> str:
    if isinstance(x, float):
        return f"{x:.4g}"
    if isinstance(x, int) and not isinstance(x, bool):
        return f"{x:,}"
    return str(x)


def human(n: float) -> str:
    """1234567 -> '1.23M'."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:.3g}" if isinstance(n, float) else str(n)


DTYPES = ("fp32", "bf16")


def add_dtype_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", choices=DTYPES, default="fp32",
                   help="the model's dtype for inference (bf16: half the bytes to stream; on a CPU without bf16 "
                        "products it decodes through native bf16 layers)")


def load_for_inference(path, dtype: str):
    """``llmarch.checkpoint.load_model(path)`` in eval mode, in ``dtype`` ("fp32" | "bf16"); a quantized checkpoint
    keeps its own types (its activations are fp32), so asking it for bf16 is an error that says so."""
    import torch

    from llmarch.checkpoint import load_model

    if dtype == "bf16" and (Path(path) / "quantization.json").is_file():
        raise ValueError(f"--dtype bf16: {path} is quantized (quantization.json); its layers run with fp32 "
                         "activations: drop --dtype")
    return load_model(path, dtype=torch.bfloat16 if dtype == "bf16" else None).eval()

