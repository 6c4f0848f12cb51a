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
    """Measured dense matmul throughput (GFLOP/s) for n x n @ n x n in ``dtype`` (torch's default backend)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    t, _ = median_time(lambda: a @ b, repeats=repeats)
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
    return dict(fp32_matmul_gflops=matmul_gflops(torch.float32), bf16_matmul_gflops=matmul_gflops(torch.bfloat16),
                read_bandwidth_gbs=memory_bandwidth_gbs())


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
