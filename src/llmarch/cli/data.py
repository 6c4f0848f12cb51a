"""`llmarch data instructions --out FILE`: the instruction set built from the Python standard library (tasks,
difficulty levels, a held-out split by file), ready for `llmarch finetune --data FILE`."""
from __future__ import annotations


def add(sub) -> None:
    p = sub.add_parser("data", help="build data sets from local sources")
    verbs = p.add_subparsers(dest="what", metavar="WHAT", required=True)
    q = verbs.add_parser("instructions", help="prompted tasks from the standard library's functions")
    q.add_argument("--out", required=True, metavar="FILE", help="JSONL to write (one row per task example)")
    q.add_argument("--data", default=None, metavar="PATH", help="folder, glob or file of Python sources (default: "
                   "the Python standard library)")
    q.add_argument("--tasks", default=None, help="comma-separated subset of: implement, complete, docstring, name, "
                   "returns (default all)")
    q.add_argument("--max-lines", type=int, default=None, help="skip functions longer than N lines")
    q.add_argument("--val-fraction", type=float, default=0.1, help="share of files held out as split=test")
    q.add_argument("--split", choices=["all", "train", "test"], default="all", help="which rows to write")
    q.set_defaults(func=run)


def run(args) -> int:
    from collections import Counter
    from pathlib import Path

    from llmarch.instructions import TASKS, build_instructions, write_jsonl

    tasks = [t.strip() for t in args.tasks.split(",")] if args.tasks else None
    for t in tasks or []:
        TASKS[t]  # a ValueError listing the tasks
    if not 0 < args.val_fraction < 1:
        raise ValueError(f"--val-fraction must be in (0, 1), got {args.val_fraction}")
    out = Path(args.out)
    if out.exists():
        raise ValueError(f"--out {out} exists; choose a new file (nothing is overwritten)")
    from llmarch.data import corpus_files

    root, files = corpus_files(args.data)
    files = [f for f in files if f.suffix == ".py"]
    rows = build_instructions(files, root, tasks=tasks, val_fraction=args.val_fraction, max_lines=args.max_lines)
    if args.split != "all":
        rows = [r for r in rows if r["split"] == args.split]
    write_jsonl(rows, out)
    counts = Counter((r["split"], r["difficulty"]) for r in rows)
    print(f"wrote {len(rows)} rows to {out}: " + ", ".join(f"{s}/{d} {n}" for (s, d), n in sorted(counts.items())))
    return 0
