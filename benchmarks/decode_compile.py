"""Compiled decode: the static cache + ``torch.compile`` step against llmarch eager and transformers ``generate``,
with the compile time of a cold and of a warm inductor cache.

    PYTHONPATH=src python benchmarks/decode_compile.py [--models llama] [--batches 1,8] [--repeats 3]

writes benchmarks/results/decode_compile_<models>.json.

Runs itself twice in fresh processes sharing one new ``TORCHINDUCTOR_CACHE_DIR``: the first compiles cold, the
second finds the first's compiled graphs on disk (what a second ``llmarch generate --compile`` run sees).
Compile time = first compiled ``generate`` call − the median of the later ones. Each process then times
transformers (SDPA, dynamic cache), llmarch eager and llmarch static + compile in turns on the same weights
(greedy, 16-token prompt, ``--new-tokens`` new tokens) and checks that all three give the same tokens.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, write_results  # noqa: E402
from decode import CONFIGS, hf_model, round_robin  # noqa: E402

import llmarch  # noqa: E402


def child(args) -> list[dict]:
    """One process: compile time, then the interleaved timing, per model and batch."""
    torch._dynamo.config.recompile_limit = 64
    rows = []
    for kind in args.models.split(","):
        torch.manual_seed(0)
        model = llmarch.build(CONFIGS[kind]()).eval()
        with tempfile.TemporaryDirectory() as tmp:
            hf = hf_model(model, kind, tmp)
        for B in args.batches:
            N = args.new_tokens
            ids = torch.randint(0, model.config.vocab_size, (B, 16), generator=torch.Generator().manual_seed(B))
            hf_kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=N, min_new_tokens=N, do_sample=False,
                         pad_token_id=0)
            fns = {"transformers": lambda: hf.generate(ids, **hf_kw),
                   "llmarch eager": lambda: llmarch.generate(model, ids, N),
                   "llmarch static + compile": lambda: llmarch.generate(model, ids, N, cache="static", compile=True)}
            t0 = time.perf_counter()
            compiled_out = fns["llmarch static + compile"]()
            first = time.perf_counter() - t0
            with torch.no_grad():
                same = (torch.equal(compiled_out, fns["llmarch eager"]())
                        and torch.equal(compiled_out, fns["transformers"]()))
                times = round_robin(fns, args.repeats)
            med = {k: statistics.median(v) for k, v in times.items()}
            row = dict(model=kind, batch=B, new_tokens=N, same_tokens=same, load=os.getloadavg(),
                       compile_s=first - med["llmarch static + compile"], first_call_s=first,
                       tokens_per_s={k: B * N / v for k, v in med.items()}, times=times)
            row["compiled_vs_hf"] = med["transformers"] / med["llmarch static + compile"]
            row["compiled_vs_eager"] = med["llmarch eager"] / med["llmarch static + compile"]
            row["eager_vs_hf"] = med["transformers"] / med["llmarch eager"]
            rows.append(row)
            print(f"  {kind} B={B}: compile {row['compile_s']:.1f} s, " + ", ".join(
                f"{k} {v:.1f} tok/s" for k, v in row["tokens_per_s"].items()), file=sys.stderr, flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--models", default="llama")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    args.batches = [int(b) for b in args.batches.split(",")]
    if args.child:
        json.dump(child(args), sys.stdout)
        return
    runs = {}
    with tempfile.TemporaryDirectory() as cache_dir:
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache_dir)
        for phase in ("cold", "warm"):
            print(f"{phase} inductor cache ({cache_dir})", flush=True)
            out = subprocess.run([sys.executable, __file__, "--child"] + sys.argv[1:], env=env, check=True,
                                 stdout=subprocess.PIPE, text=True).stdout
            runs[phase] = json.loads(out)
    table = []
    for phase, rows in runs.items():
        for r in rows:
            tps = r["tokens_per_s"]
            table.append([phase, r["model"], r["batch"], r["compile_s"], tps["transformers"], tps["llmarch eager"],
                          tps["llmarch static + compile"], r["eager_vs_hf"], r["compiled_vs_hf"], r["same_tokens"]])
    print_table(table, ["cache", "model", "B", "compile s", "HF tok/s", "eager tok/s", "compiled tok/s",
                        "eager x HF", "compiled x HF", "same tokens"])
    path = write_results("decode_compile_" + args.models.replace(",", "_"), dict(settings=vars(args), runs=runs))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
