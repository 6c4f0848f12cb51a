"""The ``llmarch`` command. Each verb lives in its own module under ``llmarch.cli`` with ``add(subparsers)``
registering its parser and a ``run(args)`` handler; this file only collects them."""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

# one module per verb (or family of verbs); order is the order of `llmarch --help`
VERB_MODULES = ["presets", "inspect", "compare", "plan", "diagram", "plot", "train", "ablate", "generate",
                "chat", "convert", "eval", "index", "finetune", "merge", "data"]


def build_parser() -> argparse.ArgumentParser:
    from llmarch import __version__

    parser = argparse.ArgumentParser(prog="llmarch", description="Build, check, train, run and explain LLM "
                                     "architectures from one config.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging and full tracebacks")
    parser.add_argument("--version", action="version", version=f"llmarch {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for name in VERB_MODULES:
        importlib.import_module(f"llmarch.cli.{name}").add(sub)
    return parser


def _chosen_parser(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    """The innermost (sub-)parser the command line selected: its usage fits a mistyped flag."""
    while True:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        name = getattr(args, subs[0].dest, None) if subs else None
        if name not in (subs[0].choices if subs else {}):
            return parser
        parser = subs[0].choices[name]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # `llmarch train --stpes 10`: train's usage and error, not the top-level one
        _chosen_parser(parser, args).error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's exit
        return code
    except BrokenPipeError:  # `llmarch ... --json | head`: the reader left; stop quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # Python flushes stdout at exit: let that go nowhere
        return 141  # 128 + SIGPIPE, what a shell reports for a command killed by a closed pipe
    except (ValueError, OSError, KeyError) as e:  # user errors: one clear line, no traceback
        if args.verbose:
            raise
        print(f"llmarch {args.verb}: error: {_message(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"llmarch {args.verb}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - a bug or an unforeseen input: one line, the traceback on request
        if args.verbose:
            raise
        print(f"llmarch {args.verb}: error: {type(e).__name__}: {_message(e)} (run `llmarch -v {args.verb} ...` "
              "for the traceback)", file=sys.stderr)
        return 1


def _message(e: BaseException) -> str:
    text = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
    return " ".join(text.split()) or type(e).__name__
