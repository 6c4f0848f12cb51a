"""One prepared GPU run, one table: (1) correctness on the device, (2) training MFU of a ~1B LLaMA-style model,
(3) batch-1 decode against the HBM bound, (4) the MoE layer against transformers' grouped_mm experts.

    PYTHONPATH=src python benchmarks/gpu.py              # CUDA: under 8 minutes on one H100/H200-class GPU
    PYTHONPATH=src python benchmarks/gpu.py --dry-run    # tiny sizes on the CPU, a few seconds (tests run this)

(1) fp32 (TF32 off) and bf16 logits on the device against fp32 on the CPU, padded batch, for a decoder, an encoder,
an encoder-decoder, an MoE and a latent-attention (MLA) model; cached decode against the full forward on the device.
(2) bf16 autocast over fp32 master weights, SDPA restricted to the flash backend, fused AdamW, every block compiled,
FSDP2 (``fully_shard`` per block, as ``llmarch train --parallel fsdp`` does) on one rank, the chunked loss; MFU =
(6·N·tokens + 12·L·H·Dh·T·tokens) / step time / the GPU's published dense bf16 peak (table below).
(3) ``llmarch.generate`` with the static cache and ``compile_mode="reduce-overhead"`` (CUDA graphs), bf16
LLaMA-2-7B shapes, random weights; bound = bandwidth / bytes of the weights one step streams.
(4) ``benchmarks/moe.py``'s layer (D 512, F 1024, E 8, top-2) at 128 and 2048 tokens, bf16, forward and
forward+backward, interleaved rounds.
Writes benchmarks/results/gpu.json (``--out`` elsewhere; the dry run writes gpu_dry_run.json).
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import decode as decode_bench  # noqa: E402

import llmarch  # noqa: E402
from llmarch.nn import kernels  # noqa: E402
from llmarch.train import distributed as D  # noqa: E402
from llmarch.train.chunked_ce import chunked_ce_sum  # noqa: E402

# published dense bf16 tensor-core TFLOP/s and HBM TB/s, matched by a substring of torch.cuda.get_device_name()
# (most specific first); an unlisted device is measured against its matmul in the same run instead
PEAKS = [("H200 NVL", 835.0, 4.8), ("H200", 989.0, 4.8), ("H100 NVL", 835.0, 3.9), ("H100 PCIe", 756.0, 2.0),
         ("H100", 989.0, 3.35), ("A100-SXM4-80GB", 312.0, 2.039), ("A100 80GB PCIe", 312.0, 1.935),
         ("A100", 312.0, 1.555), ("L40S", 362.0, 0.864), ("L4", 121.0, 0.3)]
KINDS = {"decoder": "llama-tiny", "encoder": "bert-tiny", "encoder-decoder": "t5-tiny", "moe": "mixtral-tiny",
         "mla": "deepseek-v2-tiny"}
# max |device - CPU fp32| / max |CPU fp32|. bf16: 8 mantissa bits, and in an MoE a near-tie between two experts
# can flip the routing of a token (measured up to 0.07 on mixtral-tiny, CPU bf16 vs fp32)
TOL = {torch.float32: 1e-4, torch.bfloat16: 0.1}
TRAIN = dict(d_model=2048, n_layers=22, n_heads=32, n_kv_heads=4, d_ff=5632, vocab_size=32000, max_seq_len=2048)
TRAIN_DRY = dict(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128, vocab_size=256, max_seq_len=64)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        out.append(time.perf_counter() - t0)
    return out


def device_peaks(device: torch.device) -> tuple[str, float, float, str]:
    """(name, bf16 TFLOP/s, bandwidth TB/s, source): the published figures, or measured here for unknown devices."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tflops, tbs in PEAKS:
            if key in name:
                return name, tflops, tbs, "published"
        return name, measured_matmul_tflops(device), measured_bandwidth_tbs(device), "measured (unlisted device)"
    return "cpu", common.matmul_gflops(torch.bfloat16, n=512, repeats=3) / 1e3, \
        common.memory_bandwidth_gbs(mb=64, repeats=3) / 1e3, "measured"


def measured_matmul_tflops(device, n: int = 8192) -> float:
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    return 2 * n**3 / statistics.median(timed(lambda: a @ b, device, 10)) / 1e12


def measured_bandwidth_tbs(device, gb: float = 4.0) -> float:
    x = torch.ones(int(gb * 2**30) // 2, device=device, dtype=torch.bfloat16)
    return x.numel() * 2 / statistics.median(timed(lambda: x.sum(), device, 10)) / 1e12


# --- (1) correctness ------------------------------------------------------------------------------------------
def inputs_for(cfg, kind: str, device) -> tuple[dict, torch.Tensor]:
    """Padded batch of 2 (row 1 padded by 4) -> (forward kwargs on ``device``, [B, T] bool of compared slots)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, cfg.vocab_size, (2, 16), generator=g)
    mask = torch.ones_like(ids)
    if kind in ("encoder", "encoder-decoder"):
        mask[1, -4:] = 0  # right padding
    else:
        mask[1, :4] = 0  # left padding
    kw = dict(input_ids=ids, attention_mask=mask)
    compared = mask.bool()
    if kind == "encoder-decoder":
        kw["decoder_input_ids"] = ids[:, :8]
        compared = torch.ones(2, 8, dtype=torch.bool)
    return {k: v.to(device) for k, v in kw.items()}, compared


def correctness(device) -> list[list]:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    rows = []
    for kind, name in KINDS.items():
        torch.manual_seed(0)
        cpu = llmarch.build(llmarch.preset(name)).eval()
        kw_cpu, compared = inputs_for(cpu.config, kind, "cpu")
        with torch.no_grad():
            ref = cpu(**kw_cpu).logits[compared]
            for dtype in (torch.float32, torch.bfloat16):
                model = copy.deepcopy(cpu).to(device=device, dtype=dtype)
                kw, _ = inputs_for(cpu.config, kind, device)
                got = model(**kw).logits.float().cpu()[compared]
                err = float((got - ref).abs().max() / ref.abs().max())
                rows.append(["correctness", f"{kind} ({name}) {str(dtype)[6:]} logits vs CPU fp32", err,
                             TOL[dtype], "ok" if err <= TOL[dtype] else "FAIL"])
                if kind in ("decoder", "moe", "mla") and dtype == torch.float32:
                    rows.append(["correctness", f"{kind} cached decode vs full (fp32)", cached_vs_full(model, kw),
                                 TOL[dtype], None])
                    rows[-1][-1] = "ok" if rows[-1][2] <= TOL[dtype] else "FAIL"
                if kind == "decoder" and dtype == torch.float32:
                    mode = "reduce-overhead" if device.type == "cuda" else None
                    graphs = " + compiled step (CUDA graphs)" if mode else ""
                    rows.append(["correctness", f"decoder static cache{graphs} vs full (fp32)",
                                 static_vs_full(model, kw, mode), TOL[dtype], None])
                    rows[-1][-1] = "ok" if rows[-1][2] <= TOL[dtype] else "FAIL"
    return rows


def cached_vs_full(model, kw) -> float:
    """Relative max difference of the last position's logits: prefill T-1 tokens then one cached step vs full."""
    ids, mask = kw["input_ids"], kw["attention_mask"]
    full = model(ids, attention_mask=mask).logits[:, -1]
    pre = model(ids[:, :-1], attention_mask=mask[:, :-1], use_cache=True)
    step = model(ids[:, -1:], attention_mask=mask, cache=pre.cache).logits[:, -1]
    return float((step - full).abs().max() / full.abs().max())


def static_vs_full(model, kw, compile_mode: str | None, steps: int = 4) -> float:
    """Relative max difference of the logits of ``steps`` one-token steps on the static cache (compiled with
    ``compile_mode``: replayed CUDA graphs after the first steps) against the full forward's at those positions."""
    from llmarch.infer.decode import StaticEngine

    ids, mask = kw["input_ids"], kw["attention_mask"]
    T = ids.shape[1]
    full = model(ids, attention_mask=mask).logits[:, T - steps:]
    engine = StaticEngine(model, batch=ids.shape[0], max_len=64, compile=compile_mode is not None,
                          compile_mode=compile_mode)
    engine.prefill(ids[:, :T - steps], mask[:, :T - steps])
    got = torch.stack([engine.step(ids[:, t]) for t in range(T - steps, T)], 1)
    return float((got - full).abs().max() / full.abs().max())


# --- (2) training MFU -----------------------------------------------------------------------------------------
def one_rank_group(device) -> D.DistEnv:
    """A process group of one (no launcher, no port): FSDP2 runs its real code path on one rank."""
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0,
                                world_size=1)
    return D.DistEnv(0, 1, 0, device)


def training(device, dry: bool, peak_tflops: float, backend: str) -> tuple[list[list], dict]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    cfg = llmarch.preset("llama-tiny").replace(**(TRAIN_DRY if dry else TRAIN))
    B, T, steps = (2, 32, 2) if dry else (8, 2048, 8)
    torch.manual_seed(0)
    model = llmarch.build(cfg, device=device).train()  # fp32 master weights; the matmuls run in bf16 (autocast)
    n_matmul = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("embed."))
    for block in model.decoder.layers:
        block.compile(backend=backend)
    D.WRAPPERS["fsdp"](model, one_rank_group(device))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1,
                            fused=device.type == "cuda")
    ids = torch.randint(0, cfg.vocab_size, (B, T + 1), device=device)

    def step():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION), torch.autocast(device.type, dtype=torch.bfloat16):
            logits = model(ids[:, :-1]).logits
        loss = chunked_ce_sum(logits, ids[:, 1:]) / (B * T)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    compile_s = sum(timed(step, device, 2))  # the first steps compile every block (same shapes: one graph)
    times = timed(step, device, steps)
    t = statistics.median(times)
    flops = 6 * n_matmul * B * T + 12 * cfg.n_layers * cfg.n_heads * cfg.dh * T * B * T
    mfu = flops / t / (peak_tflops * 1e12)
    mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    rows = [["training", f"~{n_matmul / 1e9:.2f}B llama-style bf16, {B}x{T}: MFU", mfu, 0.45,
             f"{B * T / t:.0f} tok/s, step {t * 1e3:.0f} ms, compile+warmup {compile_s:.0f} s, peak mem {mem:.1f} GiB"]]
    mm = measured_matmul_tflops(device) if device.type == "cuda" else float("nan")
    rows.append(["training", "achieved FLOP/s / the bf16 matmul rate measured here", flops / t / (mm * 1e12),
                 float("nan"), f"8192^3 bf16 matmul: {mm:.0f} TFLOP/s"])
    del model, opt
    return rows, dict(params_matmul=n_matmul, batch=B, seq=T, step_s=times, flops_per_step=flops, mfu=mfu,
                      compile_s=compile_s, peak_mem_gib=mem, matmul_tflops=mm)


# --- (3) decode -----------------------------------------------------------------------------------------------
def decode(device, dry: bool, bandwidth_tbs: float) -> tuple[list[list], dict]:
    cfg = llmarch.preset("llama-tiny" if dry else "llama-2-7b")
    # the headline N and a shorter run share one cache size (rounded up to 64 slots), so one compiled step: their
    # difference is the steady per-token time, free of the prefill and of the graph recorded for each new cache
    N, short = (8, 4) if dry else (176, 116)
    torch.manual_seed(0)
    model = llmarch.build(cfg, device=device, dtype=torch.bfloat16).eval()
    ids = torch.randint(0, cfg.vocab_size, (1, 16), device=device)
    mode = "reduce-overhead" if device.type == "cuda" else None  # CUDA graphs
    # inductor's CPU codegen alone takes minutes: a CPU dry run keeps the static-cache engine only
    compile = device.type == "cuda" or not dry
    run = lambda n=N: llmarch.generate(model, ids, n, cache="static", compile=compile,  # noqa: E731
                                       compile_mode=mode)
    compile_s = sum(timed(run, device, 1 if dry else 2))
    times, short_times = [], []
    for _ in range(1 if dry else 3):  # interleaved
        times += timed(run, device, 1)
        short_times += timed(lambda: run(short), device, 1)
    # eager (the growing cache, no compile): llmarch's choice for cached keys (cuDNN's attention set aside) against
    # torch's own backend choice, interleaved, after a warm-up call
    eager_n = 8 if dry else 48
    llmarch.generate(model, ids, eager_n)
    eager_t = {True: [], False: []}
    try:
        for _ in range(1 if dry else 2):
            for skip in (True, False):
                kernels.CUDNN_ONLY_FOR_TRAINING = skip
                eager_t[skip] += timed(lambda: llmarch.generate(model, ids, eager_n), device, 1)
    finally:
        kernels.CUDNN_ONLY_FOR_TRAINING = True
    eager = statistics.median(eager_t[True]) * N / eager_n
    got, want = run(), llmarch.generate(model, ids, N)
    same = bool(torch.equal(got, want))
    differ = (got != want)[0].nonzero()
    first_diff = int(differ[0]) - ids.shape[1] if len(differ) else None
    gap = float("nan")  # eager's top-2 logit gap where the two first differ: a near-tie flips on rounding
    if first_diff is not None:
        with torch.no_grad():
            top2 = model(want[:, :ids.shape[1] + first_diff]).logits[0, -1].float().topk(2).values
        gap = float(top2[0] - top2[1])
    tps = N / statistics.median(times)
    steady = (N - short) / max(statistics.median(times) - statistics.median(short_times), 1e-9)
    nbytes = decode_bench.weight_bytes(model)
    bound = bandwidth_tbs * 1e12 / nbytes
    read = measured_bandwidth_tbs(device) if device.type == "cuda" else float("nan")
    agree = "equal" if same else f"differ from new token {first_diff} (top-2 gap {gap:.3g})"
    rows = [["decode", f"{'llama-tiny' if dry else 'llama-2-7b'} bf16 batch 1, static cache"
             f"{' + compile' if compile else ''}: fraction of HBM bound", tps / bound, 0.70,
             f"{tps:.0f} tok/s over {N} (steady {steady:.0f}; bound {bound:.0f}; eager {N / eager:.0f}); compile "
             f"{compile_s:.0f} s; tokens {agree} to eager"],
            ["decode", "steady step: fraction of the bound at the read bandwidth measured here", steady * nbytes
             / (read * 1e12), 0.70, f"reads {read:.2f} TB/s (a 4 GiB sum)"],
            ["decode", "eager (growing cache): cached keys off cuDNN / torch's backend choice, speed",
             statistics.median(eager_t[False]) / statistics.median(eager_t[True]), float("nan"),
             f"{eager_n / statistics.median(eager_t[True]):.1f} against "
             f"{eager_n / statistics.median(eager_t[False]):.1f} tok/s over {eager_n}"]]
    del model
    return rows, dict(new_tokens=N, times_s=times, short_new_tokens=short, short_times_s=short_times,
                      tokens_per_s=tps, steady_tokens_per_s=steady, bound_tokens_per_s=bound, weight_bytes=nbytes,
                      read_tbs=read, eager_tokens_per_s=N / eager, eager_new_tokens=eager_n,
                      eager_s={str(k): v for k, v in eager_t.items()}, compile_s=compile_s,
                      tokens_equal_eager=same, first_differing_new_token=first_diff, top2_gap=gap)


# --- (4) MoE vs transformers grouped_mm -----------------------------------------------------------------------
def moe_layer(device, dry: bool) -> tuple[list[list], dict]:
    import moe as moe_bench

    names = {"llmarch auto", "hf grouped_mm", "dense swiglu F=2048"}
    layers = {k: v.to(device) for k, v in moe_bench.make_layers(torch.bfloat16, only=names).items() if k in names}
    rows, raw = [], {}
    for N in ((16,) if dry else (128, 2048)):
        x = torch.randn(1, N, moe_bench.D, dtype=torch.bfloat16, device=device)
        for backward in (False, True):
            fns = {k: moe_bench.runner(m, x, backward) for k, m in layers.items()}
            for fn in fns.values():
                fn()
            times = {k: [] for k in fns}
            for _ in range(3 if dry else 20):  # interleaved rounds
                for k, fn in fns.items():
                    times[k] += timed(fn, device, 1)
            med = {k: statistics.median(v) for k, v in times.items()}
            mode = "fwd+bwd" if backward else "fwd"
            rows.append(["moe", f"E8 top-2 bf16 {mode} N={N}: llmarch / hf grouped_mm speed", med["hf grouped_mm"]
                         / med["llmarch auto"], 1.2, f"x dense of equal active compute "
                         f"{med['dense swiglu F=2048'] / med['llmarch auto']:.2f}"])
            raw[f"{mode} N={N}"] = times
    return rows, raw


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU (a few seconds): the same code paths")
    p.add_argument("--device", default=None, help="default: cuda (cpu with --dry-run)")
    p.add_argument("--budget-s", type=float, default=450.0, help="skip the sections that start after this many s")
    p.add_argument("--out", default=None, help="result file (default benchmarks/results/gpu.json)")
    p.add_argument("--sections", default="correctness,training,decode,moe")
    args = p.parse_args()
    device = torch.device(args.device or ("cpu" if args.dry_run else "cuda"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("benchmarks/gpu.py: torch sees no GPU; run with --dry-run on the CPU")
    torch._dynamo.config.recompile_limit = 64
    t_start = time.perf_counter()
    name, peak, bandwidth, source = device_peaks(device)
    backend = "eager" if device.type == "cpu" else "inductor"  # CPU: dynamo traces the same graphs, no codegen
    sections = {"correctness": lambda: (correctness(device), {}),
                "training": lambda: training(device, args.dry_run, peak, backend),
                "decode": lambda: decode(device, args.dry_run, bandwidth),
                "moe": lambda: moe_layer(device, args.dry_run)}
    rows, details = [], {}
    for section in args.sections.split(","):
        if time.perf_counter() - t_start > args.budget_s:
            rows.append([section, "skipped: time budget spent", float("nan"), float("nan"), ""])
            continue
        t0 = time.perf_counter()
        try:
            got, details[section] = sections[section]()
        except Exception as e:  # noqa: BLE001  one failing section must not lose the others' figures
            if args.dry_run:
                raise
            got = [[section, f"ERROR {type(e).__name__}: {str(e)[:200]}", float("nan"), float("nan"), ""]]
        rows += got
        print(f"[{section}: {time.perf_counter() - t0:.0f} s]", flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    total = time.perf_counter() - t_start
    print(f"\n{name}: peak bf16 {peak:.3g} TFLOP/s, bandwidth {bandwidth:.3g} TB/s ({source}); total {total:.0f} s; "
          f"torch {torch.__version__}; load {os.getloadavg()[0]:.1f}")
    common.print_table(rows, ["section", "check", "value", "target / tol", "note"])
    out = Path(args.out) if args.out else common.RESULTS / ("gpu_dry_run.json" if args.dry_run else "gpu.json")
    payload = dict(device=name, peak_bf16_tflops=peak, bandwidth_tbs=bandwidth, peaks_source=source,
                   dry_run=args.dry_run, total_s=total, rows=rows, details=details, machine=common.machine(),
                   written=time.strftime("%Y-%m-%d %H:%M:%S"))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(__import__("json").dumps(payload, indent=1, default=str) + "\n")
    print(f"wrote {out}")
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
