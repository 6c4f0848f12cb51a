"""Time to the first token: one ``generate`` call making one token after a 1 x T prompt, so the call is the
prefill (and one sampling), for transformers `generate` (sdpa) and llmarch, whose prefill runs the head on the
last position only (``logits_to_keep=1``), llmarch with the head on every position (what the prefill did
before; ``llmarch.infer.decode.last_logits`` patched to 0), and llmarch with torch's attention kernel instead of
its own many-query one (``llmarch.native.flash``, where it builds: AVX-512). The variants take turns within each
round (after one warmup each); medians. Also listed: the logits each llmarch variant makes (T x V fp32 numbers for
a full head), and whether all pick the same first token.

    PYTHONPATH=src python benchmarks/prefill.py [--cases llama:2048,gpt2:512] [--rounds 3] [--threads 1]

Writes benchmarks/results/prefill.json.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, write_results  # noqa: E402
from decode import CONFIGS, hf_model, round_robin  # noqa: E402

import llmarch  # noqa: E402
from llmarch.infer import decode  # noqa: E402
from llmarch.native import flash  # noqa: E402


def full_head(fn):
    """fn with every engine's prefill running the head on all positions."""
    def run():
        keep, decode.last_logits = decode.last_logits, lambda model: 0
        try:
            return fn()
        finally:
            decode.last_logits = keep
    return run


def torch_attention(fn):
    """fn with llmarch's attention running torch's kernel (llmarch.native.flash set aside)."""
    def run():
        keep, flash.available = flash.available, lambda: False
        try:
            return fn()
        finally:
            flash.available = keep
    return run


def run_case(kind: str, T: int, rounds: int) -> list[dict]:
    torch.manual_seed(0)
    model = llmarch.build(CONFIGS[kind]()).eval()
    ids = torch.randint(0, model.config.vocab_size, (1, T), generator=torch.Generator().manual_seed(T))
    with tempfile.TemporaryDirectory() as tmp:
        hf = hf_model(model, kind, tmp)
    fns = {"hf generate (sdpa)": lambda: hf.generate(ids, max_new_tokens=1, do_sample=False, pad_token_id=0),
           "llmarch (head on the last position)": lambda: llmarch.generate(model, ids, 1),
           "llmarch, head on every position": full_head(lambda: llmarch.generate(model, ids, 1))}
    if flash.available():
        fns["llmarch, torch's attention kernel"] = torch_attention(lambda: llmarch.generate(model, ids, 1))
    got = {k: fn() for k, fn in fns.items()}
    same = all(torch.equal(g[:, -1], got["hf generate (sdpa)"][:, -1]) for g in got.values())
    times = round_robin(fns, rounds)
    base = statistics.median(times["hf generate (sdpa)"])
    row_bytes = model.config.vocab_size * 4  # one position's fp32 logits
    rows = []
    for k, ts in times.items():
        s = statistics.median(ts)
        rows.append(dict(model=kind, prompt=T, variant=k, seconds=s, x_hf=base / s, same_token=same,
                         logits_mb=None if k.startswith("hf") else (T if "every" in k else 1) * row_bytes / 2**20,
                         times=ts))
    return rows


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--cases", default="llama:2048,gpt2:512")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for case in args.cases.split(","):
        kind, T = case.split(":")
        rows += run_case(kind, int(T), args.rounds)
    print_table([[r["model"], r["prompt"], r["variant"], r["seconds"], r["x_hf"], "-" if r["logits_mb"] is None
                  else r["logits_mb"], r["same_token"]]
                 for r in rows], ["model", "T", "variant", "s", "x HF", "logits MB made", "same token"])
    print(f"wrote {write_results('prefill', dict(settings=vars(args), rows=rows))}")


if __name__ == "__main__":
    main()
