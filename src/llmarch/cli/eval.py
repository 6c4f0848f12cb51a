"""`llmarch eval`: perplexity, bits per byte and tokens/s of a checkpoint on text (``--data``), or
lm-evaluation-harness tasks (``--tasks``, optional extra ``llmarch[eval]``)."""
from __future__ import annotations

from llmarch.cli.common import add_json_flag, emit_json, table


def add(sub) -> None:
    p = sub.add_parser("eval", help="perplexity / bits per byte on text, or lm-evaluation-harness tasks")
    p.add_argument("--checkpoint", metavar="DIR", required=True, help="a training run directory (its newest good "
                   "checkpoint), a checkpoint directory or a Hugging Face directory, with its tokenizer")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--data", metavar="PATH", help="a text file, a folder or a glob (like train's --data); each "
                      "file is one document")
    what.add_argument("--tasks", metavar="NAMES", help="comma-separated lm-evaluation-harness tasks")
    p.add_argument("--seq-len", type=int, help="tokens per window (default: the model's context)")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward pass (default 8)")
    p.add_argument("--max-data-mb", type=float, help="use only the first N MB of the files")
    p.add_argument("--include-path", metavar="DIR", help="--tasks: a folder of task YAML files of your own")
    p.add_argument("--limit", type=float, help="--tasks: examples per task (a fraction when < 1)")
    add_json_flag(p)
    p.set_defaults(func=run)


def _load(checkpoint: str):
    from llmarch.checkpoint import load_model
    from llmarch.tokenizer import load_tokenizer_for
    from llmarch.train.checkpoints import resolve_model_dir

    path = resolve_model_dir(checkpoint)  # a model directory, or a training run's newest good checkpoint
    return path, load_model(path).eval(), load_tokenizer_for(path)


def run(args) -> int:
    if args.batch_size < 1:
        raise ValueError(f"--batch-size: must be at least 1, got {args.batch_size}")
    if args.seq_len is not None and args.seq_len < 1:
        raise ValueError(f"--seq-len: must be at least 1, got {args.seq_len}")
    return run_tasks(args) if args.tasks else run_text(args)


def run_text(args) -> int:
    from llmarch.data import corpus_files, read_texts, take_bytes
    from llmarch.eval import score_texts

    _, files = corpus_files(args.data)
    files = take_bytes(files, None if args.max_data_mb is None else int(args.max_data_mb * 2**20))
    texts = read_texts(files)
    if not texts:
        raise ValueError(f"--data {args.data!r}: no text in {len(files)} file(s) (binary or empty)")
    path, model, tok = _load(args.checkpoint)
    score = score_texts(model, tok, texts, args.seq_len, args.batch_size)
    out = dict(checkpoint=str(path), data=args.data, files=len(files), **score.to_dict())
    if args.json:
        emit_json(out)
        return 0
    rows = [["documents", score.documents], ["tokens scored", score.tokens], ["bytes", score.bytes],
            ["loss (nats/token)", score.loss], ["perplexity", score.perplexity],
            ["bits per byte", score.bits_per_byte], ["tokens/s", score.tokens_per_s]]
    print(f"{path}: {args.data} in windows of {score.max_len} tokens")
    print(table(rows, ["quantity", "value"]))
    return 0


def run_tasks(args) -> int:
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager

        import llmarch.eval.harness  # noqa: F401  (registers the "llmarch" model)
    except ImportError as e:
        raise ValueError(f"--tasks needs lm-evaluation-harness: pip install 'llmarch[eval]' ({e})") from None
    names = [t.strip() for t in args.tasks.split(",") if t.strip()]
    manager = TaskManager(include_path=args.include_path, include_defaults=False) if args.include_path else None
    if manager is None or not set(names) <= set(manager.all_tasks):  # indexing the built-in tasks takes a while
        manager = TaskManager(include_path=args.include_path)
    unknown = [t for t in names if t not in manager.all_tasks]
    if unknown:
        raise ValueError(f"--tasks: unknown {unknown}; add --include-path DIR for task files of your own")
    model_args = {"checkpoint": args.checkpoint, "max_length": args.seq_len}
    res = lm_eval.simple_evaluate(model="llmarch", model_args={k: v for k, v in model_args.items() if v},
                                  tasks=names, batch_size=args.batch_size, limit=args.limit, task_manager=manager,
                                  log_samples=False)
    results = res["results"]
    if args.json:
        emit_json(results)
        return 0
    rows = [[task, metric.split(",")[0], value] for task, metrics in results.items()
            for metric, value in metrics.items() if isinstance(value, (int, float)) and "stderr" not in metric]
    print(table(rows, ["task", "metric", "value"]))
    return 0
