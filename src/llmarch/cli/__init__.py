"""The ``llmarch`` command. Each verb lives in its own module under ``llmarch.cli`` with ``add(subparsers)``
registering its parser and a ``run(args)`` handler; this file only collects them."""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

# one module per verb (or family of verbs); order is the order of `llmarch --help`
VERB_MODULES = ["presets", "inspect", "compare", "plan", "diagram", "plot", "train", "ablate", "generate",
                "chat", "convert", "eval", "index"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmarch", description="Build, check, train, run and explain LLM "
                                     "architectures from one config.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for name in VERB_MODULES:
        importlib.import_module(f"llmarch.cli.{name}").add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, KeyError) as e:  # user errors: one clear line, no traceback
        if args.verbose:
            raise
        print(f"llmarch {args.verb}: error: {e}", file=sys.stderr)
        return 2
