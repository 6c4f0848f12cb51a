"""A/B of two llmarch source trees on eager decoding: greedy tokens/s of ``llmarch.generate`` for the LLaMA-style
(or GPT-2, ``--model gpt2``) config of ``decode.py``, optionally a quantized copy (``--quantize int8``) or the
model in bf16 (``--dtype bf16``), counted in this process's CPU time (steadier than wall time on a shared machine),
one process per tree, the trees alternating; the last line gives each tree's median and the median of the
per-round ratios to the first tree.

    python benchmarks/decode_ab.py --trees /work/main/src,src [--batch 1] [--new-tokens 1024] [--rounds 2]
    git worktree add /tmp/before HEAD~1 && python benchmarks/decode_ab.py --trees /tmp/before/src,src --quantize int8

Prints one line per (round, tree) and writes benchmarks/results/decode_ab[_gpt2][_int8][_bf16][_b8].json.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def child(batch: int, new_tokens: int, repeats: int, mode: str | None = None, model_kind: str = "llama",
          dtype: str = "fp32") -> float:
    import torch

    sys.path.insert(0, str(HERE))
    from decode import CONFIGS

    import llmarch

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = llmarch.build(CONFIGS[model_kind]()).eval()
    if mode is not None:  # a quantized copy (llmarch.infer.quantize)
        from llmarch.infer.quantize import quantize

        quantize(model, mode)
    if dtype == "bf16":
        model.to(torch.bfloat16)
    ids = torch.randint(0, model.config.vocab_size, (batch, 16), generator=torch.Generator().manual_seed(batch))
    llmarch.generate(model, ids, new_tokens)
    times = []
    for _ in range(repeats):
        t0 = time.process_time()
        llmarch.generate(model, ids, new_tokens)
        times.append(time.process_time() - t0)
    return batch * new_tokens / statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--trees", default="/work/main/src,src", help="comma-separated PYTHONPATHs to compare")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--new-tokens", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--quantize", choices=["int8", "int4"], help="decode a quantized copy")
    p.add_argument("--model", choices=["llama", "gpt2"], default="llama")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(child(args.batch, args.new_tokens, args.repeats, args.quantize, args.model, args.dtype))
        return
    sys.path.insert(0, str(HERE))
    from common import write_results

    results = {t: [] for t in args.trees.split(",")}
    for r in range(args.rounds):
        for tree in results:
            cmd = [sys.executable, __file__, "--child", "--batch", str(args.batch), "--new-tokens",
                   str(args.new_tokens), "--repeats", str(args.repeats), "--model", args.model, "--dtype", args.dtype]
            cmd += ["--quantize", args.quantize] if args.quantize else []
            out = subprocess.run(cmd, check=True, text=True, stdout=subprocess.PIPE,
                                 env=dict(os.environ, PYTHONPATH=tree)).stdout
            results[tree].append(float(out.split()[-1]))
            print(f"round {r} {tree}: {results[tree][-1]:.1f} tokens/s (CPU time)", flush=True)
    parts = ["decode_ab"] + ([args.model] if args.model != "llama" else []) + ([args.quantize] if args.quantize else [])
    parts += ([args.dtype] if args.dtype != "fp32" else []) + ([f"b{args.batch}"] if args.batch != 1 else [])
    topic = "_".join(parts)
    first = next(iter(results.values()))
    ratios = {t: statistics.median(a / b for a, b in zip(v, first)) for t, v in results.items()}
    for tree, v in results.items():
        print(f"{tree}: median {statistics.median(v):.1f} tokens/s, {ratios[tree]:.3f}x the first tree")
    data = dict(settings=vars(args), load=os.getloadavg(), tokens_per_s=results, ratio_to_first=ratios)
    print(f"wrote {write_results(topic, data)}")


if __name__ == "__main__":
    main()
