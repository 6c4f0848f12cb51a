"""Shared benchmark tools: median timing, the machine's limits measured in the same run, and result files.

Every benchmark prints a table and writes ``benchmarks/results/<topic>.json`` with the machine, the settings,
the raw repeats and their medians.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
import weakref
from pathlib import Path
from typing import Callable

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def median_time(fn: Callable[[], object], repeats: int = 5, warmup: int = 1,
                clock: Callable[[], float] = time.perf_counter) -> tuple[float, list[float]]:
    """Median seconds of ``fn()`` over ``repeats`` runs after ``warmup`` runs, and the raw times. ``clock``: wall
    time by default; ``time.process_time`` counts this process's CPU time (steadier on a shared machine)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = clock()
        fn()
        times.append(clock() - t0)
    return statistics.median(times), times


def matmul_gflops(dtype: torch.dtype = torch.float32, n: int = 2048, repeats: int = 5) -> float:
    """Measured dense matmul throughput (GFLOP/s) for n x n @ n x n in ``dtype`` (torch's default backend). Where
    one 512 x 512 product takes over 20 ms (bf16 on a CPU without bf16 products: torch's generic kernel, ~1
    GFLOP/s), n is 512: the 2048 one would take minutes."""
    small = torch.randn(512, 512, dtype=dtype)
    t0 = time.perf_counter()
    small @ small
    if time.perf_counter() - t0 > 0.02:
        n = 512
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    t, _ = median_time(lambda: a @ b, repeats=repeats)
    return 2 * n**3 / t / 1e9


def widened_bf16_gflops(n: int = 2048, repeats: int = 5) -> float:
    """bf16 n x n products as llmarch runs them on a CPU without bf16 products (``llmarch.nn.widened``): widened to
    fp32, multiplied by torch's BLAS, rounded to bf16 (the conversions included)."""
    a, b = torch.randn(n, n, dtype=torch.bfloat16), torch.randn(n, n, dtype=torch.bfloat16)
    t, _ = median_time(lambda: (a.float() @ b.float()).bfloat16(), repeats=repeats)
    return 2 * n**3 / t / 1e9


def onednn_matmul_gflops(n: int = 2048, repeats: int = 5) -> float:
    """fp32 n x n matmul through oneDNN (mkldnn_linear on blocked tensors), the kernel torch does not pick by
    default for dense fp32 matmuls (llmarch's fp32 CPU projections use it: ``llmarch.nn.dense``)."""
    a, w = torch.randn(n, n).to_mkldnn(), torch.randn(n, n).to_mkldnn()
    t, _ = median_time(lambda: torch._C._nn.mkldnn_linear(a, w, None), repeats=repeats)
    return 2 * n**3 / t / 1e9


def memory_bandwidth_gbs(mb: int = 512, repeats: int = 5) -> float:
    """Measured read bandwidth (GB/s): summing a buffer much larger than the caches."""
    x = torch.ones(mb * 1024 * 1024 // 4, dtype=torch.float32)
    t, _ = median_time(lambda: x.sum(), repeats=repeats)
    return x.numel() * 4 / t / 1e9


def machine() -> dict:
    return dict(python=sys.version.split()[0], torch=torch.__version__, platform=platform.platform(),
                cpu=platform.processor() or platform.machine(), threads=torch.get_num_threads(),
                cores=os.cpu_count())


def limits() -> dict:
    """The machine's limits, measured now (so ratios to them share the run's conditions)."""
    from llmarch.nn import widened

    out = dict(fp32_matmul_gflops=matmul_gflops(torch.float32), bf16_matmul_gflops=matmul_gflops(torch.bfloat16),
               read_bandwidth_gbs=memory_bandwidth_gbs())
    if widened.ROUTE:  # bf16 products here run widened to fp32: their peak is that route's
        out["bf16_torch_matmul_gflops"] = out["bf16_matmul_gflops"]
        out["bf16_matmul_gflops"] = widened_bf16_gflops()
    return out


def write_results(topic: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{topic}.json"
    payload = dict(payload, machine=machine(), written=time.strftime("%Y-%m-%d %H:%M:%S"))
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return path


def print_table(rows: list[list], header: list[str]) -> None:
    cells = [header] + [[f"{c:.4g}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for j, r in enumerate(cells):
        print("  ".join(c.rjust(w) for c, w in zip(r, widths)))
        if j == 0:
            print("  ".join("-" * w for w in widths))


class PeakLive(torch.utils._python_dispatch.TorchDispatchMode):
    """Peak bytes of the tensors created inside the mode and still alive (device-free: counts the storages of
    freshly allocated outputs; freed when their tensor is collected). Parameters and inputs made before are not
    counted."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.seen: set[int] = set()

    def _free(self, key: int, n: int) -> None:
        self.seen.discard(key)
        self.live -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t._base is None and t.untyped_storage().data_ptr() not in self.seen:
                key, n = t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()
                if key:
                    self.seen.add(key)
                    self.live += n
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(t, self._free, key, n)
        return out
