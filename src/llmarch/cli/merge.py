"""`llmarch merge RUN OUT`: fold a LoRA run's adapters into the base weights and write a full model directory
(config.json, model.safetensors, tokenizer) that `generate`, `chat` and `convert` read like any other."""
from __future__ import annotations


def add(sub) -> None:
    p = sub.add_parser("merge", help="fold a LoRA run's adapters into a full checkpoint")
    p.add_argument("run", metavar="RUN", help="a finetune run directory (or one of its checkpoints)")
    p.add_argument("out", metavar="OUT", help="new model directory (must not exist or be empty)")
    p.set_defaults(func=run)


def run(args) -> int:
    from llmarch.train.merge import merge_run

    path = merge_run(args.run, args.out)
    print(f"merged model: {path}")
    return 0
