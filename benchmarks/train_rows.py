"""Few-row training products over a plain fp32 weight: llmarch's native kernels (``llmarch.native.plain``) against
torch's BLAS, per shape and row count, as an expert bank's training runs them (``llmarch.nn.banks``):

- ``mm``:    x [R, in] @ W [in, out]         (forward; W in the bank's [in, out] layout)
- ``mm_t``:  g [R, out] @ W [in, out]^T      (the input gradient)
- ``outer``: x^T @ g -> [in, out]            (the weight gradient, written into a gradient bank)
- ``zero``:  an expert with no rows: its gradient zeroed (torch's ``zero_`` against the non-temporal fill)

Where oneDNN is built in, its products are timed too (the route an expert bank's fp32 products take without
these kernels on hosts where oneDNN is the fp32 route, ``llmarch.nn.dense.ONEDNN_FP32``: x @ W as one row, else
oneDNN; the weight gradient computed by oneDNN and copied into the gradient bank). "route / native" compares the
kernels with the route this host takes without them.

Each call reads the next matrix of a 96 MB pool (so weights come from memory, as an expert bank's do), the
implementations take turns within each round, medians over the rounds. The shapes are ``benchmarks/moe.py``'s
experts (gate_up 512 -> 2048, down 1024 -> 512).

    PYTHONPATH=src python benchmarks/train_rows.py [--rows 1,2,4,8,16,32] [--rounds 15] [--threads 1]
        [--every-row-count]   # also time the kernels where llmarch leaves the rows to BLAS
        [--out train_rows]    # results name

Prints a table of microseconds and ratios (route / native) and writes benchmarks/results/train_rows.json.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import common
from llmarch.native import plain
from llmarch.nn import dense
from llmarch.nn.device import reuse_host_memory

SHAPES = {"gate_up": (512, 2048), "down": (1024, 512)}
ROUTE = "onednn" if dense.ONEDNN_FP32 else "blas"
POOL_BYTES = 96 << 20  # each shape's pool: three times this host's 32 MB last-level cache


def cases(R: int, bank: torch.Tensor, grads: torch.Tensor):
    """(kernel, {implementation: form}) per product; each form takes the pool index. "onednn" (where built in):
    the route of ``llmarch.nn.banks`` on a ``dense.ONEDNN_FP32`` host, one row on torch's BLAS."""
    E, IN, OUT = bank.shape
    x, g = torch.randn(R, IN), torch.randn(R, OUT)
    y, z = torch.empty(R, OUT), torch.empty(R, IN)
    one = R == 1
    out = [
        ("mm", {"blas": lambda e: torch.mm(x, bank[e], out=y), "native": lambda e: plain.mm(x, bank[e], out=y),
                "onednn": lambda e: x @ bank[e] if one else dense._mm(x, bank[e].t(), None)}),
        ("mm_t", {"blas": lambda e: torch.mm(g, bank[e].t(), out=z), "native": lambda e: plain.mm_t(g, bank[e], out=z),
                  "onednn": lambda e: g @ bank[e].t() if one else dense._mm(g, bank[e], None)}),
        ("outer", {"blas": lambda e: torch.mm(x.t(), g, out=grads[e]),
                   "native": lambda e: plain.outer(x, g, grads[e]),
                   "onednn": lambda e: (torch.mm(x.t(), g, out=grads[e]) if one
                                        else grads[e].copy_(dense._mm(x.t(), g.t(), None)))}),
    ]
    if not dense.ONEDNN:
        for _, forms in out:
            del forms["onednn"]
    return out


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
    ap.add_argument("--out", default="train_rows", help="results name (benchmarks/results/NAME.json)")
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
            for kernel, forms in cases(R, bank, grads):
                if forms["native"](0) is None:
                    continue  # outside this kernel's ROWS: BLAS runs it
                t = {k: [] for k in forms}
                turn = 0
                for i in range(args.rounds):  # turns within each round: all see the same load
                    for name, fn in forms.items():
                        t[name].append(timed(fn, turn, pool))
                        turn += 1
                med = {k: statistics.median(v) * 1e6 for k, v in t.items()}
                taken = used[kernel][0] <= R <= used[kernel][1]
                route = med[ROUTE] if ROUTE in med else med["blas"]
                rows.append([shape, kernel, R, med["blas"], med.get("onednn", float("nan")), med["native"],
                             route / med["native"], "yes" if taken else "no"])
                records.append(dict(shape=shape, kernel=kernel, rows=R, median_us=med, used=taken,
                                    route=ROUTE if ROUTE in med else "blas"))
        t = {"zero_": [], "native": []}
        for i in range(args.rounds):
            t["zero_"].append(timed(lambda e: grads[e].zero_(), 2 * i, pool))
            t["native"].append(timed(lambda e: plain.zero(grads[e]), 2 * i + 1, pool))
        med = {k: statistics.median(v) * 1e6 for k, v in t.items()}
        rows.append([shape, "zero", 0, med["zero_"], float("nan"), med["native"], med["zero_"] / med["native"],
                     "yes"])
        records.append(dict(shape=shape, kernel="zero", rows=0, median_us=med))
    print(f"route without the kernels on this host: {ROUTE} (dense.ONEDNN_FP32 = {dense.ONEDNN_FP32})")
    common.print_table(rows, ["shape", "kernel", "rows", "torch us", "onednn us", "native us", "route / native",
                              "used"])
    path = common.write_results(args.out, dict(settings=dict(shapes=SHAPES, pool_bytes=POOL_BYTES, rounds=args.rounds,
                                                             threads=args.threads, rows_taken=used, route=ROUTE,
                                                             cpu=torch.backends.cpu.get_cpu_capability()),
                                                   limits=common.limits(), results=records))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
