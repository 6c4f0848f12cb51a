"""bf16 on a CPU without bf16 products (no oneDNN bf16: an AVX2-only host): llmarch's routes against torch's.

Two tables, one thread by default, interleaved rounds, medians:

1. Products (µs) per weight shape of the two decode models and row count: torch's bf16 ``F.linear`` (its generic
   kernel here), llmarch's widened route (``llmarch.nn.widened``: fp32 BLAS, one bf16 rounding), llmarch's native
   bf16 kernel over the blocked copy (``llmarch.native.bf16``, up to 32 rows), and the fp32 product over the
   native fp32 copy for reference. Weight copies cycled so they stream from memory.
2. Decoding (``--models``: the LLaMA-style model, its Mixtral-style MoE and DeepSeek-V2 style variants from
   benchmarks/decode.py; batch 1 and 8, prompt 16): llmarch bf16 (packed copies, as ``generate`` packs; native
   bf16 decode layers) against transformers' bf16 ``generate`` (sdpa, same weights) and llmarch fp32; tokens/s and
   the fraction of the read-bandwidth bound for the bytes a step streams (``decode.streamed_bytes``: an MoE's
   experts at the share a step is expected to hit), and the share of generated tokens equal to transformers' (bf16
   products summed in another order can flip a near-tie between two logits).

    PYTHONPATH=src python benchmarks/bf16_cpu.py [--threads 1] [--repeats 5] [--new-tokens 32] [--no-products]
        [--models llama,mixtral]

Training (bf16 autocast) and the MoE layer in bf16 are in ``benchmarks/train.py`` and ``benchmarks/moe.py``.
Writes benchmarks/results/bf16_cpu.json.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import memory_bandwidth_gbs, print_table, write_results  # noqa: E402
from decode import CONFIGS, hf_model, round_robin, streamed_bytes  # noqa: E402

import llmarch  # noqa: E402
from llmarch.infer.layout import pack_weights  # noqa: E402
from llmarch.native import bf16 as native_bf16  # noqa: E402
from llmarch.native import fp32 as native_fp32  # noqa: E402
from llmarch.nn import dense, widened  # noqa: E402

SHAPES = ((8192, 512), (2752, 512), (512, 1376), (3072, 768), (768, 3072), (50257, 768))
BF16 = torch.bfloat16


def products(repeats: int) -> list[dict]:
    out = []
    for n_out, n_in in SHAPES:
        copies = max(1, int(100e6 // (n_out * n_in * 2)))
        ws = [torch.randn(n_out, n_in).to(BF16) for _ in range(copies)]
        blocked = [native_fp32.Blocked(w) for w in ws] if native_bf16.available() else []
        blocked32 = [native_fp32.Blocked(w.float()) for w in ws] if native_fp32.available() else []
        for rows in (1, 4, 16, 64):
            x = torch.randn(rows, n_in).to(BF16)
            fns = {"torch bf16": lambda: [F.linear(x, w) for w in ws],
                   "widened": lambda: [widened.linear(x, w) for w in ws]}
            if blocked and rows <= native_fp32.MAX_ROWS:
                fns["native bf16"] = lambda: [native_bf16.mm(x, w) for w in blocked]
            if blocked32 and rows <= native_fp32.MAX_ROWS:
                fns["native fp32"] = lambda: [native_fp32.mm(x.float(), w) for w in blocked32]
            us = {k: statistics.median(t) / copies * 1e6 for k, t in round_robin(fns, repeats).items()}
            out.append(dict(shape=[n_out, n_in], rows=rows, us=us))
            print(f"  [{n_out}, {n_in}] rows {rows}: " + ", ".join(f"{k} {v:.0f}" for k, v in us.items()), flush=True)
    return out


def decoding(args, bandwidth: float, kind: str) -> list[dict]:
    torch.manual_seed(0)
    fp32 = llmarch.build(CONFIGS[kind]()).eval()
    with tempfile.TemporaryDirectory() as tmp:
        hf = hf_model(fp32, kind, tmp).to(BF16)
    ours = llmarch.build(CONFIGS[kind]()).eval()
    ours.load_state_dict(fp32.state_dict())
    ours = ours.to(BF16)
    pack_weights(ours)
    pack_weights(fp32)
    N, rows = args.new_tokens, []
    for B in (1, 8):
        ids = torch.randint(0, fp32.config.vocab_size, (B, 16), generator=torch.Generator().manual_seed(B))
        kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=N, min_new_tokens=N, do_sample=False,
                  pad_token_id=0)
        fns = {"hf bf16 generate": lambda: hf.generate(ids, **kw),
               "llmarch bf16": lambda: llmarch.generate(ours, ids, N),
               "llmarch fp32": lambda: llmarch.generate(fp32, ids, N)}
        with torch.no_grad():
            same = (fns["hf bf16 generate"]()[:, 16:] == fns["llmarch bf16"]()[:, 16:]).float().mean().item()
            times = round_robin(fns, args.repeats)
        hf_tps = B * N / statistics.median(times["hf bf16 generate"])
        for name, t in times.items():
            tps = B * N / statistics.median(t)
            nbytes = streamed_bytes(fp32, B) / (1 if "fp32" in name else 2)
            rows.append(dict(model=kind, batch=B, variant=name, tokens_per_s=tps, vs_hf_bf16=tps / hf_tps,
                             fraction_of_bound=tps / (B * bandwidth * 1e9 / nbytes), tokens_equal_to_hf=same,
                             times=t))
            print(f"  {kind} B={B} {name}: {tps:.1f} tok/s, {tps / hf_tps:.2f}x hf bf16", flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--no-products", dest="products", action="store_false")
    p.add_argument("--models", default="llama", help="comma-separated: llama, mixtral, deepseek")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    bandwidth = memory_bandwidth_gbs()
    print(f"oneDNN bf16: {dense.ONEDNN_BF16}; widened route: {widened.ROUTE}; native bf16: "
          f"{native_bf16.available()}; read bandwidth {bandwidth:.1f} GB/s", flush=True)
    table = products(args.repeats) if args.products else []
    if table:
        print_table([[str(r["shape"]), r["rows"]] + [r["us"].get(k, float("nan")) for k in
                     ("torch bf16", "widened", "native bf16", "native fp32")] for r in table],
                    ["shape", "rows", "torch bf16 us", "widened us", "native bf16 us", "native fp32 us"])
    dec = [r for kind in args.models.split(",") for r in decoding(args, bandwidth, kind)]
    print_table([[r["model"], r["batch"], r["variant"], r["tokens_per_s"], r["vs_hf_bf16"], r["fraction_of_bound"]]
                 for r in dec], ["model", "batch", "variant", "tokens/s", "x hf bf16", "of bound"])
    path = write_results("bf16_cpu", dict(threads=args.threads, read_bandwidth_gbs=bandwidth,
                                          onednn_bf16=dense.ONEDNN_BF16, widened=widened.ROUTE,
                                          native_bf16=native_bf16.available(), products=table, decoding=dec))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
