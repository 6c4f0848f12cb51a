"""In-process A/B of two versions of the native few-row kernel (``src/llmarch/native/gemv.c``): both built here
with ``llmarch.native``'s compiler and flags, the fp32 product over the same blocked weights
of the LLaMA-style model's five shapes (16 copies each, ~70 MB, so the weights come from memory), one thread,
the two builds alternating round by round; GFLOP/s medians and the median of the per-round ratios, per row count.

    git show HEAD~1:src/llmarch/native/gemv.c > /tmp/gemv_before.c
    PYTHONPATH=src python benchmarks/gemv_ab.py --before /tmp/gemv_before.c [--rows 1,2,6,8,12,16] [--rounds 9]

Writes benchmarks/results/gemv_ab.json.
"""
from __future__ import annotations

import argparse
import ctypes
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, write_results  # noqa: E402

from llmarch import native  # noqa: E402
from llmarch.native.fp32 import Blocked  # noqa: E402

SHAPES = [(768, 512), (512, 512), (2752, 512), (512, 1376), (8192, 512)]  # qkv, out, gate|up, down, head


def build(source: str, out: Path):
    subprocess.run([native._compiler(), *native.FLAGS, "-o", str(out), source], check=True)
    fn = ctypes.CDLL(str(out)).llmarch_f32_gemv
    fn.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 3
    return fn


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--before", required=True, help="the gemv.c to compare against")
    p.add_argument("--after", default=str(Path(__file__).resolve().parents[1] / "src/llmarch/native/gemv.c"))
    p.add_argument("--rows", default="1,2,6,8,12,16")
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--copies", type=int, default=16)
    args = p.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        fns = {k: build(getattr(args, k), Path(tmp) / f"{k}.so") for k in ("before", "after")}
        weights = {s: [Blocked(torch.randn(*s)) for _ in range(args.copies)] for s in SHAPES}
        rows = []
        for M in [int(m) for m in args.rows.split(",")]:
            gflops = {k: [] for k in fns}
            for _ in range(args.rounds):
                for name, fn in fns.items():
                    flops, t0 = 0, time.perf_counter()
                    for (N, K), ws in weights.items():
                        x, y = torch.randn(M, K), torch.empty(M, N)
                        for w in ws:
                            fn(x.data_ptr(), w.data.data_ptr(), None, None, y.data_ptr(), M, N, K)
                        flops += 2 * M * N * K * len(ws)
                    gflops[name].append(flops / (time.perf_counter() - t0) / 1e9)
            ratio = statistics.median(a / b for a, b in zip(gflops["after"], gflops["before"]))
            rows.append(dict(rows=M, before_gflops=statistics.median(gflops["before"]),
                             after_gflops=statistics.median(gflops["after"]), ratio=ratio, runs=gflops))
    print_table([[r["rows"], r["before_gflops"], r["after_gflops"], r["ratio"]] for r in rows],
                ["rows", "before GFLOP/s", "after GFLOP/s", "after / before (median of rounds)"])
    print(f"wrote {write_results('gemv_ab', dict(settings=vars(args), rows=rows))}")


if __name__ == "__main__":
    main()
