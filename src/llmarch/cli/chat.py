"""`llmarch chat`: an interactive conversation with a checkpoint (history, /reset, /quit)."""
from __future__ import annotations

from llmarch.cli.common import add_dtype_arg, load_for_inference


def add(sub) -> None:
    p = sub.add_parser("chat", help="chat with a checkpoint in the terminal (/reset, /image PATH, /quit)")
    p.add_argument("--checkpoint", metavar="DIR", required=True, help="a training run directory (its newest good "
                   "checkpoint), a checkpoint directory or a Hugging Face directory, with its tokenizer")
    p.add_argument("--system", default=None, help="a line placed before the conversation")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--min-p", type=float, default=None)
    p.add_argument("--repetition-penalty", type=float, default=1.1)
    p.add_argument("--seed", type=int, default=0)
    add_dtype_arg(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from llmarch.infer.chat import Chat, repl
    from llmarch.tokenizer import load_tokenizer_for
    from llmarch.train.checkpoints import resolve_model_dir

    path = resolve_model_dir(args.checkpoint)  # a model directory, or a training run's newest good checkpoint
    model = load_for_inference(path, args.dtype)
    from llmarch.infer.images import processor_for

    processor = processor_for(model, path) if getattr(model.config, "vision", None) else None
    chat = Chat(model, load_tokenizer_for(path), system=args.system, max_new_tokens=args.max_new_tokens,
                temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                repetition_penalty=args.repetition_penalty, seed=args.seed, processor=processor)
    return repl(chat)
