"""The gated delta rule's three forms and a hybrid's decoding, timed on this machine.

    PYTHONPATH=src python benchmarks/gated_delta.py [--lengths 1024,4096] [--contexts 1024,2048,4096,8192]

1. The rule alone (B = 1, H = 4 heads, Dk = Dv = 64, fp32): forward time of the quadratic ``parallel`` form,
   the ``chunked`` form (chunk 64) and SDPA causal attention over the same q/k/v, vs length; the ``parallel`` form
   up to 4096 tokens (its T×T matrices), the ``recurrent`` form at the shortest length only (a loop over tokens).
2. Decoding: ms per generated token after a prompt of ``context`` tokens, batch 1, for a small model of four
   attention layers, four gated delta layers, and the 3:1 hybrid (d_model 256, 4 heads): attention's step reads a
   KV cache growing with the context, a gated delta layer's step reads a constant state.
Times are the median **CPU time of this process on one thread** (``time.process_time``), not wall time: on a
machine shared with other jobs the wall clock mostly measures the scheduler, while the CPU seconds a single-threaded
run spends are the work itself. Results: benchmarks/results/gated_delta.json.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import median_time, print_table, write_results  # noqa: E402

import llmarch  # noqa: E402
from llmarch.nn.linear import FORMS  # noqa: E402

PARALLEL_MAX_T = 4096
SCHEDULES = {"attention": ["attention"], "gated_delta": ["gated_delta"],
             "hybrid-3-1": ["gated_delta", "gated_delta", "gated_delta", "attention"]}


def cpu_time(fn, repeats: int) -> tuple[float, list[float]]:
    """Median CPU seconds of ``fn()`` in this process (after one warm-up run), and the raw times."""
    return median_time(fn, repeats=repeats, clock=time.process_time)


def rule_inputs(T: int, H: int = 4, D: int = 64):
    q, k = (F.normalize(torch.randn(1, H, T, D), dim=-1) for _ in range(2))
    return q * D ** -0.5, k, torch.randn(1, H, T, D), -torch.rand(1, H, T) * 0.1, torch.rand(1, H, T)


def bench_rule(lengths: list[int], repeats: int) -> list[dict]:
    rows = []
    for T in lengths:
        q, k, v, g, beta = rule_inputs(T)
        forms = {"chunked": lambda: FORMS["chunked"](q, k, v, g, beta, chunk_size=64),
                 "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)}
        if T <= PARALLEL_MAX_T:  # several [H, T, T] fp32 matrices: 1 GiB each at 8k
            forms["parallel"] = lambda: FORMS["parallel"](q, k, v, g, beta)
        if T == min(lengths):
            forms["recurrent"] = lambda: FORMS["recurrent"](q, k, v, g, beta)
        with torch.no_grad():
            for name, fn in forms.items():
                t, raw = cpu_time(fn, repeats)
                rows.append(dict(T=T, form=name, ms=1e3 * t, tokens_per_s=T / t, raw=raw))
    return rows


def bench_decode(contexts: list[int], new_tokens: int) -> list[dict]:
    rows = []
    for name, schedule in SCHEDULES.items():
        cfg = llmarch.preset("qwen3-next-tiny").replace(
            d_model=256, n_heads=4, n_kv_heads=4, head_dim=64, n_layers=4, ffn="glu", moe=None, d_ff=512,
            vocab_size=1024, max_seq_len=max(contexts) + new_tokens, layer_mixers=schedule, mixer="attention",
            norm="rmsnorm", linear=dict(n_k_heads=2, n_v_heads=4, k_head_dim=64, v_head_dim=64))
        model = llmarch.build(cfg).eval()
        for S in contexts:
            ids = torch.randint(0, cfg.vocab_size, (1, S))
            with torch.no_grad():
                cache = model.new_cache()
                model(ids, cache=cache)
                tok = ids[:, -1:]
                # one step at a time on the same cache: the median over steps (the context grows by new_tokens)
                t, raw = cpu_time(lambda: model(tok, cache=cache), new_tokens)
            rows.append(dict(model=name, context=S, ms_per_token=1e3 * t, cache_mib=cache.nbytes() / 2**20, raw=raw))
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", default="1024,4096")
    p.add_argument("--contexts", default="1024,2048,4096,8192")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--new-tokens", type=int, default=16)
    args = p.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    lengths = [int(x) for x in args.lengths.split(",")]
    contexts = [int(x) for x in args.contexts.split(",")]
    rule = bench_rule(lengths, args.repeats)
    print_table([[r["T"], r["form"], r["ms"], r["tokens_per_s"]] for r in rule], ["T", "form", "ms", "tokens/s"])
    dec = bench_decode(contexts, args.new_tokens)
    print_table([[r["model"], r["context"], r["ms_per_token"], r["cache_mib"]] for r in dec],
                ["model", "context", "ms/token", "cache MiB"])
    print(write_results("gated_delta", dict(settings=vars(args), rule=rule, decode=dec)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
