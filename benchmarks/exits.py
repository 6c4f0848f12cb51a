"""Early exit: quality against layers used, for the learned exit classifiers (seed 002's AdaptiveLLM, trained with
intermediate losses) beside CALM's confidence criteria on the same model. llama-tiny (4 layers) with exit_heads is
trained on the standard library with ``--objective causal_lm_exits``; held-out windows are decoded token by token
(teacher forcing) with exits at several thresholds.

    PYTHONPATH=src python benchmarks/exits.py [--train-steps 150] [--exit-tokens 1024]

Writes benchmarks/results/exits.json.
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
from quality import row, run_settings, validation_tokens, window_nll  # noqa: E402

import llmarch  # noqa: E402
from llmarch import data  # noqa: E402
from llmarch.checkpoint import load_model  # noqa: E402
from llmarch.infer.early_exit import early_exit_nll  # noqa: E402
from llmarch.tokenizer import load_tokenizer_for  # noqa: E402
from llmarch.train import TrainConfig, train  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train-steps", type=int, default=150)
    p.add_argument("--exit-tokens", type=int, default=1024)
    p.add_argument("--thresholds", default="1.0,0.9,0.8,0.6,0.4")
    args = p.parse_args()
    start, load_before = time.perf_counter(), os.getloadavg()
    tmp = tempfile.TemporaryDirectory()
    tc = TrainConfig(out=str(Path(tmp.name) / "run"), steps=args.train_steps, batch_size=16, seq_len=128, lr=3e-3,
                     warmup=20, max_data_mb=4.0, vocab_size=2048, eval_every=args.train_steps, eval_batches=8,
                     save_every=args.train_steps, samples=0, progress=False, objective="causal_lm_exits")
    print(f"training llama-tiny with exit heads for {args.train_steps} steps ...", flush=True)
    model_dir = train(llmarch.preset("llama-tiny").replace(exit_heads=True), tc).checkpoint
    model, tok = load_model(model_dir).eval(), load_tokenizer_for(model_dir)
    tokens, _ = validation_tokens(tok, run_settings(model_dir))
    T = 128
    seqs = data.PackedSequences(tokens, T + 1, shuffle=False)
    windows = torch.from_numpy(np.stack([seqs.chunk(i) for i in range(max(1, math.ceil(args.exit_tokens / T)))])
                               .astype(np.int64))
    s, n = window_nll(model, windows)
    ref = s / n
    L = len(model.decoder.layers)
    rows = [row("full model", ref, ref, n, criterion="", threshold=None, mean_layers=float(L))]
    for crit in ("learned", "softmax", "state"):
        for th in (float(x) for x in args.thresholds.split(",")):
            total, count, layers = 0.0, 0, []
            for w in windows:
                nll, stats = early_exit_nll(model, w[None], th, criterion=crit)
                total, count, layers = total + nll * (len(w) - 1), count + len(w) - 1, layers + stats.layers
            rows.append(row(f"{crit} > {th:g}", total / count, ref, count, criterion=crit, threshold=th,
                            mean_layers=sum(layers) / len(layers)))
            print(f"  {rows[-1]['variant']}: ppl {rows[-1]['ppl']:.3f}, {rows[-1]['mean_layers']:.2f} layers",
                  flush=True)
    print_table([[r["variant"], f"{r['mean_layers']:.2f}", f"{r['ppl']:.3f}", f"{r['ppl_change']:+.2%}"]
                 for r in rows], ["exit rule", f"layers used (of {L})", "ppl", "vs full"])
    print(write_results("exits", dict(settings=vars(args), rows=rows, seconds=time.perf_counter() - start,
                                      load_before=load_before, load_after=os.getloadavg())))
    tmp.cleanup()


if __name__ == "__main__":
    main()
