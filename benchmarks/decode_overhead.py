"""Where a decode step's time goes (batch 1, or ``--batch``): the eager step (packed weights, as ``generate``
runs) against the same step with every oneDNN and native-kernel product replaced by an empty result of its
shape, so what is left is everything else (norms, RoPE, the cache, attention, sampling, Python and dispatch).
The difference is the products' time; their GB/s is the weight bytes over it.

    PYTHONPATH=src python benchmarks/decode_overhead.py [--models llama,gpt2] [--rounds 5] [--threads 1] [--batch 1]

Greedy, 16-token prompt, 32 new tokens; the two variants alternate, medians over rounds. Writes
benchmarks/results/decode_overhead.json. (The token sequence of the product-free step is meaningless; only its
time is used.)
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import memory_bandwidth_gbs, print_table, write_results  # noqa: E402
from decode import CONFIGS, weight_bytes  # noqa: E402

import llmarch  # noqa: E402
from llmarch.infer.layout import pack_weights  # noqa: E402
from llmarch.native import fp32 as native_fp32  # noqa: E402
from llmarch.nn import dense  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--models", default="llama,gpt2")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    real_mm, real_native = dense._mm, native_fp32.mm

    def empty_mm(x, w, b):
        return x.new_empty(x.shape[0], w.shape[0])

    def empty_native(x, w, b=None):
        return x.new_empty(x.shape[0], w.out_features)

    rows, table = [], []
    for kind in args.models.split(","):
        torch.manual_seed(0)
        model = llmarch.build(CONFIGS[kind]()).eval()
        pack_weights(model)
        ids = torch.randint(0, model.config.vocab_size, (args.batch, 16))
        steps = args.new_tokens + 1  # the prefill is one more weight pass
        times = {"full": [], "without products": []}
        with torch.no_grad():
            llmarch.generate(model, ids, args.new_tokens)
            for _ in range(args.rounds):
                for name, mm, nat in (("full", real_mm, real_native), ("without products", empty_mm, empty_native)):
                    dense._mm, native_fp32.mm = mm, nat
                    t0 = time.perf_counter()
                    llmarch.generate(model, ids, args.new_tokens)
                    times[name].append((time.perf_counter() - t0) / steps)
            dense._mm, native_fp32.mm = real_mm, real_native
        full, rest = (statistics.median(times[k]) for k in ("full", "without products"))
        nbytes = weight_bytes(model)
        rows.append(dict(model=kind, step_ms=full * 1e3, rest_ms=rest * 1e3, products_ms=(full - rest) * 1e3,
                         products_gbs=nbytes / (full - rest) / 1e9, weight_bytes=nbytes, times=times))
        table.append([kind, full * 1e3, rest * 1e3, (full - rest) * 1e3, (full - rest) / full,
                      nbytes / (full - rest) / 1e9])
    bandwidth = memory_bandwidth_gbs()
    print_table(table, ["model", "step ms", "without products ms", "products ms", "products share",
                        "products GB/s"])
    print(f"read bandwidth measured in this run: {bandwidth:.1f} GB/s")
    topic = "decode_overhead" + (f"_b{args.batch}" if args.batch != 1 else "")
    path = write_results(topic, dict(settings=vars(args), read_bandwidth_gbs=bandwidth, rows=rows))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
