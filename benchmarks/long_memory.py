"""Long-sequence training memory: one training step at [1, 8192] tokens (the LLaMA-style config of train.py with a
32000-token vocabulary), llmarch with per-block activation checkpointing and its chunked loss against transformers
with gradient checkpointing and its own loss, same weights, fp32 (and bf16 autocast with --bf16).

    PYTHONPATH=src python benchmarks/long_memory.py [--seq 8192] [--repeats 1] [--threads 1] [--bf16]

Peak = the most bytes of step-allocated tensors alive at once (``common.PeakLive``, a dispatch mode, so the same
figure on any device; parameters and their gradients' first allocation are counted alike for both, the inputs
not). Also reports the step time (interleaved, median) and the loss of both (they must agree).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from train import CONFIGS, hf_twin  # noqa: E402

import llmarch  # noqa: E402
from llmarch.train.objectives import ce_sum  # noqa: E402
from llmarch.train.optim import enable_activation_checkpointing  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seq", type=int, default=8192)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--bf16", action="store_true", help="also bf16 autocast")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = CONFIGS["llama-bench"][0].replace(vocab_size=32000, max_seq_len=args.seq)
    torch.manual_seed(0)
    ours = llmarch.build(cfg).train()
    hf = hf_twin(ours, torch.device("cpu"))
    enable_activation_checkpointing(ours)
    hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    hf.config.use_cache = False
    ids = torch.randint(0, cfg.vocab_size, (1, args.seq + 1))
    x, y = ids[:, :-1], ids[:, 1:]
    steps = {"llmarch (checkpointing, chunked loss)": lambda: ce_sum(ours(x).logits, y) / y.numel(),
             "hf (gradient checkpointing, its loss)": lambda: hf(input_ids=x, labels=y, shift_labels=y).loss}
    rows, out = [], {}
    for prec, dtype in [("fp32", None)] + ([("bf16", torch.bfloat16)] if args.bf16 else []):
        def run(fn):
            with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
                loss = fn()
            loss.backward()
            ours.zero_grad(set_to_none=True), hf.zero_grad(set_to_none=True)
            return float(loss.detach())

        peak, loss, times = {}, {}, {k: [] for k in steps}
        for k, fn in steps.items():
            with common.PeakLive() as counter:
                t0 = time.perf_counter()
                loss[k] = run(fn)
            times[k].append(time.perf_counter() - t0)
            peak[k] = counter.peak
        for _ in range(args.repeats - 1):
            for k, fn in steps.items():
                t0 = time.perf_counter()
                run(fn)
                times[k].append(time.perf_counter() - t0)
        ref = "hf (gradient checkpointing, its loss)"
        for k in steps:
            rows.append([prec, k, loss[k], peak[k] / 2**20, peak[k] / peak[ref], statistics.median(times[k])])
        out[prec] = dict(peak_live_bytes=peak, loss=loss, times=times)
        print(f"{prec} done, load {os.getloadavg()[0]:.1f}", flush=True)
    common.print_table(rows, ["prec", f"step [1, {args.seq}], V 32000, L8 D512", "loss", "peak MiB", "x hf mem",
                              "step s (first includes the counter)"])
    print(f"wrote {common.write_results('long_memory', dict(settings=vars(args), results=out, load=os.getloadavg()))}")


if __name__ == "__main__":
    main()
