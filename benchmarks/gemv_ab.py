"""In-process A/B of two versions of the native few-row kernels (``src/llmarch/native/gemv.c``): both built here
with ``llmarch.native``'s compiler and flags, one kernel (``--kernel``: fp32, int8 or bf16 weights with fp32
activations, or ``bf16-dp``, VDPBF16PS over bf16 activations, on CPUs with AVX-512 BF16) over the same blocked
weights of the LLaMA-style model's five shapes (16 copies each, ~70 MB of fp32, so the weights come from memory;
``--copies 1``: from cache, as an MoE layer's experts over many rows read them), one thread, the two builds
alternating round by round; GFLOP/s medians and the median of the per-round ratios, per row count.

    git show HEAD~1:src/llmarch/native/gemv.c > /tmp/gemv_before.c
    PYTHONPATH=src python benchmarks/gemv_ab.py --before /tmp/gemv_before.c [--kernel int8] [--rows 1,2,6,8,12,16]

Writes benchmarks/results/gemv_ab.json (``gemv_ab_<kernel>.json`` for the other kernels).
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
from llmarch.native import int8 as int8_native  # noqa: E402
from llmarch.native.fp32 import Blocked  # noqa: E402

SHAPES = [(768, 512), (512, 512), (2752, 512), (512, 1376), (8192, 512)]  # qkv, out, gate|up, down, head


KERNELS = {"fp32": "llmarch_f32_gemv", "int8": "llmarch_int8_gemv", "bf16": "llmarch_bf16_gemv",
           "bf16-dp": "llmarch_bf16_gemv_dp"}


def build(source: str, out: Path, kernel: str):
    subprocess.run([native._compiler(), *native.FLAGS, "-o", str(out), source], check=True)
    fn = getattr(ctypes.CDLL(str(out)), KERNELS[kernel])
    fn.argtypes = [ctypes.c_void_p] * (4 if kernel == "bf16-dp" else 5) + [ctypes.c_int64] * 3
    return fn


def weight(shape: tuple[int, int], kernel: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(the kernel's blocked weight, its int8 scales or None) for a random weight of ``shape``."""
    w = torch.randn(*shape)
    if kernel == "int8":
        s = w.abs().amax(1) / 127
        return int8_native.block((w / s[:, None]).round().to(torch.int8), s)
    return Blocked(w.bfloat16() if kernel.startswith("bf16") else w).data, None


def call(fn, kernel: str, x: torch.Tensor, w: tuple[torch.Tensor, torch.Tensor | None], y: torch.Tensor, M: int,
         N: int, K: int):
    data, scales = w
    head = [x.data_ptr(), data.data_ptr()] + ([] if kernel == "bf16-dp" else [None if scales is None else scales.data_ptr()])
    fn(*head, None, y.data_ptr(), M, N, K)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--before", required=True, help="the gemv.c to compare against")
    p.add_argument("--after", default=str(Path(__file__).resolve().parents[1] / "src/llmarch/native/gemv.c"))
    p.add_argument("--rows", default="1,2,6,8,12,16")
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--copies", type=int, default=16)
    p.add_argument("--kernel", choices=sorted(KERNELS), default="fp32")
    args = p.parse_args()
    if args.kernel == "bf16-dp" and "avx512_bf16" not in native._cpu()[1]:
        raise SystemExit("--kernel bf16-dp: this CPU has no AVX-512 BF16")
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        fns = {k: build(getattr(args, k), Path(tmp) / f"{k}.so", args.kernel) for k in ("before", "after")}
        weights = {s: [weight(s, args.kernel) for _ in range(args.copies)] for s in SHAPES}
        rows = []
        for M in [int(m) for m in args.rows.split(",")]:
            for (N, K), ws in weights.items():  # the two builds agree (up to summation order) before being timed
                x = torch.randn(M, K).bfloat16().float()
                ys = {name: torch.empty(M, N) for name in fns}
                for name, fn in fns.items():
                    call(fn, args.kernel, x, ws[0], ys[name], M, N, K)
                if not torch.allclose(ys["before"], ys["after"], rtol=1e-4, atol=1e-3):
                    raise SystemExit(f"the builds disagree at {M} rows of {N} x {K}")
            gflops = {k: [] for k in fns}
            for _ in range(args.rounds):
                for name, fn in fns.items():
                    flops, t0 = 0, time.perf_counter()
                    for (N, K), ws in weights.items():
                        x, y = torch.randn(M, K), torch.empty(M, N)
                        if args.kernel == "bf16-dp":
                            x = x.bfloat16().float()  # bf16 values, as a bf16 layer's activations hold
                        for w in ws:
                            call(fn, args.kernel, x, w, y, M, N, K)
                        flops += 2 * M * N * K * len(ws)
                    gflops[name].append(flops / (time.perf_counter() - t0) / 1e9)
            ratio = statistics.median(a / b for a, b in zip(gflops["after"], gflops["before"]))
            rows.append(dict(rows=M, before_gflops=statistics.median(gflops["before"]),
                             after_gflops=statistics.median(gflops["after"]), ratio=ratio, runs=gflops))
    print_table([[r["rows"], r["before_gflops"], r["after_gflops"], r["ratio"]] for r in rows],
                ["rows", "before GFLOP/s", "after GFLOP/s", "after / before (median of rounds)"])
    name = "gemv_ab" if args.kernel == "fp32" else f"gemv_ab_{args.kernel.replace('-', '_')}"
    print(f"wrote {write_results(name, dict(settings=vars(args), rows=rows))}")


if __name__ == "__main__":
    main()
