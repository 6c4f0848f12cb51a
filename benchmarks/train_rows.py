"""Few-row training products over a plain weight (fp32; bf16 with ``--dtype bf16``): llmarch's native kernels
(``llmarch.native.plain``) against torch's products, per shape and row count, as an expert bank's training runs
them (``llmarch.nn.banks``):

- ``mm``:    x [R, in] @ W [in, out]         (forward; W in the bank's [in, out] layout)
- ``mm_t``:  g [R, out] @ W [in, out]^T      (the input gradient)
- ``outer``: x^T @ g -> [in, out]            (the weight gradient, written into a gradient bank)
- ``zero``:  an expert with no rows: its gradient zeroed (torch's ``zero_`` against the non-temporal fill)

``--dtype bf16``: a bf16 bank in its CPU layout (column-major) through the bf16 kernels (AVX-512 BF16), against
torch's bf16 products (oneDNN's where the CPU has them). Its forward is the ``mm_t`` kernel (dot products over the
expert's [out, in] rows), its input gradient the ``mm`` kernel.

Where oneDNN is built in, its products are timed too (the route an expert bank's fp32 products take without
these kernels on hosts where oneDNN is the fp32 route, ``llmarch.nn.dense.ONEDNN_FP32``: x @ W as one row, else
oneDNN; the weight gradient computed by oneDNN and copied into the gradient bank). "route / native" compares the
kernels with the route this host takes without them.

Each call reads the next matrix of a 96 MB pool (so weights come from memory, as an expert bank's do), the
implementations take turns within each round, medians over the rounds. The shapes are ``benchmarks/moe.py``'s
experts (gate_up 512 -> 2048, down 1024 -> 512).

    PYTHONPATH=src python benchmarks/train_rows.py [--rows 1,2,4,8,16,32] [--rounds 15] [--threads 1] [--dtype bf16]
        [--every-row-count]   # also time the kernels where llmarch leaves the rows to BLAS
        [--out train_rows]    # results name

Prints a table of microseconds and ratios (route / native) and writes benchmarks/results/train_rows.json
(``train_rows_bf16.json`` for bf16; ``--out`` names another).
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
PRODUCTS = {"mm": "x @ W", "mm_t": "g @ W^T", "outer": "x^T g"}
BF16 = torch.bfloat16
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
    return [(PRODUCTS[kernel], kernel, forms) for kernel, forms in out]


def cases_bf16(R: int, bank: torch.Tensor, grads: torch.Tensor):
    """The same products over a bf16 bank in its CPU layout (column-major: each expert's [out, in] rows contiguous,
    llmarch.nn.experts), so the forward is the dot-product kernel and the input gradient the streaming one;
    against torch's bf16 products (oneDNN's where the CPU has them), the route of the ``grouped`` dispatcher."""
    E, IN, OUT = bank.shape
    x, g = torch.randn(R, IN, dtype=BF16), torch.randn(R, OUT, dtype=BF16)
    return [
        ("x @ W", "mm_t", {"torch": lambda e: torch.mm(x, bank[e]), "native": lambda e: plain.mm_t(x, bank[e].t())}),
        ("g @ W^T", "mm", {"torch": lambda e: torch.mm(g, bank[e].t()), "native": lambda e: plain.mm(g, bank[e].t())}),
        ("x^T g", "outer", {"torch": lambda e: torch.mm(g.t(), x, out=grads[e].t()),
                            "native": lambda e: plain.outer(g, x, grads[e].t())}),
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
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"],
                    help="bf16: a bf16 bank in its CPU (column-major) layout against torch's bf16 products")
    ap.add_argument("--out", default=None, help="results name (benchmarks/results/NAME.json; train_rows[_bf16])")
    args = ap.parse_args()
    bf16 = args.dtype == "bf16"
    table = plain.ROWS_BF16 if bf16 else plain.ROWS
    used = {k: v for k, v in table.items()}
    if args.every_row_count:
        table.update({k: (1, 1 << 30) for k in table})
    route = "torch" if bf16 else ROUTE
    torch.set_num_threads(args.threads)
    reuse_host_memory()
    if not plain.available():
        raise SystemExit("llmarch's native plain kernels are not available here (AVX2 + FMA and a C compiler)")
    if bf16 and not plain.bf16_available():
        raise SystemExit("llmarch's bf16 plain kernels are not available here (AVX-512 BF16 and a C compiler)")
    rows, records = [], []
    for shape, (IN, OUT) in SHAPES.items():
        pool = -(-POOL_BYTES // (IN * OUT * (2 if bf16 else 4)))
        if bf16:  # column-major experts, as llmarch.nn.experts stores a bf16 bank on the CPU
            bank = torch.randn(pool, OUT, IN, dtype=BF16).transpose(1, 2)
            grads = torch.zeros(pool, OUT, IN, dtype=BF16).transpose(1, 2)  # pages touched before timing
        else:
            bank, grads = torch.randn(pool, IN, OUT), torch.zeros(pool, IN, OUT)
        for R in [int(r) for r in args.rows.split(",")]:
            for product, kernel, forms in (cases_bf16 if bf16 else cases)(R, bank, grads):
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
                took = route if route in med else "blas"
                rows.append([shape, product, kernel, R, med.get("blas", med.get("torch")),
                             med.get("onednn", float("nan")), med["native"], med[took] / med["native"],
                             "yes" if taken else "no"])
                records.append(dict(shape=shape, product=product, kernel=kernel, rows=R, median_us=med, used=taken,
                                    route=took))
        t = {"zero_": [], "native": []}
        for i in range(args.rounds):
            t["zero_"].append(timed(lambda e: grads[e].zero_(), 2 * i, pool))
            t["native"].append(timed(lambda e: plain.zero(grads[e]), 2 * i + 1, pool))
        med = {k: statistics.median(v) * 1e6 for k, v in t.items()}
        rows.append([shape, "unused expert", "zero", 0, med["zero_"], float("nan"), med["native"],
                     med["zero_"] / med["native"], "yes"])
        records.append(dict(shape=shape, kernel="zero", rows=0, median_us=med))
    print(f"{args.dtype}; route without the kernels on this host: {route} (dense.ONEDNN_FP32 = {dense.ONEDNN_FP32}, "
          f"ONEDNN_BF16 = {dense.ONEDNN_BF16})")
    common.print_table(rows, ["shape", "product", "kernel", "rows", "torch us", "onednn us", "native us",
                              "route / native", "used"])
    name = args.out or ("train_rows_bf16" if bf16 else "train_rows")
    path = common.write_results(name, dict(settings=dict(shapes=SHAPES, pool_bytes=POOL_BYTES, rounds=args.rounds,
                                                         threads=args.threads, rows_taken=used, route=route,
                                                         dtype=args.dtype,
                                                         cpu=torch.backends.cpu.get_cpu_capability()),
                                               limits=common.limits(), results=records))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
