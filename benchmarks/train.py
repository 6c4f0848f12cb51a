"""Training throughput: llmarch vs Hugging Face transformers (Llama/GPT-2/Mixtral), same config, same weights, same
step (forward, fp32 cross-entropy, backward, clip, fused AdamW), fp32 and bf16 autocast, eager and torch.compile.

Configs: the demo preset (llama-tiny, batch 16 x 128), the LLaMA-style benchmark config (d 512, 8 layers,
8 heads, 2 kv heads, d_ff 1376, vocab 8192, batch 4 x 512), GPT-2-124M (batch 4 x 512) and a Mixtral-style config
(d 512, 4 layers, 8 experts of F 1024, top-2, batch 1 x 512; transformers' experts on ``grouped_mm``, its default).
Achieved FLOP/s =
FLOPs of one training step (counted by torch.utils.flop_counter on our model) / median step time, as a fraction
of the dense matmul peak measured in the same run (fp32: the faster of torch's default matmul and oneDNN's).
Timings of the two implementations are interleaved so load on a shared machine hits both alike; "vs HF" is the
median over rounds of HF's step time / ours (the median of ratios). A short loss-curve check trains both from
identical weights on the same batches.

    python benchmarks/train.py [--compile once|all|none] [--repeats 3] [--threads N] [--device cpu|cuda]
                               [--configs llama-bench,gpt2-124m] [--precisions fp32] [--no-curves]
    python benchmarks/train.py --loss-only [--repeats 3] [--profile]   # chunked loss, seq 2048, V 32000 (below)

``--loss-only``: one training step at [1, 2048] with a 32000-token vocabulary (the LLaMA-style config
otherwise), llmarch with its chunked cross-entropy, llmarch with ``F.cross_entropy(logits.float())`` and
transformers with its own loss, fp32 and bf16 autocast, interleaved: step time, and the peak bytes of the tensors
the step allocates (forward, loss and backward; counted by a dispatch mode, so the same on any device).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import llmarch  # noqa: E402

CONFIGS = {
    "demo (llama-tiny)": (llmarch.preset("llama-tiny"), 16, 128),
    "llama-bench": (llmarch.preset("llama-tiny").replace(d_model=512, n_layers=8, n_heads=8, n_kv_heads=2,
                                                         d_ff=1376, vocab_size=8192, max_seq_len=512), 4, 512),
    "gpt2-124m": (llmarch.preset("gpt2"), 4, 512),
    # Mixtral-style, 8 experts of F 1024, top-2, one sequence of 512 tokens: ~128 rows per expert and layer, where
    # llmarch's expert-bank kernels take them (benchmarks/moe.py has the layer alone at 1-2048 tokens)
    "mixtral-bench": (llmarch.preset("mixtral-tiny").replace(
        d_model=512, n_layers=4, n_heads=8, n_kv_heads=2, d_ff=1024, vocab_size=8192, max_seq_len=512,
        moe=dataclasses.replace(llmarch.preset("mixtral-tiny").moe, n_experts=8)), 1, 512),
}
DTYPES = {"fp32": None, "bf16": torch.bfloat16}


def hf_twin(model, device):
    """The same weights in transformers (LlamaForCausalLM / GPT2LMHeadModel / MixtralForCausalLM, through
    llmarch.hf.save), SDPA; Mixtral's experts on transformers' default, ``grouped_mm``, its fastest for training on
    the CPU (benchmarks/moe.py)."""
    import transformers

    with tempfile.TemporaryDirectory() as d:
        llmarch.hf.save(model, d)
        hf = transformers.AutoModelForCausalLM.from_pretrained(d, attn_implementation="sdpa",
                                                               dtype=torch.float32)
    return hf.to(device).train()


def make_step(model, dtype, device, compiled: bool):
    """One optimizer step on ``ids`` [B, T+1]; returns the loss (a float)."""
    # fused, as llmarch's trainer (llmarch.train.optim.make_optimizer) and transformers' Trainer default to on the
    # CPU: the per-tensor loop took 3.2-3.4x as long (benchmarks/optimizer.py), the same for both libraries
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), eps=1e-5, weight_decay=0.1,
                            fused=device.type in ("cpu", "cuda") or None)
    fwd = torch.compile(model) if compiled else model

    def step(ids):
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            logits = fwd(ids[:, :-1]).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def gpu_matmul_gflops(dtype, device, n: int = 8192) -> float:
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)

    def mm():
        a @ b
        torch.cuda.synchronize()

    t, _ = common.median_time(mm, repeats=10, warmup=3)
    return 2 * n**3 / t / 1e9


def step_flops(cfg, B, T, device) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    model = llmarch.build(cfg, device=device)
    ids = torch.randint(0, cfg.vocab_size, (B, T + 1), device=device)
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(model(ids[:, :-1]).logits.flatten(0, 1), ids[:, 1:].flatten()).backward()
    return counter.get_total_flops()


def time_pair(steps: dict, ids, repeats: int, device) -> dict[str, list[float]]:
    """Interleaved step times (s) of several step functions, after one warmup each (two when compiled)."""
    times = {k: [] for k in steps}
    for _ in range(repeats):
        for name, fn in steps.items():
            sync(device)
            t0 = time.perf_counter()
            fn(ids)
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return times


def loss_curves(device, n_steps: int = 30) -> dict:
    """Train llmarch and HF from identical weights on the same real batches (stdlib text); compare losses."""
    from llmarch import data
    from llmarch.tokenizer import train_tokenizer

    root, files = data.stdlib_files()
    texts = data.read_texts(data.take_bytes(files, 1_500_000))
    tok = train_tokenizer(texts, 2048)
    flat = torch.tensor([i for t in texts for i in tok.encode(t) + [tok.eos_id]])
    cfg, B, T = CONFIGS["demo (llama-tiny)"]
    batches = flat[: n_steps * B * (T + 1)].view(n_steps, B, T + 1).to(device)
    out = {}
    for prec, dtype in DTYPES.items():
        torch.manual_seed(0)
        ours = llmarch.build(cfg).to(device).train()
        hf = hf_twin(ours, device)
        a, b = make_step(ours, dtype, device, False), make_step(hf, dtype, device, False)
        la = [a(x) for x in batches]
        lb = [b(x) for x in batches]
        out[prec] = {"llmarch": la, "hf": lb, "max_abs_diff": max(abs(x - y) for x, y in zip(la, lb))}
    return out


def loss_comparison(device, repeats: int, profile: bool = False) -> dict:
    """The chunked loss against the plain one and transformers' at [1, 2048], V 32000 (see the docstring)."""
    from llmarch.train.objectives import ce_sum

    cfg = CONFIGS["llama-bench"][0].replace(vocab_size=32000, max_seq_len=2048)
    B, T = 1, 2048
    torch.manual_seed(0)
    ours = llmarch.build(cfg).to(device).train()
    hf = hf_twin(ours, device)
    ids = torch.randint(0, cfg.vocab_size, (B, T + 1), device=device)
    x, y = ids[:, :-1], ids[:, 1:]
    out, rows = {}, []
    for prec, dtype in DTYPES.items():
        def run(loss_fn):
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                loss = loss_fn()
            loss.backward()
            return float(loss.detach())

        losses = {
            "llmarch, chunked loss": lambda: ce_sum(ours(x).logits, y) / y.numel(),
            "llmarch, F.cross_entropy(logits.float())": lambda: F.cross_entropy(
                ours(x).logits.float().flatten(0, 1), y.flatten()),
            "hf (its loss)": lambda: hf(input_ids=x, labels=y, shift_labels=y).loss,
        }
        vals, peak = {}, {}
        for k, fn in losses.items():  # one step each under the counter (also the warmup)
            with common.PeakLive() as counter:
                vals[k] = run(fn)
            peak[k] = counter.peak
        if profile:  # where one step's time goes, per variant
            for k, fn in losses.items():
                with torch.profiler.profile() as prof:
                    run(fn)
                print(f"{prec} {k}\n" + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
        times = time_pair({k: (lambda _ids, fn=fn: run(fn)) for k, fn in losses.items()}, ids, repeats, device)
        ours.zero_grad(set_to_none=True), hf.zero_grad(set_to_none=True)
        med = {k: statistics.median(v) for k, v in times.items()}
        for k in losses:
            rows.append([prec, k, vals[k], peak[k] / 2**20, peak[k] / peak["hf (its loss)"], med[k],
                         med["hf (its loss)"] / med[k]])
        out[prec] = dict(loss=vals, peak_live_bytes=peak, times=times)
        print(f"{prec} done, load {os.getloadavg()[0]:.1f}", flush=True)
    common.print_table(rows, ["prec", "step (1x2048, V 32000, L8 D512)", "loss", "peak MiB", "x hf mem", "step s",
                              "x hf speed"])
    return dict(results=out, load=os.getloadavg())


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--compile", choices=["once", "all", "none"], default="once",
                   help="once: only llama-bench bf16 (compiling costs ~40 s cold per model here)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice); "
                   "1 is steadier on a machine shared with other jobs")
    p.add_argument("--loss-only", action="store_true", help="only the chunked-loss comparison at seq 2048")
    p.add_argument("--profile", action="store_true", help="profile one step of each implementation / variant")
    p.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated subset of " + ", ".join(CONFIGS))
    p.add_argument("--precisions", default=",".join(DTYPES), help="comma-separated subset of fp32, bf16")
    p.add_argument("--no-curves", dest="curves", action="store_false", help="skip the loss-curve check")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.loss_only:
        print(f"load average {os.getloadavg()}", flush=True)
        result = loss_comparison(device, args.repeats, args.profile)
        print(f"wrote {common.write_results('train_loss', dict(device=str(device), **result))}")
        return
    print(f"measuring machine limits ({torch.get_num_threads()} threads) ...", flush=True)
    lim = dict(common.limits(), fp32_onednn_matmul_gflops=common.onednn_matmul_gflops()) if device.type == "cpu" else {
        "fp32_matmul_gflops": gpu_matmul_gflops(torch.float32, device),
        "bf16_matmul_gflops": gpu_matmul_gflops(torch.bfloat16, device)}
    rows, results = [], []
    for cname in args.configs.split(","):
        cfg, B, T = CONFIGS[cname]
        flops = step_flops(cfg, B, T, device)
        ids = torch.randint(0, cfg.vocab_size, (B, T + 1), device=device)
        for prec in args.precisions.split(","):
            dtype = DTYPES[prec]
            modes = [False] + ([True] if args.compile == "all" or (args.compile == "once" and cname == "llama-bench"
                                                                   and prec == "bf16") else [])
            for compiled in modes:
                torch.manual_seed(0)
                ours = llmarch.build(cfg).to(device).train()
                hf = hf_twin(ours, device)
                steps = {"llmarch": make_step(ours, dtype, device, compiled),
                         "hf": make_step(hf, dtype, device, compiled)}
                warm = {}
                for name, fn in steps.items():  # warmup (and compilation) time
                    t0 = time.perf_counter()
                    for _ in range(2 if compiled else 1):
                        fn(ids)
                    sync(device)
                    warm[name] = time.perf_counter() - t0
                if args.profile:  # where one step's time goes
                    for name, fn in steps.items():
                        with torch.profiler.profile() as prof:
                            fn(ids)
                        print(f"{cname} {prec} {name}\n"
                              + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
                times = time_pair(steps, ids, args.repeats, device)
                med = {k: statistics.median(v) for k, v in times.items()}
                peak = max(lim[f"{prec}_matmul_gflops"], lim.get(f"{prec}_onednn_matmul_gflops", 0)) * 1e9
                for name in steps:
                    tps = B * T / med[name]
                    frac = flops / med[name] / peak
                    rec = dict(config=cname, precision=prec, compiled=compiled, impl=name, tokens_per_s=tps,
                               step_s=med[name], times=times[name], warmup_s=warm[name], step_flops=flops,
                               achieved_gflops=flops / med[name] / 1e9, fraction_of_matmul_peak=frac,
                               load=os.getloadavg()[0])
                    results.append(rec)
                ratio = statistics.median(h / o for h, o in zip(times["hf"], times["llmarch"]))
                for name in steps:
                    r = results[-2] if name == "llmarch" else results[-1]
                    rows.append([cname, prec, "yes" if compiled else "no", name, round(r["tokens_per_s"]),
                                 r["achieved_gflops"], r["fraction_of_matmul_peak"],
                                 ratio if name == "llmarch" else 1.0, r["warmup_s"]])
                print(f"{cname} {prec} compile={compiled}: llmarch {B * T / med['llmarch']:.0f} tok/s, "
                      f"hf {B * T / med['hf']:.0f} tok/s, ratio {ratio:.2f}", flush=True)
    common.print_table(rows, ["config", "precision", "compile", "impl", "tokens/s", "GFLOP/s", "of peak",
                              "vs HF", "warmup s"])
    base = {(r["config"], r["impl"]): r["tokens_per_s"] for r in results if r["precision"] == "fp32"
            and not r["compiled"]}
    for r in results:
        if r["precision"] == "bf16" and not r["compiled"] and r["impl"] == "llmarch" and (r["config"], "hf") in base:
            print(f"{r['config']}: llmarch bf16 / HF fp32 = {r['tokens_per_s'] / base[(r['config'], 'hf')]:.2f}x")
    curves = loss_curves(device) if args.curves else {}
    for prec, c in curves.items():
        print(f"loss curve, demo config, {prec}: 30 steps from identical weights, max |llmarch - HF| = "
              f"{c['max_abs_diff']:.2e} (final {c['llmarch'][-1]:.4f} vs {c['hf'][-1]:.4f})")
    path = common.write_results("train", dict(limits=lim, device=str(device), results=results, loss_curves=curves,
                                              note="taken on a shared machine under load; ratios of medians of "
                                                   "interleaved runs"))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
