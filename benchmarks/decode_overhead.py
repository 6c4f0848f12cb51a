"""Where a decode step's time goes (batch 1, or ``--batch``), with the decoder layers eager
(``LLMARCH_FUSED_DECODE=0``) and in native calls (llmarch.nn.fused_decode, what ``generate`` runs on packed
weights). Eager: the step against the same step with every oneDNN and native-kernel product replaced by an empty
result of its shape, so what is left is everything else (norms, RoPE, the cache, attention, sampling, Python and
dispatch); the difference is the products' time. Native layers run their products inside one C call, which
cannot be emptied from here: their products' time is that of one pass of the same kernel over the same blocked
copies (every weight once, random rows), timed in the same rounds, and the rest is the step minus that pass.
Products' GB/s: the weight bytes over their time.

    PYTHONPATH=src python benchmarks/decode_overhead.py [--models llama,gpt2] [--rounds 5] [--threads 1] [--batch 1]

Greedy, 16-token prompt, 32 new tokens; the variants take turns, medians over rounds. Writes
benchmarks/results/decode_overhead.json. (The token sequence of the product-free step is meaningless; only its
time is used.)
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
        copies = {id(m.weight): dense.packed(m.weight) for m in model.modules() if isinstance(m, torch.nn.Linear)}
        inputs = [(torch.randn(args.batch, c.data.shape[1]), c) for c in copies.values()
                  if isinstance(c, native_fp32.Blocked)]

        def products_pass():
            for x, c in inputs:
                native_fp32.mm(x, c)

        times = {"eager": [], "eager without products": [], "native layers": [], "products pass": []}
        with torch.no_grad():
            llmarch.generate(model, ids, args.new_tokens)
            for _ in range(args.rounds):
                for name in times:
                    os.environ["LLMARCH_FUSED_DECODE"] = "1" if name == "native layers" else "0"
                    if name == "eager without products":
                        dense._mm, native_fp32.mm = empty_mm, empty_native
                    t0 = time.perf_counter()
                    products_pass() if name == "products pass" else llmarch.generate(model, ids, args.new_tokens)
                    times[name].append((time.perf_counter() - t0) / (1 if name == "products pass" else steps))
                    dense._mm, native_fp32.mm = real_mm, real_native
            os.environ.pop("LLMARCH_FUSED_DECODE")
        med = {k: statistics.median(v) for k, v in times.items()}
        nbytes = weight_bytes(model)
        for variant, full, products in (("eager layers", med["eager"], med["eager"] - med["eager without products"]),
                                        ("native layers", med["native layers"], med["products pass"])):
            rows.append(dict(model=kind, variant=variant, step_ms=full * 1e3, rest_ms=(full - products) * 1e3,
                             products_ms=products * 1e3, products_gbs=nbytes / products / 1e9, weight_bytes=nbytes))
            table.append([kind, variant, full * 1e3, (full - products) * 1e3, products * 1e3, products / full,
                          nbytes / products / 1e9])
        rows[-1]["times"] = times
    bandwidth = memory_bandwidth_gbs()
    print_table(table, ["model", "layers", "step ms", "rest ms", "products ms", "products share", "products GB/s"])
    print(f"read bandwidth measured in this run: {bandwidth:.1f} GB/s")
    topic = "decode_overhead" + (f"_b{args.batch}" if args.batch != 1 else "")
    path = write_results(topic, dict(settings=vars(args), read_bandwidth_gbs=bandwidth, rows=rows))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
