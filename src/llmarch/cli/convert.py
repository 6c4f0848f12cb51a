"""`llmarch convert`: a Hugging Face checkpoint directory -> llmarch (and back)."""
from __future__ import annotations

import json
from pathlib import Path


def add(sub) -> None:
    p = sub.add_parser("convert", help="convert between Hugging Face checkpoints and llmarch checkpoints")
    p.add_argument("src", help="a Hugging Face model directory (config.json + *.safetensors) or an llmarch "
                   "checkpoint directory (config.json with llmarch fields + model.safetensors)")
    p.add_argument("out", help="output directory")
    p.add_argument("--to", choices=["llmarch", "hf"], default="llmarch", help="target format (default llmarch)")
    p.add_argument("--model-type", help="HF model_type to write with --to hf (default: the first that fits)")
    p.set_defaults(func=run)


def run(args) -> int:
    from llmarch import hf
    from llmarch.checkpoint import load_model, save_model

    src, out = Path(args.src), Path(args.out)
    if args.to == "llmarch":
        model = hf.load(src)
        save_model(model, out)
    else:
        model = load_model(src)
        hf.save(model, out, model_type=args.model_type)
    n = sum(p.numel() for p in model.parameters())
    print(json.dumps({"out": str(out), "format": args.to, "params": n}))
    return 0
