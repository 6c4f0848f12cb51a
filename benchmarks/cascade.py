"""A two-model cascade (seed 002): cost against quality over a threshold sweep. A small and a large llama-style
model are trained on the same standard-library data with the same tokenizer; held-out windows are scored by the
small model, and those whose confidence (mean top-1 probability) is below the threshold by the large one.

    PYTHONPATH=src python benchmarks/cascade.py [--train-steps 150] [--max-tokens 65536]

Writes benchmarks/results/cascade.json.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, write_results  # noqa: E402
from quality import run_settings, validation_tokens  # noqa: E402

import llmarch  # noqa: E402
from llmarch import data  # noqa: E402
from llmarch.checkpoint import load_model  # noqa: E402
from llmarch.infer.cascade import cascade_score  # noqa: E402
from llmarch.tokenizer import load_tokenizer_for  # noqa: E402
from llmarch.train import TrainConfig, train  # noqa: E402

SIZES = {"small": dict(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=176),
         "large": dict()}  # llama-tiny as it is: d 128, 4 layers (the small one is a quarter of its width x depth)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train-steps", type=int, default=150)
    p.add_argument("--max-tokens", type=int, default=65536)
    p.add_argument("--thresholds", default="0,0.2,0.25,0.3,0.35,0.4,0.5,2")
    args = p.parse_args()
    start, load_before = time.perf_counter(), os.getloadavg()
    tmp = tempfile.TemporaryDirectory()
    models = {}
    for name, size in SIZES.items():
        print(f"training the {name} model for {args.train_steps} steps ...", flush=True)
        tc = TrainConfig(out=str(Path(tmp.name) / name), steps=args.train_steps, batch_size=16, seq_len=128,
                         lr=3e-3, warmup=20, max_data_mb=4.0, vocab_size=2048, eval_every=args.train_steps,
                         eval_batches=8, save_every=args.train_steps, samples=0, progress=False)
        models[name] = train(llmarch.preset("llama-tiny").replace(**size), tc).checkpoint
    small, large = (load_model(models[k]).eval() for k in ("small", "large"))
    tokens, _ = validation_tokens(load_tokenizer_for(models["small"]), run_settings(models["small"]))
    T = 128
    seqs = data.PackedSequences(tokens, T + 1, shuffle=False)
    windows = torch.from_numpy(np.stack([seqs.chunk(i) for i in range(min(len(seqs), args.max_tokens // T))])
                               .astype(np.int64))
    ths = [float(x) for x in args.thresholds.split(",")]
    rows = [dict(threshold=th, ppl=math.exp(s.nll), escalated=s.escalated, flops_per_token=s.flops_per_token)
            for th, s in zip(ths, cascade_score(small, large, windows, ths))]
    base = rows[0]["flops_per_token"]
    print_table([[r["threshold"], f"{r['escalated']:.0%}", f"{r['flops_per_token']:.3g}",
                  f"{r['flops_per_token'] / base:.2f}x", f"{r['ppl']:.3f}"] for r in rows],
                ["threshold", "sent to large", "FLOPs/token", "cost vs small", "ppl"])
    print(write_results("cascade", dict(settings=vars(args), sizes=SIZES, windows=len(windows), rows=rows,
                                        seconds=time.perf_counter() - start, load_before=load_before,
                                        load_after=os.getloadavg())))
    tmp.cleanup()


if __name__ == "__main__":
    main()
