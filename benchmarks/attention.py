"""Sparse attention: time and peak memory of one attention layer (D 512, 8 heads, batch 1, fp32, forward) at 1k,
4k, 16k and 32k tokens, dense SDPA vs the sparse patterns on the block-sparse execution, with the growth exponent
fitted over the lengths; transformers' own Longformer / BigBird layers at the same sizes; and the KV-cache bytes
per token of MHA / GQA / MQA (Llama-2-7B and variants) vs MLA (DeepSeek-V2-Lite), from the real cache objects.

Each (variant, length) runs in a fresh process so its peak resident memory (ru_maxrss above the level after the
inputs were made) is its own. Run: ``PYTHONPATH=src python benchmarks/attention.py [--lengths 1024,4096,...]``.
"""
from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import median_time, print_table, write_results  # noqa: E402

D, H = 512, 8
VARIANTS = {  # name: (pattern, causal, sparse fields)
    "dense-sdpa": ("dense", True, {}),
    "sliding-512": ("sliding", True, dict(block=64)),
    "strided-128": ("strided", True, dict(block=64, stride=128)),
    "longformer-512": ("longformer", False, dict(block=64, global_tokens=(0,))),
    "bigbird-64x3": ("bigbird", False, dict(block=64, random_blocks=3)),
}
HF_VARIANTS = ("hf-longformer-512", "hf-bigbird-64x3")
SKIP = {("dense-sdpa", 32768): "skipped to keep the run short: ~4x the 16k time (quadratic), about 45 s per "
                               "forward on the loaded 2-core machine"}


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def ours(name: str, T: int):
    import torch

    from llmarch.attention_config import SparseConfig
    from llmarch.nn.attention import Attention, AttnContext
    from llmarch.nn.patterns import build_pattern
    from llmarch.nn.position import NoPositions

    pattern_name, causal, sparse = VARIANTS[name]
    sparse = SparseConfig(**sparse, execution="blocks")
    pattern = build_pattern(pattern_name, window=257 if pattern_name == "longformer" else 512, sparse=sparse)
    layer = Attention(D, H, H, D // H, layer_idx=0, pattern=pattern, execution="blocks", block=sparse.block).eval()
    x = torch.randn(1, T, D)
    pos = torch.arange(T)[None]

    def run():
        ctx = AttnContext(0, T, NoPositions(), pos, None, causal=causal, device=x.device)
        return layer(x, ctx)

    return run


def hf(name: str, T: int):
    import torch

    x = torch.randn(1, T, D)
    if name == "hf-longformer-512":
        from transformers import LongformerConfig
        from transformers.models.longformer.modeling_longformer import LongformerSelfAttention

        layer = LongformerSelfAttention(LongformerConfig(hidden_size=D, num_attention_heads=H,
                                                         attention_window=[512]), layer_id=0).eval()
        glob = torch.zeros(1, T, dtype=torch.bool)
        glob[0, 0] = True
        mask = torch.zeros(1, T).masked_fill(glob, 10000.0)
        return lambda: layer(x, attention_mask=mask, is_index_masked=torch.zeros_like(glob),
                             is_index_global_attn=glob, is_global_attn=True)
    from transformers import BigBirdConfig
    from transformers.models.big_bird.modeling_big_bird import BigBirdBlockSparseAttention, BigBirdModel

    layer = BigBirdBlockSparseAttention(BigBirdConfig(hidden_size=D, num_attention_heads=H, block_size=64,
                                                      num_random_blocks=3, max_position_embeddings=T), seed=0)
    layer.train()  # seeded random blocks (no dropout in this layer)
    blocked, band, from_mask, to_mask = BigBirdModel.create_masks_for_block_sparse_attn(torch.ones(1, T), 64)
    return lambda: layer(x, band_mask=band, from_mask=from_mask, to_mask=to_mask, from_blocked_mask=blocked,
                         to_blocked_mask=blocked)


def worker(name: str, T: int) -> None:
    import torch

    torch.manual_seed(0)
    with torch.no_grad():
        fn = hf(name, T) if name.startswith("hf-") else ours(name, T)
        base = _maxrss_mb()
        t0 = time.perf_counter()
        fn()
        first = time.perf_counter() - t0
        peak = _maxrss_mb() - base
        repeats = 3 if first < 2.0 else 1
        med, times = median_time(fn, repeats=repeats, warmup=0)
    print(json.dumps(dict(variant=name, T=T, seconds=med, times=[first] + times, peak_mb=peak)))


def measure(name: str, T: int) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--worker", name, str(T)], capture_output=True, text=True)
    if proc.returncode:
        return dict(variant=name, T=T, skipped=f"failed: {proc.stderr.strip().splitlines()[-1]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def exponent(points: list[tuple[int, float]]) -> float | None:
    """Least-squares slope of log(y) against log(T)."""
    if len(points) < 2:
        return None
    xs, ys = [math.log(t) for t, _ in points], [math.log(max(y, 1e-9)) for _, y in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def kv_cache_bytes() -> list[dict]:
    """Bytes per token (all layers, bf16) of the real cache objects, filled on the meta device."""
    import torch

    import llmarch

    rows = []
    llama = llmarch.preset("llama-2-7b")
    for label, cfg in [("MHA llama-2-7b", llama), ("GQA llama-2-7b, 8 kv heads", llama.replace(n_kv_heads=8)),
                       ("MQA llama-2-7b, 1 kv head", llama.replace(n_kv_heads=1)),
                       ("MLA deepseek-v2-lite", llmarch.preset("deepseek-v2-lite"))]:
        model = llmarch.build(cfg, dtype=torch.bfloat16, device="meta")
        cache = model.new_cache()
        model(torch.zeros(1, 16, dtype=torch.long, device="meta"), cache=cache)
        per_token = cache.nbytes() / 16
        per_layer_numbers = per_token / cfg.n_layers / 2
        rows.append(dict(config=label, layers=cfg.n_layers, numbers_per_token_per_layer=per_layer_numbers,
                         bytes_per_token=per_token, mb_at_32k=per_token * 32768 / 2**20))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", nargs=2)
    ap.add_argument("--lengths", default="1024,4096,16384,32768")
    args = ap.parse_args()
    if args.worker:
        return worker(args.worker[0], int(args.worker[1]))
    lengths = [int(t) for t in args.lengths.split(",")]
    results = []
    for name in [*VARIANTS, *HF_VARIANTS]:
        for T in lengths:
            r = dict(variant=name, T=T, skipped=SKIP[(name, T)]) if (name, T) in SKIP else measure(name, T)
            results.append(r)
            print(f"  {name} T={T}: " + (r.get("skipped") or f"{r['seconds']:.3f} s, {r['peak_mb']:.0f} MB"),
                  flush=True)
    rows, fits = [], {}
    for name in [*VARIANTS, *HF_VARIANTS]:
        got = [r for r in results if r["variant"] == name and "seconds" in r]
        fits[name] = dict(time_exponent=exponent([(r["T"], r["seconds"]) for r in got]),
                          memory_exponent=exponent([(r["T"], r["peak_mb"]) for r in got]))
        cells = {r["T"]: (f"{r['seconds']:.3g}s/{r['peak_mb']:.0f}MB" if "seconds" in r else "skipped")
                 for r in results if r["variant"] == name}
        te, me = fits[name]["time_exponent"], fits[name]["memory_exponent"]
        rows.append([name, *[cells[T] for T in lengths], f"{te:.2f}" if te else "-", f"{me:.2f}" if me else "-"])
    print("\nOne attention layer, D=512, 8 heads, batch 1, fp32 forward (time / peak RSS above inputs)")
    print_table(rows, ["variant", *[f"T={T}" for T in lengths], "time exp", "mem exp"])
    ratios = []
    for ours_name, hf_name in (("longformer-512", "hf-longformer-512"), ("bigbird-64x3", "hf-bigbird-64x3")):
        for T in lengths:
            a = next((r for r in results if r["variant"] == ours_name and r["T"] == T and "seconds" in r), None)
            b = next((r for r in results if r["variant"] == hf_name and r["T"] == T and "seconds" in r), None)
            if a and b:
                ratios.append([ours_name, T, b["seconds"] / a["seconds"], b["peak_mb"] / max(a["peak_mb"], 1e-9)])
    print("\nSpeed-up over transformers' layer (ratio of medians; memory ratio of peaks)")
    print_table(ratios, ["variant", "T", "hf time / ours", "hf mem / ours"])
    cache = kv_cache_bytes()
    print("\nKV cache per token (bf16, all layers), measured on the cache objects")
    print_table([[c["config"], c["layers"], c["numbers_per_token_per_layer"], c["bytes_per_token"], c["mb_at_32k"]]
                 for c in cache], ["config", "L", "numbers/token/layer", "bytes/token", "MiB at 32k"])
    path = write_results("attention", dict(settings=dict(d_model=D, heads=H, batch=1, dtype="float32",
                                                         lengths=lengths, skipped=dict((f"{k[0]}@{k[1]}", v)
                                                                                       for k, v in SKIP.items())),
                                           layer=results, fits=fits, hf_ratios=ratios, kv_cache=cache))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
