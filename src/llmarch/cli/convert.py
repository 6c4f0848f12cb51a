"""`llmarch convert`: a Hugging Face checkpoint directory -> llmarch (and back), optionally weight-quantized."""
from __future__ import annotations

import json
from pathlib import Path


def add(sub) -> None:
    p = sub.add_parser("convert", help="convert between Hugging Face checkpoints and llmarch checkpoints")
    p.add_argument("src", help="a Hugging Face model directory (config.json + *.safetensors) or an llmarch "
                   "checkpoint directory (config.json with llmarch fields + model.safetensors)")
    p.add_argument("out", help="output directory (new or empty; see --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty OUT, replacing only the model "
                   "files there (config.json, *.safetensors, ...); other files are kept")
    p.add_argument("--to", choices=["llmarch", "hf"], default="llmarch", help="target format (default llmarch)")
    p.add_argument("--model-type", help="HF model_type to write with --to hf (default: the first that fits)")
    p.add_argument("--quantize", choices=["int8", "int4", "int3", "int2", "ternary"],
                   help="weight-only quantization of every Linear layer "
                   "(llmarch format only; `llmarch generate --checkpoint OUT` loads it)")
    p.add_argument("--group-size", type=int, default=64, choices=[32, 64, 128], help="int4/int3/int2 group size")
    p.add_argument("--activations", choices=["fp32", "int8"], default="fp32",
                   help="with --quantize int8: int8 also quantizes each product's input per row and block of 32 "
                   "(dynamic W8A8: faster from a few rows, less exact; default fp32)")
    p.set_defaults(func=run)


def run(args) -> int:
    from llmarch import hf
    from llmarch.checkpoint import load_model, save_model
    from llmarch.outdir import check_out_dir
    from llmarch.train.checkpoints import resolve_model_dir

    out = Path(args.out)
    if args.quantize and args.to != "llmarch":
        raise ValueError("--quantize writes an llmarch directory; drop --to hf")
    if args.activations != "fp32" and args.quantize != "int8":
        raise ValueError(f"--activations {args.activations} needs --quantize int8")
    check_out_dir(out, args.overwrite)  # before any work: never delete what the user did not create
    src = resolve_model_dir(args.src)  # a model directory, or a run directory: its newest good checkpoint
    if args.to == "llmarch":
        model = load_model(src)
        n = sum(p.numel() for p in model.parameters())
        if args.quantize:
            from llmarch.infer.quantize import quantize, save_quantized

            save_quantized(quantize(model.eval(), args.quantize, args.group_size, activations=args.activations), out,
                           args.overwrite)
        else:
            save_model(model, out, args.overwrite)
    else:
        model = load_model(src)
        n = sum(p.numel() for p in model.parameters())
        hf.save(model, out, model_type=args.model_type, files_from=src, overwrite=args.overwrite)
    carried = carry_files(src, out, copy=args.to == "llmarch")
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    print(json.dumps({"out": str(out), "format": args.to, "params": n, "quantize": args.quantize,
                      "activations": args.activations if args.quantize == "int8" else None, "bytes": size,
                      "carried": carried}))
    return 0


def carry_files(src: Path, out: Path, copy: bool) -> list[str]:
    """The tokenizer files and generation_config.json of ``src``, copied into ``out`` when ``copy`` (hf.save does
    it itself); returns the names ``out`` now holds."""
    from llmarch.model_files import CARRIED, carry_model_files

    if copy:
        carry_model_files(src, out)
    return [name for name in CARRIED if (out / name).is_file()]
