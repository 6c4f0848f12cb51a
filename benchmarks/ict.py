"""Dense retrieval trained from scratch with the inverse cloze task (``llmarch train --objective ict``): held-out
top-1 retrieval accuracy of dpr-tiny among N passages of the standard library's validation split, for dropout 0.1
(the DPR/BERT default) and 0. A question is a span cut out of its passage, never left in it at evaluation.

    PYTHONPATH=src python benchmarks/ict.py [--steps 600] [--passages 64] [--groups 8]

Writes benchmarks/results/ict.json.
"""
from __future__ import annotations

import argparse
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
from llmarch.tokenizer import load_tokenizer_for  # noqa: E402
from llmarch.train import TrainConfig, train  # noqa: E402
from llmarch.train.retrieval_objective import InverseCloze, retrieval_accuracy  # noqa: E402

SEQ = 64


def held_out_accuracy(model_dir: Path, passages: int, groups: int) -> tuple[float, float]:
    """Mean top-1 accuracy over ``groups`` groups of ``passages`` held-out passages, and its standard error."""
    model, tok = load_model(model_dir).eval(), load_tokenizer_for(model_dir)
    tokens, _ = validation_tokens(tok, run_settings(model_dir))
    seqs = data.PackedSequences(tokens, SEQ, seed=0, shuffle=True)
    objective = InverseCloze(tok, model.config.vocab_size)
    accs = []
    for g in range(groups):
        chunks = torch.from_numpy(np.stack([seqs.chunk(g * passages + i) for i in range(passages)]).astype(np.int64))
        accs.append(retrieval_accuracy(model, chunks, objective, torch.Generator().manual_seed(g)))
    a = np.array(accs)
    return float(a.mean()), float(a.std(ddof=1) / np.sqrt(len(a))) if len(a) > 1 else 0.0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--passages", type=int, default=64)
    p.add_argument("--groups", type=int, default=8)
    args = p.parse_args()
    start, load_before = time.perf_counter(), os.getloadavg()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for dropout in (0.1, 0.0):
            tc = TrainConfig(out=str(Path(tmp) / f"run{dropout}"), steps=args.steps, batch_size=32, seq_len=SEQ,
                             lr=1e-3, warmup=30, max_data_mb=4.0, eval_every=args.steps, eval_batches=8,
                             save_every=args.steps, samples=0, progress=False, objective="ict")
            cfg = llmarch.preset("dpr-tiny").replace(dropout=dropout, attn_dropout=dropout)
            print(f"training dpr-tiny (dropout {dropout}) with ICT for {args.steps} steps ...", flush=True)
            result = train(cfg, tc)
            acc, se = held_out_accuracy(result.checkpoint, args.passages, args.groups)
            rows.append(dict(dropout=dropout, steps=args.steps, val_loss=result.val_losses[-1][1], top1=acc,
                             top1_se=se, chance=1.0 / args.passages))
    print_table([[f"{r['dropout']:g}", r["steps"], f"{r['val_loss']:.3f}", f"{r['top1']:.1%} ± {r['top1_se']:.1%}",
                  f"{r['chance']:.1%}"] for r in rows],
                ["dropout", "steps", "val ICT loss (chance ln 32 = 3.466)", f"held-out top-1 of {args.passages}",
                 "chance"])
    print(write_results("ict", dict(settings=vars(args), rows=rows, seconds=time.perf_counter() - start,
                                    load_before=load_before, load_after=os.getloadavg())))


if __name__ == "__main__":
    main()
