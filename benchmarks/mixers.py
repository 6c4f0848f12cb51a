"""Linear-time mixers against softmax attention: one layer (D 512, 8 heads of 64; Mamba-2 with expand 2, 8 heads
of 128, d_state 64, one B/C group; batch 1, fp32, inference forward).

1. Prefill: time and peak memory vs length (1k..32k) for SDPA attention (causal) and the chunked forms of linear
   attention and SSD (and the gated delta rule when the registry has "gated_delta"), and their parallel
   (quadratic) forms up to ``--parallel-max``. Each (variant, length) runs in a fresh process (peak RSS above the
   level after the inputs were made) under a 12 GiB address-space cap; a variant whose last length took more
   than ``--budget`` seconds skips the longer ones (said in the table).
2. Decode: time of one new token with a cache holding a context of 1k..16k tokens (attention: k/v of that many
   tokens; recurrent mixers: their fixed state), median over 20 steps.

Times are **CPU seconds of the worker process on one thread** (``time.process_time``, ``torch.set_num_threads(1)``),
not wall time: on a machine shared with other jobs the wall clock mostly measures the scheduler, while the CPU
seconds a single-threaded run spends are its work (memory-bandwidth contention still shows).

Run: ``PYTHONPATH=src python benchmarks/mixers.py [--lengths 1024,...] [--parallel-max 8192] [--budget 60]``;
prints the tables and writes benchmarks/results/mixers.json.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import median_time, print_table, write_results  # noqa: E402

D, H, DH, CHUNK = 512, 8, 64, 128
VARIANTS = ("sdpa-attention", "linear-chunked", "linear-parallel", "ssd-chunked", "ssd-parallel",
            "gated_delta-chunked")
PARALLEL = ("linear-parallel", "ssd-parallel")
MEM_CAP = 12 * 2**30


def cpu_time(fn, repeats: int, warmup: int = 1) -> tuple[float, list[float]]:
    """Median CPU seconds of ``fn()`` in this process, and the raw times."""
    return median_time(fn, repeats=repeats, warmup=warmup, clock=time.process_time)


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def layer(name: str):
    """The module of a variant and whether it exists in this build."""
    import llmarch
    from llmarch.nn.mixers import MIXERS

    kind, _, form = name.partition("-")
    fields = dict(vocab_size=256, d_model=D, n_layers=1, n_heads=H, d_ff=4 * D, position="none", norm_bias=False,
                  ssm=dict(d_state=64, n_groups=1, expand=2, head_dim=128, chunk_size=CHUNK,
                           form="chunked" if form == "attention" else form))
    mixer = {"sdpa": "attention", "ssd": "mamba2"}.get(kind, kind)
    if mixer not in MIXERS:
        return None
    try:
        cfg = llmarch.ModelConfig(**fields, mixer=mixer, ffn="none" if mixer == "mamba2" else "glu")
        return llmarch.build(cfg).decoder.layers[0].attn.eval()
    except (TypeError, ValueError) as e:  # a mixer from another branch whose settings this script does not know
        print(f"  {name}: not built ({e})", file=sys.stderr)
        return None


def context(T: int, start: int = 0):
    import torch

    from llmarch.nn.attention import AttnContext
    from llmarch.nn.position import NoPositions

    return AttnContext(start, T, NoPositions(), torch.arange(start, start + T)[None], None, causal=True,
                       device=torch.device("cpu"))


def prefill_worker(name: str, T: int) -> None:
    import torch

    resource.setrlimit(resource.RLIMIT_AS, (MEM_CAP, MEM_CAP))
    torch.set_num_threads(1)
    torch.manual_seed(0)
    mod = layer(name)
    x = torch.randn(1, T, D)
    base = _maxrss_mb()
    with torch.no_grad():
        first, _ = cpu_time(lambda: mod(x, context(T)), repeats=1, warmup=0)
        peak = _maxrss_mb() - base
        med, times = cpu_time(lambda: mod(x, context(T)), repeats=2, warmup=0) if first < 5 else (first, [])
    print(json.dumps(dict(variant=name, T=T, seconds=med, times=[first] + times, peak_mb=peak)))


def decode_worker(name: str, S: int) -> None:
    import torch

    from llmarch.nn.cache import StateCache

    torch.set_num_threads(1)
    torch.manual_seed(0)
    mod = layer(name)
    cache = StateCache()
    with torch.no_grad():  # fill the cache to a context of S tokens (values do not change the work)
        mod(torch.randn(1, 1, D), context(1), cache)
        for d in (cache.k, cache.v):
            for i, t in d.items():
                d[i] = torch.randn(*t.shape[:2], S, t.shape[-1])
        cache.length = S
        x = torch.randn(1, 1, D)

        def step():
            mod(x, context(1, cache.length), cache)
            cache.advance(1)

        med, times = cpu_time(step, repeats=50, warmup=5)
    print(json.dumps(dict(variant=name, S=S, ms_per_token=1e3 * med, times=times)))


def run_worker(*args: str) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--worker", *args], capture_output=True, text=True)
    if proc.returncode:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return dict(skipped=f"failed: {tail[:120]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", nargs=3)
    ap.add_argument("--lengths", default="1024,2048,4096,8192,16384,32768")
    ap.add_argument("--contexts", default="1024,4096,16384")
    ap.add_argument("--parallel-max", type=int, default=8192)
    ap.add_argument("--budget", type=float, default=60.0)
    args = ap.parse_args()
    if args.worker:
        kind, name, n = args.worker
        return (prefill_worker if kind == "prefill" else decode_worker)(name, int(n))
    variants = [v for v in VARIANTS if layer(v) is not None]
    lengths = [int(t) for t in args.lengths.split(",")]
    prefill, last = [], {}
    for name in variants:
        for T in lengths:
            if name in PARALLEL and T > args.parallel_max:
                r = dict(skipped=f"parallel form capped at {args.parallel_max} (O(T^2) memory)")
            elif last.get(name, 0) > args.budget:
                r = dict(skipped=f"previous length took {last[name]:.0f} s > budget {args.budget:.0f} s")
            else:
                r = run_worker("prefill", name, str(T))
                last[name] = r.get("seconds", float("inf"))
            prefill.append(dict(r, variant=name, T=T))
            print(f"  prefill {name} T={T}: " + (r.get("skipped") or f"{r['seconds']:.3f} s, {r['peak_mb']:.0f} MB"),
                  flush=True)
    contexts = [int(s) for s in args.contexts.split(",")]
    decode = []
    for name in [v for v in variants if v not in PARALLEL]:
        for S in contexts:
            r = run_worker("decode", name, str(S))
            decode.append(dict(r, variant=name, S=S))
            print(f"  decode {name} S={S}: " + (r.get("skipped") or f"{r['ms_per_token']:.3f} ms"), flush=True)
    report(variants, lengths, contexts, prefill, decode)
    path = write_results("mixers", dict(settings=dict(d_model=D, heads=H, head_dim=DH, chunk=CHUNK, batch=1,
                                                      dtype="float32", budget_s=args.budget,
                                                      parallel_max=args.parallel_max),
                                        prefill=prefill, decode=decode))
    print(f"\nwrote {path}")


def _get(rows, name, key, n):
    return next((r for r in rows if r["variant"] == name and r[key] == n), {})


def report(variants, lengths, contexts, prefill, decode) -> None:
    rows = []
    for name in variants:
        cells = []
        for T in lengths:
            r = _get(prefill, name, "T", T)
            cells.append(f"{T / r['seconds']:.0f} tok/s, {r['peak_mb']:.0f} MB" if "seconds" in r else "skipped")
        rows.append([name, *cells])
    print("\nPrefill: tokens per CPU second (one thread) and peak memory, one layer, batch 1, fp32")
    print_table(rows, ["variant", *[f"T={T}" for T in lengths]])
    rows = []
    for name in [v for v in variants if v not in PARALLEL]:
        ms = [_get(decode, name, "S", S).get("ms_per_token") for S in contexts]
        spread = (f"{100 * (ms[-1] / ms[0] - 1):+.0f} %" if None not in ms else "-")
        rows.append([name, *[f"{m:.3f}" if m is not None else "failed" for m in ms], spread])
    print("\nDecode: CPU ms per token vs context (one layer, one thread)")
    print_table(rows, ["variant", *[f"S={S}" for S in contexts], f"{contexts[-1]} vs {contexts[0]}"])
    rows = []
    for name, par in (("linear-chunked", "linear-parallel"), ("ssd-chunked", "ssd-parallel"),
                      ("gated_delta-chunked", None)):
        for T in (4096, 8192):
            c, p, a = (_get(prefill, n, "T", T) if n else {} for n in (name, par, "sdpa-attention"))
            if "seconds" in c:
                rows.append([name, T, f"{p['seconds'] / c['seconds']:.1f}x" if "seconds" in p else "-",
                             f"{c['seconds'] / a['seconds']:.2f}" if "seconds" in a else "-"])
    print("\nTargets: chunked vs its parallel form (speed-up), chunked time / SDPA time")
    print_table(rows, ["variant", "T", "parallel / chunked", "chunked / sdpa"])


if __name__ == "__main__":
    main()
