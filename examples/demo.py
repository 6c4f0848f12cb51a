"""`make demo`: train the `llama-tiny` preset on the Python standard library for a few minutes on the CPU.

Steps: describe the model (the `llmarch inspect` report) -> train a byte-level BPE on the corpus -> tokenise and
cache it -> train with AdamW + warmup/cosine, validating as it goes -> save a checkpoint -> print samples.
Everything runs locally, no download.
"""
from __future__ import annotations

import argparse
import logging
import shutil
import time
from pathlib import Path

import torch
from tqdm.contrib.logging import logging_redirect_tqdm

import llmarch
from llmarch.cli.inspect import format_report
from llmarch.train import TrainConfig, train


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/demo", help="run directory (replaced unless --resume)")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--max-data-mb", type=float, default=8.0, help="first N MB of the standard library")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: all cores)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()

    cfg = llmarch.preset("llama-tiny")
    out = Path(args.out)
    if out.exists() and not args.resume:  # replace an earlier run, never a directory of someone else's files
        if not (out / "train.json").is_file() and any(out.iterdir()):
            raise SystemExit(f"demo: {out} exists and is not a training run; choose another --out")
        shutil.rmtree(out)
    tc = TrainConfig(out=str(out), steps=args.steps, batch_size=16, seq_len=128, lr=3e-3, warmup=40,
                     max_data_mb=args.max_data_mb, vocab_size=cfg.vocab_size, eval_every=50, eval_batches=8,
                     log_every=10, save_every=200, samples=3, sample_tokens=96, resume=args.resume)
    print(f"llama-tiny: d_model {cfg.d_model}, {cfg.n_layers} layers, {cfg.n_heads} heads ({cfg.kv_heads} kv), "
          f"d_ff {cfg.d_ff}, {cfg.norm}, {cfg.ffn}/{cfg.activation}, {cfg.position} positions\n")
    # what `llmarch inspect llama-tiny --seq-len 128 --batch 16 --dtype fp32` prints, for one training step
    print(format_report("llama-tiny", llmarch.analyze(cfg, seq_len=tc.seq_len, batch=tc.batch_size, dtype="fp32")))
    print(f"\ntraining {tc.steps} steps x {tc.batch_size} x {tc.seq_len} tokens on the first {tc.max_data_mb:g} MB "
          f"of the Python standard library ({torch.get_num_threads()} CPU threads)\n")
    with logging_redirect_tqdm():
        result = train(cfg, tc)

    print("\nvalidation loss")
    for step, loss in result.val_losses:
        print(f"  step {step:>5}  {loss:.3f}  (ppl {torch.tensor(loss).exp():.1f})")
    if len(result.val_losses) > 1:
        first, last = result.val_losses[0][1], result.val_losses[-1][1]
        print(f"  {'fell' if last < first else 'did NOT fall'}: {first:.3f} -> {last:.3f}")
    print(f"\ncheckpoint: {result.checkpoint}")
    for prompt, text in result.samples:
        print(f"\n--- sample (prompt = first tokens of a validation file) ---\n{prompt}{text}")
    print(f"\ndone in {time.perf_counter() - start:.0f} s. Try:\n  llmarch generate --checkpoint {out} "
          "--prompt 'def ' --max-new-tokens 64 --temperature 0.8")


if __name__ == "__main__":
    main()
