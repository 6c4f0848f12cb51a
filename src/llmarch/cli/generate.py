"""`llmarch generate`: sample text from a checkpoint (or token ids from a preset with random weights)."""
from __future__ import annotations

import sys

import torch


def add(sub) -> None:
    p = sub.add_parser("generate", help="generate text from a checkpoint")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", metavar="DIR", help="a training run / model directory (llmarch or HF)")
    src.add_argument("--preset", metavar="NAME", help="a preset with random weights (prompt = token ids)")
    p.add_argument("--prompt", default="", help="prompt text (token ids separated by spaces with --preset)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def run(args) -> int:
    import llmarch

    gen = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    if args.preset:
        model = llmarch.build(llmarch.preset(args.preset)).eval()
        ids = [int(t) for t in args.prompt.split()] or [0]
        out = llmarch.generate(model, torch.tensor([ids]), max_new_tokens=args.max_new_tokens,
                               temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, generator=gen)
        print(" ".join(str(t) for t in out[0].tolist()))
        return 0
    from llmarch.checkpoint import load_model
    from llmarch.tokenizer import load_tokenizer_for
    from llmarch.train.checkpoints import resolve_model_dir

    path = resolve_model_dir(args.checkpoint)  # a model directory, or a training run's newest good checkpoint
    model = load_model(path).eval()
    tok = load_tokenizer_for(path)
    ids = tok.encode(args.prompt) or [tok.bos_id]
    out = llmarch.generate(model, torch.tensor([ids]), max_new_tokens=args.max_new_tokens,
                           temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, generator=gen,
                           eos_token_id=tok.eos_id)
    # an encoder-decoder returns the decoder's tokens after its start token (the prompt went through the encoder)
    tokens = out[0, 1:] if model.config.kind == "encoder_decoder" else out[0]
    sys.stdout.write(tok.decode(tokens.tolist()) + "\n")
    return 0
