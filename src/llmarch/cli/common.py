"""Arguments and helpers shared by verbs: choosing a model by preset or config file, JSON output, tables."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Sequence

from llmarch.config import ModelConfig


def add_model_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    g = p.add_mutually_exclusive_group(required=required)
    g.add_argument("--preset", metavar="NAME", help="a named config (see `llmarch presets`)")
    g.add_argument("--config", metavar="FILE", help="a config file (.json or .yaml)")
    p.add_argument("--set", metavar="FIELD=VALUE", action="append", default=[],
                   help="override a config field (repeatable; dotted for sub-fields, e.g. rope.theta=1e6)")


def config_from_args(args: argparse.Namespace) -> ModelConfig:
    from llmarch import presets

    name = getattr(args, "name", None) or args.preset
    if name is not None and args.config is None:
        cfg = presets.get(name)
    elif args.config is not None:
        cfg = ModelConfig.from_file(args.config)
    else:
        raise ValueError("give a model: NAME, --preset NAME or --config FILE")
    return apply_sets(cfg, args.set)


def apply_sets(cfg: ModelConfig, items: list[str]) -> ModelConfig:
    """``cfg`` with ``--set FIELD=VALUE`` overrides."""
    for item in items:
        field, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set {item!r}: expected FIELD=VALUE")
        cfg = cfg.with_path(field.strip(), value.strip())
    return cfg


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
