"""Decode after a long prompt: milliseconds per new token of the LLaMA-style model (benchmarks/decode.py's, with
a 4096-token context) for transformers `generate` (sdpa) and llmarch eager: with each decoder layer in one native
call (``llmarch.nn.fused_decode``, generate's default here), and with the layers as torch ops
(``LLMARCH_FUSED_DECODE=0``) using the sdpa kernel's single-query route
(``llmarch.nn.kernels.SINGLE_QUERY_MIN_KEYS``) or torch's fused kernel for every query.

    PYTHONPATH=src python benchmarks/decode_long.py [--cases 1x2048,8x512] [--rounds 3] [--threads 1]

Per-token time = (time of a call generating 40 tokens - one generating 8) / 32, so the prompt's prefill cancels;
greedy; the variants alternate within each round and the figures are medians. Also checks that both llmarch
variants give transformers' tokens. Writes benchmarks/results/decode_long.json.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, write_results  # noqa: E402
from decode import CONFIGS, hf_model  # noqa: E402

import llmarch  # noqa: E402
from llmarch.infer.layout import pack_weights  # noqa: E402
from llmarch.nn import kernels  # noqa: E402

SHORT, LONG = 8, 40


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--cases", default="1x2048,8x512", help="batch x prompt tokens, comma-separated")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = llmarch.build(CONFIGS["llama"]().replace(max_seq_len=4096)).eval()
    with tempfile.TemporaryDirectory() as tmp:
        hf = hf_model(model, "llama", tmp)
    pack_weights(model)
    on = kernels.SINGLE_QUERY_MIN_KEYS

    def ours(route: int, native_layers: bool = False):
        def run(ids, n):
            kernels.SINGLE_QUERY_MIN_KEYS = route
            os.environ["LLMARCH_FUSED_DECODE"] = "1" if native_layers else "0"
            try:
                return llmarch.generate(model, ids, n)
            finally:
                kernels.SINGLE_QUERY_MIN_KEYS = on
                os.environ.pop("LLMARCH_FUSED_DECODE")
        return run

    def theirs(ids, n):
        return hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, pad_token_id=0)

    variants = {"hf generate (sdpa)": theirs, "llmarch, native layers": ours(on, native_layers=True),
                "llmarch, torch-op layers, single-query route": ours(on),
                "llmarch, torch-op layers, fused kernel only": ours(1 << 62)}
    rows, table = [], []
    for case in args.cases.split(","):
        B, P = (int(x) for x in case.split("x"))
        ids = torch.randint(0, model.config.vocab_size, (B, P), generator=torch.Generator().manual_seed(B))
        with torch.no_grad():
            outs = {name: fn(ids, SHORT) for name, fn in variants.items()}  # warm-up, and the tokens to compare
            same = all(torch.equal(o, outs["hf generate (sdpa)"]) for o in outs.values())
            ms = {name: [] for name in variants}
            for _ in range(args.rounds):
                for name, fn in variants.items():
                    t0 = time.perf_counter()
                    fn(ids, SHORT)
                    t1 = time.perf_counter()
                    fn(ids, LONG)
                    ms[name].append(((time.perf_counter() - t1) - (t1 - t0)) / (LONG - SHORT) * 1e3)
        med = {name: statistics.median(v) for name, v in ms.items()}
        base = med["hf generate (sdpa)"]
        for name, m in med.items():
            rows.append(dict(batch=B, prompt=P, variant=name, ms_per_token=m, vs_hf=base / m, same_tokens=same,
                             ms=ms[name]))
            table.append([B, P, name, m, base / m, same])
    print_table(table, ["B", "prompt", "variant", "ms / token", "x HF", "same tokens"])
    path = write_results("decode_long", dict(settings=vars(args), load=os.getloadavg(), rows=rows))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
