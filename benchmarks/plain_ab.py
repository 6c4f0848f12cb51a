"""In-process A/B of two versions of the expert-bank training kernels (``src/llmarch/native/plain.c`` for fp32,
``plain_bf16.c`` for bf16, with the ``tiles.c`` beside each): both built here with ``llmarch.native``'s compiler and
flags (plus ``--before-flags=...`` / ``--after-flags=...``, e.g. ``-DMM_T_PANEL(R,p)=0`` to hold ``g W^T`` to its
``W g^T`` form), one thread, the two builds alternating call by call. The products are an expert bank's, in the
layout the bank trains in (``llmarch.nn.banks``): fp32 row-major (forward ``mm``, input gradient ``mm_t``, weight
gradient ``outer``), bf16 column-major (forward ``mm_t``, input gradient ``mm``, weight gradient ``outer`` into the
transposed gradient), over ``benchmarks/moe.py``'s experts (gate_up 512 -> 2048, down 1024 -> 512), each call on the
next matrix of a 96 MB pool (weights from memory, as a bank's are). Prints median times and the median of the
per-round ratios (before / after: above 1, the new build is faster) per product and row count.

    mkdir -p /tmp/before && for f in plain.c plain_bf16.c tiles.c; do
        git show HEAD~1:src/llmarch/native/$f > /tmp/before/$f; done
    PYTHONPATH=src python benchmarks/plain_ab.py --before /tmp/before [--dtype bf16] [--rows 16,20,32,34,64]

Writes benchmarks/results/plain_ab.json (``plain_ab_bf16.json`` for bf16).
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

SHAPES = {"gate_up": (512, 2048), "down": (1024, 512)}  # (in, out)
POOL_BYTES = 96 << 20
NATIVE = Path(__file__).resolve().parents[1] / "src/llmarch/native"


def build(folder: str, flags: str, out: Path, bf16: bool) -> dict:
    """The three products of ``folder``'s plain.c (plain_bf16.c), its tiles.c included from the same folder."""
    source = Path(folder) / ("plain_bf16.c" if bf16 else "plain.c")
    subprocess.run([native._compiler(), *native.FLAGS, *flags.split(), f"-I{folder}", "-o", str(out), str(source)],
                   check=True)
    lib, prefix = ctypes.CDLL(str(out)), "llmarch_plain_bf16_" if bf16 else "llmarch_plain_"
    fns = {}
    for name in ("mm", "mm_t", "outer"):
        fns[name] = getattr(lib, prefix + name)
        fns[name].argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 5
    return fns


def products(R: int, IN: int, OUT: int, bf16: bool):
    """(product, kernel, call(fn, w, out)) for a bank's layout: w is one expert's matrix as the bank stores it
    (fp32 [in, out]; bf16 [out, in]), out the product's output (the weight gradient: a matrix like w)."""
    dtype = torch.bfloat16 if bf16 else torch.float32
    x, g = torch.randn(R, IN).to(dtype), torch.randn(R, OUT).to(dtype)
    y, z = torch.empty(R, OUT), torch.empty(R, IN)
    p = lambda t: t.data_ptr()  # noqa: E731
    if bf16:  # the forward and input gradient over w [out, in]; the weight gradient written as its [out, in]
        return [("x @ W", "mm_t", lambda fn, w, out: fn(p(y), p(x), p(w), R, OUT, IN, IN, IN), y),
                ("g @ W^T", "mm", lambda fn, w, out: fn(p(z), p(g), p(w), R, OUT, IN, IN, OUT), z),
                ("x^T g", "outer", lambda fn, w, out: fn(p(out), p(g), p(x), R, OUT, IN, OUT, IN), None)]
    return [("x @ W", "mm", lambda fn, w, out: fn(p(y), p(x), p(w), R, IN, OUT, OUT, IN), y),
            ("g @ W^T", "mm_t", lambda fn, w, out: fn(p(z), p(g), p(w), R, IN, OUT, OUT, OUT), z),
            ("x^T g", "outer", lambda fn, w, out: fn(p(out), p(x), p(g), R, IN, OUT, IN, OUT), None)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--before", required=True, help="a folder holding the plain.c / plain_bf16.c and tiles.c to "
                                                    "compare against")
    ap.add_argument("--after", default=str(NATIVE), help="the folder of the new build (default: this tree's)")
    ap.add_argument("--before-flags", default="")
    ap.add_argument("--after-flags", default="")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--rows", default="16,20,24,32,34,40,48,64")
    ap.add_argument("--rounds", type=int, default=21)
    args = ap.parse_args()
    bf16 = args.dtype == "bf16"
    if bf16 and "avx512_bf16" not in native._cpu()[1]:
        raise SystemExit("--dtype bf16: this CPU has no AVX-512 BF16")
    torch.set_num_threads(1)
    dtype = torch.bfloat16 if bf16 else torch.float32
    records, table = [], []
    with tempfile.TemporaryDirectory() as tmp:
        fns = {k: build(getattr(args, k), getattr(args, f"{k}_flags"), Path(tmp) / f"{k}.so", bf16)
               for k in ("before", "after")}
        for shape, (IN, OUT) in SHAPES.items():
            size = IN * OUT * (2 if bf16 else 4)
            stored = (OUT, IN) if bf16 else (IN, OUT)
            pool = [torch.randn(*stored).to(dtype) for _ in range(-(-POOL_BYTES // size))]
            grads = [torch.empty(*stored, dtype=dtype) for _ in range(2)]
            for R in [int(r) for r in args.rows.split(",")]:
                for product, kernel, call, result in products(R, IN, OUT, bf16):
                    got = []
                    for k, out in zip(fns, grads):  # the two builds agree (up to summation order) first
                        call(fns[k][kernel], pool[0], out)
                        got.append((out if result is None else result).float().clone())
                    if not torch.allclose(*got, rtol=2e-2 if bf16 else 1e-4, atol=1e-2 if bf16 else 1e-4):
                        raise SystemExit(f"the builds disagree on {shape} {product} at {R} rows")
                    t, turn = {k: [] for k in fns}, 0
                    for rnd in range(args.rounds):
                        for k in (("before", "after") if rnd % 2 else ("after", "before")):
                            t0 = time.perf_counter()
                            call(fns[k][kernel], pool[turn % len(pool)], grads[0])
                            t[k].append(time.perf_counter() - t0)
                            turn += 1
                    med = {k: statistics.median(v) * 1e6 for k, v in t.items()}
                    ratio = statistics.median(a / b for a, b in zip(t["before"], t["after"]))
                    table.append([shape, product, kernel, R, med["before"], med["after"], ratio])
                    records.append(dict(shape=shape, product=product, kernel=kernel, rows=R, median_us=med,
                                        before_over_after=ratio))
    print_table(table, ["shape", "product", "kernel", "rows", "before us", "after us", "before / after (paired)"])
    name = "plain_ab_bf16" if bf16 else "plain_ab"
    print(f"wrote {write_results(name, dict(settings=vars(args), results=records))}")


if __name__ == "__main__":
    main()
