"""One MoE layer (D 512, expert F 1024, E 8, top-2) at 1, 16, 128 and 2048 tokens (``--tokens``), fp32 and bf16, forward and
forward+backward: llmarch's dispatchers versus HF Mixtral's sparse MoE block at each experts implementation
transformers offers on this machine (same weights, so the same routing), and versus a dense SwiGLU FFN of the same
active compute (F 2048), the physical target.

    PYTHONPATH=src python benchmarks/moe.py [--threads 1] [--quick] [--tokens 1,16,128,2048] [--dtypes fp32,bf16]

On a CPU without bf16 products (``llmarch.nn.widened.ROUTE``: torch's generic bf16 kernel, ~1 GFLOP/s), the bf16
rows skip llmarch's ``loop``, ``padded`` and ``grouped`` dispatchers, which run that kernel (minutes per row at
2048 tokens); ``auto`` and ``sliced`` run the widened fp32 products, transformers' implementations torch's kernel.

The llmarch layers and the dense FFN are packed for inference first, as ``llmarch.generate`` packs a model
(``llmarch.infer.layout.pack_weights``): the forward rows (no gradient) run on the packed copies, forward +
backward cannot; "llmarch auto (unpacked)" is the same layer without them. Over packed copies and up to the
native row limit, ``auto``'s forward is one native call (``llmarch.nn.fused_moe.forward``); "llmarch auto, torch
ops" is the same layer with that call set aside (``LLMARCH_FUSED_DECODE=0``).

The process reuses freed host memory (``llmarch.nn.device.reuse_host_memory``), as ``llmarch train`` does on the
CPU, for every implementation alike: with glibc's defaults (``--default-malloc``) each forward + backward maps its
fresh 32 MB expert-bank gradient from the OS and page-faults it in (~20 ms, more than the whole layer takes at
1-128 tokens), which then dominates every forward + backward row.

Prints a table of tokens/s (medians over interleaved rounds, so every implementation sees the same load, each
round starting one implementation later) and writes benchmarks/results/moe.json.
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

import torch

import common
from llmarch import MoEConfig
from llmarch.infer.layout import pack_weights
from llmarch.nn.device import reuse_host_memory
from llmarch.nn.dispatch import DISPATCHERS
from llmarch.nn import widened
from llmarch.nn.ffn import GLU
from llmarch.nn.moe import MoE

D, F, E, K = 512, 1024, 8, 2
HF_IMPLS = ("eager", "batched_mm", "grouped_mm")  # deepgemm and sonicmoe need CUDA
REPEATS = {1: 41, 16: 25, 128: 11, 2048: 7, 4096: 5}  # small calls are short and noisy: more rounds
SLOW_BF16 = ("llmarch loop", "llmarch padded", "llmarch grouped")
HF_BATCHED_MAX_TOKENS = 16  # batched_mm gathers a weight copy per (token, expert): 256 x 12.6 MB at 128 tokens


def make_layers(dtype: torch.dtype, only: set[str] | None = None) -> dict[str, torch.nn.Module]:
    """The layers to compare, same weights (``only``: just these names)."""
    import transformers
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    torch.manual_seed(0)
    ours = MoE(D, F, "silu", moe=MoEConfig(n_experts=E, top_k=K))
    with torch.no_grad():
        ours.router.proj.weight.normal_(0.0, 0.02)
        ours.experts.gate_up.normal_(0.0, 0.02)
        ours.experts.down.normal_(0.0, 0.02)
    layers: dict[str, torch.nn.Module] = {}
    for name in DISPATCHERS.names():
        if only is not None and f"llmarch {name}" not in only:
            continue
        m = MoE(D, F, "silu", moe=MoEConfig(n_experts=E, top_k=K, dispatch=name))
        m.load_state_dict(ours.state_dict())
        layers[f"llmarch {name}"] = m
    for impl in HF_IMPLS:
        if only is not None and f"hf {impl}" not in only:
            continue
        cfg = transformers.MixtralConfig(hidden_size=D, intermediate_size=F, num_local_experts=E,
                                         num_experts_per_tok=K, router_jitter_noise=0.0)
        cfg._experts_implementation = impl
        hf = MixtralSparseMoeBlock(cfg)
        with torch.no_grad():
            hf.gate.weight.copy_(ours.router.proj.weight)
            hf.experts.gate_up_proj.copy_(ours.experts.gate_up.transpose(1, 2))
            hf.experts.down_proj.copy_(ours.experts.down.transpose(1, 2))
        layers[f"hf {impl}"] = hf
    dense = GLU(D, 2 * F, "silu")
    with torch.no_grad():
        for p in dense.parameters():
            p.normal_(0.0, 0.02)
    layers["dense swiglu F=2048"] = dense
    if "llmarch auto" in layers and (only is None or "llmarch auto, torch ops" in only):  # native forward off
        layers["llmarch auto, torch ops"] = copy.deepcopy(layers["llmarch auto"])
    if only is None or "llmarch auto (unpacked)" in only:
        plain = MoE(D, F, "silu", moe=MoEConfig(n_experts=E, top_k=K))
        plain.load_state_dict(ours.state_dict())
        layers["llmarch auto (unpacked)"] = plain
    layers = {k: v.to(dtype).eval() for k, v in layers.items()}
    for name, layer in layers.items():  # what generate() does before decoding (the forward rows use it)
        if (name.startswith("llmarch") and "unpacked" not in name) or name.startswith("dense"):
            pack_weights(layer)
    return layers


def runner(layer: torch.nn.Module, x: torch.Tensor, backward: bool, torch_ops: bool = False):
    grad = torch.randn_like(x)

    def fwd():
        saved = os.environ.get("LLMARCH_FUSED_DECODE")
        if torch_ops:  # routing and experts as torch ops (llmarch.nn.fused_moe.forward set aside)
            os.environ["LLMARCH_FUSED_DECODE"] = "0"
        try:
            with torch.no_grad():
                layer(x)
        finally:
            if torch_ops and saved is None:
                os.environ.pop("LLMARCH_FUSED_DECODE")
            elif torch_ops:
                os.environ["LLMARCH_FUSED_DECODE"] = saved

    def fwd_bwd():
        xi = x.detach().requires_grad_()
        layer(xi).backward(grad)
        layer.zero_grad(set_to_none=True)

    return fwd_bwd if backward else fwd


def measure(layers, N: int, dtype, backward: bool, repeats: int) -> dict[str, list[float]]:
    x = torch.randn(1, N, D, dtype=dtype)
    fns = {name: runner(layer, x, backward, name.endswith("torch ops")) for name, layer in layers.items()
           if not (name == "hf batched_mm" and N > HF_BATCHED_MAX_TOKENS)}
    for fn in fns.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for r in range(repeats):  # interleaved rounds: every implementation sees the same machine load
        # the order turns each round: with a fixed order the first call of a round ran ~10 % slower than the same
        # path later in it (llmarch auto and grouped are one path at 128 bf16 tokens: 7.4k against 8.2k tokens/s)
        for name in names[r % len(names):] + names[:r % len(names)]:
            fn = fns[name]
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="half the rounds (at least 3)")
    ap.add_argument("--tokens", default="1,16,128,2048", help=f"token counts, from {sorted(REPEATS)}")
    ap.add_argument("--dtypes", default="fp32,bf16", help="comma-separated subset of fp32, bf16")
    ap.add_argument("--default-malloc", action="store_true",
                    help="keep glibc's allocator defaults (writes moe_default_malloc.json)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    reused = False if args.default_malloc else reuse_host_memory()  # as `llmarch train` runs on the CPU
    check_outputs_agree()
    rows, records = [], []
    for dtype in [{"fp32": torch.float32, "bf16": torch.bfloat16}[d] for d in args.dtypes.split(",")]:
        layers = make_layers(dtype)
        if dtype == torch.bfloat16 and widened.ROUTE:  # see the module docstring
            layers = {k: v for k, v in layers.items() if k not in SLOW_BF16}
        for backward in (False, True):
            for N in [int(n) for n in args.tokens.split(",")]:
                reps = max(3, REPEATS[N] // 2) if args.quick else REPEATS[N]
                times = measure(layers, N, dtype, backward, reps)
                med = {k: statistics.median(v) for k, v in times.items()}
                dense = med["dense swiglu F=2048"]
                hf_best = min((v, k) for k, v in med.items() if k.startswith("hf "))
                ours = med["llmarch auto"]
                mode = "fwd+bwd" if backward else "fwd"
                for name, t in med.items():
                    rows.append([str(dtype).replace("torch.", ""), mode, N, name, N / t, dense / t])
                records.append(dict(dtype=str(dtype), mode=mode, tokens=N, median_s=med, raw_s=times,
                                    hf_fastest=hf_best[1], ours_vs_hf_fastest=hf_best[0] / ours,
                                    ours_vs_dense=dense / ours, hf_fastest_vs_dense=dense / hf_best[0]))
                print(f"{dtype} {mode} N={N}: llmarch auto {dense / ours:.2f}x dense, {hf_best[0] / ours:.2f}x "
                      f"HF fastest ({hf_best[1]}); HF fastest {dense / hf_best[0]:.2f}x dense", flush=True)
    common.print_table(rows, ["dtype", "mode", "tokens", "implementation", "tokens/s", "x dense"])
    summary = [[r["dtype"].replace("torch.", ""), r["mode"], r["tokens"], r["ours_vs_dense"], r["hf_fastest"],
                r["hf_fastest_vs_dense"], r["ours_vs_hf_fastest"]] for r in records]
    print()
    common.print_table(summary, ["dtype", "mode", "tokens", "ours x dense", "HF fastest", "HF x dense",
                                 "ours x HF fastest"])
    path = common.write_results("moe" if reused else "moe_default_malloc", dict(
                                settings=dict(D=D, F=F, E=E, K=K, threads=args.threads, repeats=REPEATS,
                                              quick=args.quick, host_memory_reused=reused),
                                            limits=common.limits(), results=records))
    print(f"wrote {path}")


def check_outputs_agree() -> None:
    """Every implementation computes the same function before it is timed."""
    layers = make_layers(torch.float32)
    x = torch.randn(1, 64, D)
    with torch.no_grad():
        ref = layers["llmarch loop"](x)
        for name, layer in layers.items():
            if not name.startswith("dense"):
                diff = (layer(x) - ref).abs().max().item()
                if diff > 1e-5:
                    raise SystemExit(f"{name} differs from the loop reference by {diff:.3g}")


if __name__ == "__main__":
    main()
