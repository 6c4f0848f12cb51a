"""What a batch-1 decode step costs besides its layers and its head, for two source trees: the LLaMA-style (or
GPT-2) model of ``decode.py`` on its native decode layers, with the layers' native call and the head replaced by
empty ones, so what is timed is the rest (embedding, positions and rotation, the plan check, cache bookkeeping,
the final norm, dispatch and Python). CPU time (``process_time``) per step over 400 steps, medians of 5 per
process, one process per tree, the trees alternating; ratios of medians.

    git worktree add /tmp/before HEAD~3
    PYTHONPATH=src python benchmarks/step_overhead.py --trees /tmp/before/src,src [--model llama] [--rounds 3]

Writes benchmarks/results/step_overhead[_gpt2][_bf16].json.
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


def child(kind: str, dtype: str, steps: int) -> float:
    import torch

    sys.path.insert(0, str(HERE))
    from decode import CONFIGS

    import llmarch
    from llmarch.native import decode as native_decode

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = llmarch.build(CONFIGS[kind]()).eval()
    if dtype == "bf16":
        model.to(torch.bfloat16)
    ids = torch.randint(0, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    llmarch.generate(model, ids, 300)  # packs the weights: the steps below run the native path
    kernel = getattr(native_decode, "STACK", native_decode._KERNEL)  # one call per step, or (before) per layer
    kernel.fn = lambda: (lambda *args: None)
    V = model.config.vocab_size
    model.lm_head.forward = lambda h: h.new_zeros(*h.shape[:-1], V)
    tok, times = ids[:, -1:], []
    with torch.no_grad():
        for _ in range(5):  # a fresh cache each time: GPT-2's learned positions stop at 1024
            cache = model.new_cache()
            model(ids, cache=cache)
            t0 = time.process_time()
            for _ in range(steps):
                model(tok, cache=cache)
            times.append((time.process_time() - t0) / steps)
    return statistics.median(times) * 1e6


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--trees", default="/work/main/src,src")
    p.add_argument("--model", choices=["llama", "gpt2"], default="llama")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(child(args.model, args.dtype, args.steps))
        return
    sys.path.insert(0, str(HERE))
    from common import print_table, write_results

    us = {t: [] for t in args.trees.split(",")}
    for _ in range(args.rounds):
        for tree in us:
            cmd = [sys.executable, __file__, "--child", "--model", args.model, "--dtype", args.dtype, "--steps",
                   str(args.steps)]
            out = subprocess.run(cmd, check=True, text=True, stdout=subprocess.PIPE,
                                 env=dict(os.environ, PYTHONPATH=tree)).stdout
            us[tree].append(float(out.split()[-1]))
    first = statistics.median(next(iter(us.values())))
    rows = [[tree, statistics.median(v), first / statistics.median(v)] for tree, v in us.items()]
    print_table(rows, ["tree", "µs per step outside layers and head", "x faster than the first"])
    topic = "_".join(["step_overhead"] + ([args.model] if args.model != "llama" else [])
                     + ([args.dtype] if args.dtype != "fp32" else []))
    print(f"wrote {write_results(topic, dict(settings=vars(args), us_per_step=us))}")


if __name__ == "__main__":
    main()
