"""Few-row training products over a plain fp32 weight: llmarch's native kernels (``llmarch.native.plain``) against
torch's BLAS, per shape and row count, as an expert bank's training runs them (``llmarch.nn.banks``):

- ``mm``:    x [R, in] @ W [in, out]         (forward; W in the bank's [in, out] layout)
- ``mm_t``:  g [R, out] @ W [in, out]^T      (the input gradient)
- ``outer``: x^T @ g -> [in, out]            (the weight gradient, written into a gradient bank)
- ``zero``:  an expert with no rows: its gradient zeroed (torch's ``zero_`` against the non-temporal fill)

Each call reads the next matrix of a 96 MB pool (so weights come from memory, as an expert bank's do), the two
implementations take turns within each round, medians over the rounds. The shapes are ``benchmarks/moe.py``'s
experts (gate_up 512 -> 2048, down 1024 -> 512).

    PYTHONPATH=src python benchmarks/train_rows.py [--rows 1,2,4,8,16,32] [--rounds 15] [--threads 1]
        [--every-row-count]   # also time the kernels where llmarch leaves the rows to BLAS

Prints a table of microseconds and ratios (BLAS / native) and writes benchmarks/results/train_rows.json.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import common
from llmarch.native import plain
from llmarch.nn.device import reuse_host_memory

SHAPES = {"gate_up": (512, 2048), "down": (1024, 512)}
POOL_BYTES = 96 << 20  # each shape's pool: three times this host's 32 MB last-level cache


def cases(R: int, bank: torch.Tensor, grads: torch.Tensor):
    """(kernel, torch form, native form) per product; each form takes the pool index."""
    E, IN, OUT = bank.shape
    x, g = torch.randn(R, IN), torch.randn(R, OUT)
    y, z = torch.empty(R, OUT), torch.empty(R, IN)
    return [
        ("mm", lambda e: torch.mm(x, bank[e], out=y), lambda e: plain.mm(x, bank[e], out=y)),
        ("mm_t", lambda e: torch.mm(g, bank[e].t(), out=z), lambda e: plain.mm_t(g, bank[e], out=z)),
        ("outer", lambda e: torch.mm(x.t(), g, out=grads[e]), lambda e: plain.outer(x, g, grads[e])),
    ]


def timed(fn, turn: int, pool: int) -> float:
    """One call on the pool's matrix for this turn (each turn the next one: from memory, not the cache)."""
    t0 = time.perf_counter()
    fn(turn % pool)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", default="1,2,3,4,6,8,12,16,24,32")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--every-row-count", action="store_true",
                    help="time the native kernels at every row count, not only those llmarch sends them")
    args = ap.parse_args()
    used = {k: v for k, v in plain.ROWS.items()}
    if args.every_row_count:
        plain.ROWS.update({k: (1, 1 << 30) for k in plain.ROWS})
    torch.set_num_threads(args.threads)
    reuse_host_memory()
    if not plain.available():
        raise SystemExit("llmarch's native plain kernels are not available here (AVX2 + FMA and a C compiler)")
    rows, records = [], []
    for shape, (IN, OUT) in SHAPES.items():
        pool = -(-POOL_BYTES // (IN * OUT * 4))
        bank, grads = torch.randn(pool, IN, OUT), torch.zeros(pool, IN, OUT)  # pages touched before timing
        for R in [int(r) for r in args.rows.split(",")]:
            for kernel, blas, native in cases(R, bank, grads):
                if native(0) is None:
                    continue  # outside this kernel's ROWS: BLAS runs it
                t = {"blas": [], "native": []}
                for i in range(args.rounds):  # turns within each round: both see the same load
                    t["blas"].append(timed(blas, 2 * i, pool))
                    t["native"].append(timed(native, 2 * i + 1, pool))
                med = {k: statistics.median(v) * 1e6 for k, v in t.items()}
                taken = used[kernel][0] <= R <= used[kernel][1]
                rows.append([shape, kernel, R, med["blas"], med["native"], med["blas"] / med["native"],
                             "yes" if taken else "no"])
                records.append(dict(shape=shape, kernel=kernel, rows=R, median_us=med, used=taken))
        t = {"zero_": [], "native": []}
        for i in range(args.rounds):
            t["zero_"].append(timed(lambda e: grads[e].zero_(), 2 * i, pool))
            t["native"].append(timed(lambda e: plain.zero(grads[e]), 2 * i + 1, pool))
        med = {k: statistics.median(v) * 1e6 for k, v in t.items()}
        rows.append([shape, "zero", 0, med["zero_"], med["native"], med["zero_"] / med["native"], "yes"])
        records.append(dict(shape=shape, kernel="zero", rows=0, median_us=med))
    common.print_table(rows, ["shape", "kernel", "rows", "torch us", "native us", "torch / native", "used"])
    path = common.write_results("train_rows", dict(settings=dict(shapes=SHAPES, pool_bytes=POOL_BYTES, rounds=args.rounds,
                                                                 threads=args.threads, rows_taken=used),
                                                   limits=common.limits(), results=records))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
