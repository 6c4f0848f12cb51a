"""Decoder core speed: llmarch vs Hugging Face transformers (attn_implementation="sdpa") on the same weights.

For a LLaMA-style config (D 512, L 8, H 8, G 2, F 1376, V 8192) and GPT-2-124M, in fp32 on CPU:
- training: forward + cross-entropy + backward + AdamW step on a [4, 512] batch, tokens/s, each library with its own
  training loss (llmarch's chunked ``ce_sum`` over shifted labels, transformers' ``labels=``; the two losses are
  recorded before the first step and agree);
- decoding: greedy, batch 1, 32-token prompt, 128 new tokens (prefill included), tokens/s.
Our model is built, saved with ``llmarch.hf.save`` (our translator writes config.json) and loaded by transformers,
so both hold the same weights. The two libraries' repeats are interleaved so load on a shared machine hits both
alike; the figures that count are the ratios of medians. The machine's limits are measured in the same run:
fp32 matmul (torch's default BLAS, MKL, and oneDNN), bf16 matmul, memory read bandwidth. Training is reported as
achieved FLOP/s / fp32 matmul peak with FLOPs = 6 N tokens + 12 L H Dh T tokens (PaLM's count: N = weights of
every matmul, attention scores counted in full); decoding as tokens/s / (bandwidth / bytes of matmul weights).

    python benchmarks/decoder.py [--quick] [--repeats N] [--threads N] [--only llama-style|gpt2-124m]

On a machine shared with other jobs, torch's default of one thread per core makes every parallel kernel wait for
a descheduled thread (we saw 5x slower decoding at 2 threads than at 1 under load); ``--threads 1`` avoids that.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

import llmarch
from llmarch.train.masking import IGNORE
from llmarch.train.objectives import ce_sum
from common import limits, matmul_gflops, onednn_matmul_gflops, print_table, write_results

MODELS = {
    "llama-style": ("llama", llmarch.preset("llama-tiny").replace(
        vocab_size=8192, d_model=512, n_layers=8, n_heads=8, n_kv_heads=2, d_ff=1376, max_seq_len=1024)),
    "gpt2-124m": ("gpt2", llmarch.preset("gpt2")),
}
BATCH, SEQ = 4, 512
PROMPT, NEW = 32, 128


def machine_limits(repeats: int) -> dict:
    out = limits()
    out["fp32_matmul_gflops_4096"] = matmul_gflops(torch.float32, n=4096, repeats=repeats)
    out["fp32_onednn_matmul_gflops"] = max(onednn_matmul_gflops(2048, repeats), onednn_matmul_gflops(4096, repeats))
    return out


def interleaved(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Wall seconds of each fn, run in turns (order alternating between rounds) after ``warmup`` rounds."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(repeats):
        for k in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
            t0 = time.perf_counter()
            fns[k]()
            times[k].append(time.perf_counter() - t0)
    return times


def matmul_weights(model: nn.Module) -> int:
    """N: elements of every weight used in a matmul (a tied head counted once, as it is read once per token)."""
    seen, n = set(), 0
    for m in model.modules():
        if isinstance(m, nn.Linear) and id(m.weight) not in seen:
            seen.add(id(m.weight))
            n += m.weight.numel()
    return n


def train_step(model: nn.Module, ids: torch.Tensor, loss_of: Callable) -> Callable[[], None]:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    model.train()

    def step() -> None:
        loss_of(model, ids).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def ours_loss(model, ids):
    """llmarch's training loss as ``llmarch train`` computes it (``objectives.ce_sum``: labels shifted instead of
    the logits, chunked cross-entropy), the mean over the B (T - 1) predicted positions like transformers'."""
    labels = F.pad(ids[:, 1:], (0, 1), value=IGNORE)  # [B, T]: the last position predicts nothing
    return ce_sum(model(ids).logits, labels) / (ids.shape[0] * (ids.shape[1] - 1))


def hf_loss(model, ids):
    return model(input_ids=ids, labels=ids).loss  # transformers shifts the labels itself


def run_model(name: str, repeats: int, tmp: Path) -> dict:
    import transformers

    model_type, cfg = MODELS[name]
    torch.manual_seed(0)
    ours = llmarch.build(cfg)
    path = llmarch.hf.save(ours, tmp / name)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa")
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (BATCH, SEQ), generator=g)
    prompt = torch.randint(0, cfg.vocab_size, (1, PROMPT), generator=g)

    with torch.no_grad():
        losses = {"llmarch": float(ours_loss(ours, ids)), "hf": float(hf_loss(hf, ids))}
    train = interleaved({"llmarch": train_step(ours, ids, ours_loss), "hf": train_step(hf, ids, hf_loss)},
                        repeats)
    for m in (ours, hf):
        m.zero_grad(set_to_none=True)
        m.eval()

    def dec_ours():
        return llmarch.generate(ours, prompt, max_new_tokens=NEW)

    def dec_hf():
        with torch.no_grad():
            return hf.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=NEW,
                               min_new_tokens=0, do_sample=False)

    same = torch.equal(dec_ours(), dec_hf())  # same weights, same greedy tokens (a check, not a timing)
    decode = interleaved({"llmarch": dec_ours, "hf": dec_hf}, max(repeats, 3))
    N = matmul_weights(ours)
    attn = 12 * cfg.n_layers * cfg.n_heads * cfg.dh * SEQ
    return dict(model_type=model_type, config=cfg.to_dict(), matmul_weights=N,
                train_flops_per_token=6 * N + attn, weight_bytes=N * 4, greedy_tokens_identical=same,
                first_losses=losses,
                train_s=train, decode_s=decode)


def summarise(name: str, r: dict, lim: dict) -> dict:
    out = {}
    tokens = {"train": BATCH * SEQ, "decode": NEW}
    for work in ("train", "decode"):
        med = {lib: statistics.median(ts) for lib, ts in r[f"{work}_s"].items()}
        tps = {lib: tokens[work] / t for lib, t in med.items()}
        row = dict(median_s=med, tokens_per_s=tps, ratio=tps["llmarch"] / tps["hf"])
        if work == "train":
            gflops = {lib: v * r["train_flops_per_token"] / 1e9 for lib, v in tps.items()}
            row.update(gflops=gflops,
                       fraction_of_fp32_matmul={k: v / lim["fp32_matmul_gflops_4096"] for k, v in gflops.items()},
                       fraction_of_onednn_matmul={k: v / lim["fp32_onednn_matmul_gflops"] for k, v in gflops.items()})
        else:
            bound = lim["read_bandwidth_gbs"] * 1e9 / r["weight_bytes"]
            row.update(bandwidth_bound_tokens_per_s=bound,
                       fraction_of_bandwidth_bound={k: v / bound for k, v in tps.items()})
        out[work] = row
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="2 repeats (decode 3) instead of the default")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats per library (default 5; quick 2)")
    ap.add_argument("--only", choices=sorted(MODELS), action="append", help="run only these models")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (default: torch's); 1 keeps a loaded machine's scheduler out of the timings")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = args.repeats or (2 if args.quick else 5)
    torch.manual_seed(0)
    lim_before = machine_limits(3)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.only or list(MODELS):
            results[name] = run_model(name, repeats, Path(tmp))
    lim_after = machine_limits(3)
    lim = {k: max(lim_before[k], lim_after[k]) for k in lim_before}  # the best seen is the ceiling
    summary = {name: summarise(name, r, lim) for name, r in results.items()}

    print(f"limits (max of before/after): fp32 matmul {lim['fp32_matmul_gflops_4096']:.0f} GFLOP/s (MKL, 4096^2), "
          f"{lim['fp32_onednn_matmul_gflops']:.0f} (oneDNN); bf16 {lim['bf16_matmul_gflops']:.0f}; "
          f"read bandwidth {lim['read_bandwidth_gbs']:.1f} GB/s; {torch.get_num_threads()} threads, "
          f"load average {os.getloadavg()[0]:.1f}")
    rows = []
    for name, s in summary.items():
        t, d = s["train"], s["decode"]
        rows.append([name, "train", t["tokens_per_s"]["llmarch"], t["tokens_per_s"]["hf"], t["ratio"],
                     t["fraction_of_fp32_matmul"]["llmarch"], t["fraction_of_fp32_matmul"]["hf"],
                     t["fraction_of_onednn_matmul"]["llmarch"], t["fraction_of_onednn_matmul"]["hf"]])
        rows.append([name, "decode", d["tokens_per_s"]["llmarch"], d["tokens_per_s"]["hf"], d["ratio"],
                     d["fraction_of_bandwidth_bound"]["llmarch"], d["fraction_of_bandwidth_bound"]["hf"], "", ""])
    print_table(rows, ["model", "work", "ours tok/s", "HF tok/s", "ours/HF", "ours/limit", "HF/limit",
                       "ours/oneDNN", "HF/oneDNN"])
    print("limit: train = fp32 matmul peak (MKL); decode = read bandwidth / fp32 weight bytes. Medians of "
          f"{repeats} interleaved repeats (decode {max(repeats, 3)}).")
    for name, r in results.items():
        if not r["greedy_tokens_identical"]:
            print(f"WARNING {name}: greedy tokens differ between llmarch and transformers")
        loss = r["first_losses"]
        if abs(loss["llmarch"] - loss["hf"]) > 1e-4 * abs(loss["hf"]):
            print(f"WARNING {name}: the training losses differ: {loss}")
    settings = dict(batch=BATCH, seq=SEQ, prompt=PROMPT, new_tokens=NEW, repeats=repeats, dtype="float32",
                    threads=torch.get_num_threads(), load_average=os.getloadavg())
    path = write_results("decoder", dict(settings=settings,
                                         limits_before=lim_before, limits_after=lim_after, limits=lim,
                                         summary=summary, raw=results))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
