"""Weights from 8 bits down to ternary on one small trained model: validation perplexity after post-training
quantization (int8, int4, int3, int2, ternary) and after quantization-aware training (QAT: the same recipe trained
with ``--qat MODE``, then quantized to MODE). Same data, tokenizer, steps and seed for every run.

    PYTHONPATH=src python benchmarks/lowbit.py [--train-steps 150] [--qat int2,ternary] [--max-tokens 65536]

Writes benchmarks/results/lowbit.json.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, write_results  # noqa: E402
from quality import row, run_settings, validation_tokens, window_nll  # noqa: E402

import llmarch  # noqa: E402
from llmarch import data  # noqa: E402
from llmarch.checkpoint import load_model  # noqa: E402
from llmarch.infer.quantize import quantize  # noqa: E402
from llmarch.tokenizer import load_tokenizer_for  # noqa: E402
from llmarch.train import TrainConfig, train  # noqa: E402

GROUP = 32  # divides every width of llama-tiny (128, 352)


def train_run(out: Path, steps: int, qat: str | None) -> Path:
    """The make-demo recipe (llama-tiny on the standard library), shorter; ``qat`` trains through fake quantization."""
    tc = TrainConfig(out=str(out), steps=steps, batch_size=16, seq_len=128, lr=3e-3, warmup=20, max_data_mb=4.0,
                     vocab_size=2048, eval_every=steps, eval_batches=8, save_every=steps, samples=0,
                     progress=False, qat=qat, qat_group_size=GROUP)
    return train(llmarch.preset("llama-tiny"), tc).checkpoint


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train-steps", type=int, default=150)
    p.add_argument("--qat", default="int2,ternary", help="modes to train with QAT (comma-separated; '' = none)")
    p.add_argument("--max-tokens", type=int, default=65536)
    args = p.parse_args()
    start, load_before = time.perf_counter(), os.getloadavg()
    tmp = tempfile.TemporaryDirectory()
    print(f"training llama-tiny for {args.train_steps} steps (float) ...", flush=True)
    base_dir = train_run(Path(tmp.name) / "float", args.train_steps, None)
    model, tok = load_model(base_dir).eval(), load_tokenizer_for(base_dir)
    tokens, held_out = validation_tokens(tok, run_settings(base_dir))
    T = 128
    seqs = data.PackedSequences(tokens, T + 1, shuffle=False)
    n = min(len(seqs), max(1, args.max_tokens // T))
    windows = torch.from_numpy(np.stack([seqs.chunk(i) for i in range(n)]).astype(np.int64))
    s, c = window_nll(model, windows)
    ref = s / c
    rows = [row("fp32", ref, ref, c, training="float", bits=32)]
    bits = {"int8": 8, "int4": 4, "int3": 3, "int2": 2, "ternary": 1.58}
    for mode in bits:
        s, c = window_nll(quantize(copy.deepcopy(model), mode, group_size=GROUP, skip=("lm_head",)), windows)
        rows.append(row(f"{mode} PTQ", s / c, ref, c, training="float", bits=bits[mode]))
        print(f"  {rows[-1]['variant']}: ppl {rows[-1]['ppl']:.3f}", flush=True)
    for mode in [m for m in args.qat.split(",") if m]:
        print(f"training llama-tiny for {args.train_steps} steps with --qat {mode} ...", flush=True)
        qat_model = load_model(train_run(Path(tmp.name) / f"qat-{mode}", args.train_steps, mode)).eval()
        s, c = window_nll(quantize(qat_model, mode, group_size=GROUP, skip=("lm_head",)), windows)
        rows.append(row(f"{mode} QAT", s / c, ref, c, training=f"qat {mode}", bits=bits[mode]))
        print(f"  {rows[-1]['variant']}: ppl {rows[-1]['ppl']:.3f}", flush=True)
    print_table([[r["variant"], r["bits"], r["ppl"], f"{r['ppl_change']:+.2%}"] for r in rows],
                ["weights (lm_head fp32)", "bits", "ppl", "vs fp32"])
    print(write_results("lowbit", dict(settings=vars(args), group_size=GROUP, held_out=dict(held_out, files=len(
        held_out["files"])), rows=rows, seconds=time.perf_counter() - start, load_before=load_before,
        load_after=os.getloadavg())))
    tmp.cleanup()


if __name__ == "__main__":
    main()
