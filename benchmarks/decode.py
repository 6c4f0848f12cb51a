"""Decode speed: tokens/s at batch 1 and 8 for GPT-2-124M, a LLaMA-style model and (``--models mixtral``,
``deepseek``) a Mixtral-style and a DeepSeek-V2 style one, Hugging Face `generate` against llmarch (eager, static
cache + torch.compile, int8 with fp32 or int8 activations, speculative), each as a fraction of the
memory-bandwidth bound (weight bytes streamed per step / measured read bandwidth; for an MoE model the experts'
bytes count at the share a step is expected to hit).

    PYTHONPATH=src python benchmarks/decode.py [--new-tokens 32] [--repeats 3] [--models gpt2,llama] [--no-compile]
    PYTHONPATH=src python benchmarks/decode.py --kernels   # GB/s of each matrix-vector kernel and layout per shape
    PYTHONPATH=src python benchmarks/decode.py --int8-kernels --threads 1   # int8 kernels per row count

Greedy, prompt of 16 tokens, fixed output length; a timed call includes the prompt's prefill (one weight pass,
like one decode step at these sizes). Random weights: speed does not depend on them (speculative acceptance
does; see its row). The variants of one batch size run in turns (round-robin, after one warmup each), so load on
a shared machine hits them alike; ratios are of medians. "llmarch eager" runs each decoder layer of a step in one
native call where the model qualifies (``llmarch.nn.fused_decode``; all but the DeepSeek-V2 style model, whose
latent attention keeps the eager layers while its MoE layers run natively one by one; packed fp32 or int8
weights); "layers as torch ops" is the same call with ``LLMARCH_FUSED_DECODE=0``. For an MoE model transformers
runs each of its CPU experts implementations (``batched_mm`` at batch 1 only: it gathers a weight copy per token
and expert, 8x slower than ``grouped_mm`` there), and ratios are to the fastest; the compiled variants and
speculative decoding (its static cache) are left out where they do not apply. The int8 rows carry their accuracy
against the fp32 model (prompt logits' error, share of greedy tokens equal).

``--kernels``: for every weight shape of the two models, batch 1 and 8, the GB/s of ``F.linear`` (torch's BLAS)
and oneDNN over the row-major and the column-major weight, of oneDNN over its packed weight and of llmarch's
native kernel over its blocked weight (``llmarch.nn.dense.pack`` keeps the latter where it builds, else the
former), streaming ~400 MB of copies so nothing is served from
the caches; the read bandwidth is measured in the same run.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import importlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import limits, memory_bandwidth_gbs, print_table, write_results  # noqa: E402

import llmarch  # noqa: E402
import llmarch.nn.dense as dense  # noqa: E402
from llmarch.native import fp32 as native_fp32  # noqa: E402
from llmarch.native import int8 as int8_native  # noqa: E402
from llmarch.native import w8a8  # noqa: E402
from llmarch.infer.layout import decode_layout, pack_weights  # noqa: E402
from llmarch.infer.quantize import quantize  # noqa: E402
from llmarch.infer.speculative import speculative_generate  # noqa: E402
from llmarch.nn.moe import MoE  # noqa: E402

def _mixtral():
    c = llmarch.preset("mixtral-tiny").replace(d_model=512, n_layers=8, n_heads=8, n_kv_heads=2, d_ff=1376,
                                              vocab_size=8192, max_seq_len=2048)
    return c.replace(moe=dataclasses.replace(c.moe, n_experts=8, top_k=2))


def _deepseek():
    c = llmarch.preset("deepseek-v2-tiny")
    return c.replace(d_model=512, n_layers=8, n_heads=8, d_ff=1376, vocab_size=8192, max_seq_len=2048,
                     mla=dataclasses.replace(c.mla, kv_lora_rank=128, q_lora_rank=192, qk_rope_head_dim=32,
                                             qk_nope_head_dim=32, v_head_dim=64),
                     moe=dataclasses.replace(c.moe, n_experts=16, top_k=4, d_ff=344))


CONFIGS = {
    "gpt2": lambda: llmarch.preset("gpt2"),
    "llama": lambda: llmarch.preset("llama-tiny").replace(d_model=512, n_layers=8, n_heads=8, n_kv_heads=2,
                                                          d_ff=1376, vocab_size=8192, max_seq_len=2048),
    "mixtral": _mixtral,  # the LLaMA-style model with 8 experts of its FFN's size, 2 per token
    "deepseek": _deepseek,  # latent attention and fine-grained MoE layers
}
HF_TYPE = {"gpt2": "gpt2", "llama": "llama", "mixtral": "mixtral", "deepseek": "deepseek_v2"}
HF_EXPERTS = ("grouped_mm", "eager", "batched_mm")  # transformers' CPU experts implementations (default first)


def weight_bytes(model, leave_out: frozenset = frozenset()) -> int:
    """Bytes of the matrices one decode step streams: every Linear-like weight, the LM head included, each tensor
    once (a head tied to the embedding is one matrix, read once per step); ``leave_out``: ids of tensors not to
    count."""
    mats = {}
    for m in model.modules():
        for name, t in list(m.named_parameters(recurse=False)) + list(m.named_buffers(recurse=False)):
            if (t is not None and t.dim() == 2 and not isinstance(m, torch.nn.Embedding) and "position" not in name
                    and id(t) not in leave_out):
                mats[id(t)] = t
    head = getattr(model.lm_head, "weight", None)
    if isinstance(head, torch.Tensor):  # the head's matrix, even where it is the embedding's
        mats[id(head)] = head
    return sum(t.numel() * t.element_size() for t in mats.values())


def streamed_bytes(model, B: int) -> float:
    """Bytes one decode step of B rows streams: :func:`weight_bytes`, plus each expert bank's bytes times the
    expected share of its experts that B rows routed uniformly at random to K of E hit, 1 - (1 - K/E)^B (a dense
    model: weight_bytes); a bank's matrices are its parameters and buffers (an int8 bank's)."""
    moes = [m for m in model.modules() if isinstance(m, MoE)]
    banks = {id(t): t for m in moes for t in [*m.experts.parameters(), *m.experts.buffers()] if t.dim() >= 2}
    total = float(weight_bytes(model, frozenset(banks)))
    for m in moes:
        hit = 1 - (1 - m.moe.top_k / m.moe.n_experts) ** B
        total += hit * sum(t.numel() * t.element_size() for t in [*m.experts.parameters(), *m.experts.buffers()]
                           if t.dim() >= 2)
    return total


def hf_model(model, kind: str, tmp: str, experts: tuple[str, ...] = ()):
    """transformers' copy of ``model`` (sdpa, fp32); with ``experts``, one copy per experts implementation."""
    import transformers

    llmarch.hf.save(model, tmp, model_type=HF_TYPE[kind])
    load = transformers.AutoModelForCausalLM.from_pretrained
    if experts:
        return {impl: load(tmp, attn_implementation="sdpa", dtype=torch.float32, experts_implementation=impl).eval()
                for impl in experts}
    return load(tmp, attn_implementation="sdpa", dtype=torch.float32).eval()


def round_robin(fns: dict, repeats: int) -> dict[str, list[float]]:
    """Seconds of each fn over ``repeats`` rounds, the fns taking turns (one warmup call each first)."""
    times = {k: [] for k in fns}
    for fn in fns.values():
        fn()
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return times


def with_dense(fn, **settings):
    """``fn`` with ``llmarch.nn.dense``'s module settings replaced while it runs (ONEDNN=False: every fp32
    projection on F.linear, torch's BLAS; MATVEC_MIN_ELEMENTS=0: one-row products on oneDNN too)."""
    def run():
        saved = {k: getattr(dense, k) for k in settings}
        for k, v in settings.items():
            setattr(dense, k, v)
        try:
            return fn()
        finally:
            for k, v in saved.items():
                setattr(dense, k, v)
    return run


def without_native(fn):
    """``fn`` with llmarch's native kernels set aside: few-row int8 products on ``_weight_int8pack_mm``, packing
    (``dense.pack``) makes oneDNN's copies, and the decoder layers run as torch ops."""
    return torch_layers(_without_native(fn))


def _without_native(fn):
    def run():
        saved = int8_native.available, native_fp32.available
        int8_native.available = native_fp32.available = lambda: False
        try:
            return fn()
        finally:
            int8_native.available, native_fp32.available = saved
    return run


def torch_layers(fn):
    """``fn`` with a decode step's layers as torch ops (``LLMARCH_FUSED_DECODE=0``), not one native call each."""
    def run():
        saved = os.environ.get("LLMARCH_FUSED_DECODE")
        os.environ["LLMARCH_FUSED_DECODE"] = "0"
        try:
            return fn()
        finally:
            os.environ.pop("LLMARCH_FUSED_DECODE") if saved is None else os.environ.update(LLMARCH_FUSED_DECODE=saved)
    return run


def unpacked(fn):
    """``fn`` without packed inference weights (``llmarch.nn.dense.pack``): generate() packs none (the
    column-major layout only) and the packed copies made by the other variants are set aside while it runs."""
    gen = importlib.import_module("llmarch.infer.generate")  # the module (llmarch.infer.generate is the function)

    def run():
        saved, saved_prepare = dense._PACKED, gen.prepare_for_decoding
        dense._PACKED, gen.prepare_for_decoding = {}, (lambda model, tokens: decode_layout(model))
        try:
            return fn()
        finally:
            dense._PACKED, gen.prepare_for_decoding = saved, saved_prepare
    return run


def kernel_table(kinds: list[str], repeats: int) -> list[dict]:
    """GB/s of F.linear and oneDNN over row- and column-major weights of every decode shape, of oneDNN over its
    packed copy and of the native kernel over its blocked copy (see the docstring)."""
    lp = torch.ops.mkldnn._linear_pointwise
    kernels = {"F.linear": lambda x, w: torch.nn.functional.linear(x, w),
               "oneDNN": lambda x, w: lp(x, w, None, "none", [], "")}
    shapes = sorted({tuple(m.weight.shape) for k in kinds for m in llmarch.build(CONFIGS[k](), device="meta").modules()
                     if isinstance(m, torch.nn.Linear)}, key=lambda s: -s[0] * s[1])
    rows = []
    for out_f, in_f in shapes:
        row_major = [torch.randn(out_f, in_f) for _ in range(max(1, int(400e6 // (out_f * in_f * 4))))]
        layouts = {"row": row_major, "column": [w.t().contiguous().t() for w in row_major]}
        packed = [torch.ops.mkldnn._reorder_linear_weight(w, dense.PACK_ROWS) for w in row_major]  # dense.pack
        blocked = [native_fp32.Blocked(w) for w in row_major] if native_fp32.available() else []  # ... native
        for B in (1, 8):
            x = torch.randn(B, in_f)
            fns = {(k, lay): (lambda f=f, ws=ws: [f(x, w) for w in ws]) for k, f in kernels.items()
                   for lay, ws in layouts.items()}
            fns[("oneDNN", "packed")] = lambda ws=packed: [kernels["oneDNN"](x, w) for w in ws]
            if blocked:
                fns[("native", "blocked")] = lambda ws=blocked: [native_fp32.mm(x, w) for w in ws]
            times = round_robin(fns, repeats)
            gbs = {f"{k} {lay}": len(row_major) * out_f * in_f * 4 / statistics.median(t) / 1e9
                   for (k, lay), t in times.items()}
            rows.append(dict(shape=[out_f, in_f], batch=B, gb_per_s=gbs))
            print(f"  [{out_f}, {in_f}] B={B}: " + ", ".join(f"{k} {v:.1f}" for k, v in gbs.items()), flush=True)
        del row_major, layouts, packed, blocked
    return rows


def int8_kernel_table(repeats: int) -> list[dict]:
    """Microseconds of the int8 routes of ``llmarch::int8_mm`` per row count: llmarch's native kernel over the
    blocked weight (where it builds), torch's packed kernel (``_weight_int8pack_mm``, row by row) and oneDNN's
    bf16 matmul over the weight cast to bf16; fp32 oneDNN over an fp32 copy for reference. Each over ~200 MB of
    weight copies (nothing served from the caches)."""
    lp = torch.ops.mkldnn._linear_pointwise
    rows = []
    for out_f, in_f in ((8192, 512), (2752, 512), (512, 1376), (768, 512), (2304, 768), (3072, 768), (768, 3072)):
        n = max(1, int(200e6 // (out_f * in_f * 4)))
        qs = [torch.randint(-127, 128, (out_f, in_f), dtype=torch.int8) for _ in range(n)]
        ws, scales = [q.float() for q in qs], torch.rand(out_f)
        blocked = [int8_native.block(q, scales) for q in qs] if int8_native.available() else []
        a8 = [w8a8.block(q, scales) for q in qs] if w8a8.available() else []
        for M in (1, 8, 16, 32, 128):
            x = torch.randn(M, in_f)
            xb, sb = x.to(torch.bfloat16), scales.to(torch.bfloat16)
            fns = {"int8pack": lambda: [torch._weight_int8pack_mm(xb, q, sb) for q in qs],
                   "fp32 oneDNN": lambda: [lp(x, w, None, "none", [], "") for w in ws]}
            if dense.ONEDNN_BF16:  # oneDNN's bf16 products need AVX-512 BW/VL/DQ or AVX-NE-CONVERT
                fns["int8 -> bf16 oneDNN"] = lambda: [lp(xb, q.to(torch.bfloat16), None, "none", [], "") for q in qs]
            if blocked:
                fns["native int8 (fp32)"] = lambda: [int8_native._call(int8_native._KERNEL.fn(), x, w, s, out_f)
                                                     for w, s in blocked]
            if a8:
                fns["native int8 (int8 activations)"] = lambda: [w8a8._call(w8a8._KERNEL.fn(), x, w, s, out_f)
                                                                 for w, s in a8]
            us = {k: statistics.median(t) / n * 1e6 for k, t in round_robin(fns, repeats).items()}
            rows.append(dict(shape=[out_f, in_f], rows=M, us=us))
            print(f"  [{out_f}, {in_f}] M={M}: " + ", ".join(f"{k} {v:.0f} us" for k, v in us.items()), flush=True)
    return rows


def quantized_accuracy(model, quantized: dict, ids: torch.Tensor, n: int) -> dict:
    """Per quantized model: its prompt logits' error against the fp32 model's (mean and max of |diff| / the fp32
    logits' std) and the share of greedy tokens equal to the fp32 model's over ``n`` new tokens."""
    ref, ref_ids = model(ids).logits, llmarch.generate(model, ids, n)
    out = {}
    for name, q in quantized.items():
        err = (q(ids).logits - ref).abs() / ref.std()
        same = (llmarch.generate(q, ids, n)[:, ids.shape[1]:] == ref_ids[:, ids.shape[1]:]).float().mean()
        out[name] = dict(mean_rel_err=round(err.mean().item(), 5), max_rel_err=round(err.max().item(), 5),
                         greedy_tokens_equal=round(same.item(), 4))
    return out


def run_model(kind: str, args, bandwidth: float) -> list[dict]:
    torch.manual_seed(0)
    model = llmarch.build(CONFIGS[kind]()).eval()
    V, N = model.config.vocab_size, args.new_tokens
    rows, moe = [], any(isinstance(m, MoE) for m in model.modules())
    with tempfile.TemporaryDirectory() as tmp:  # MoE: every experts implementation of transformers on CPU
        hfs = hf_model(model, kind, tmp, HF_EXPERTS) if moe else {}
        hf = hfs[HF_EXPERTS[0]] if moe else hf_model(model, kind, tmp)
    int8 = quantize(copy.deepcopy(model), "int8")
    a8 = quantize(copy.deepcopy(model), "int8", activations="int8")
    # every variant its own copy: the BLAS and unpacked variants re-lay weights column-major (generate's layout
    # without packed copies) and change what generate's pack check sees, which left most of a shared model's
    # packed copies stale for the eager variant (in the runs before 2026-12-02's sixth round)
    blas, plain = copy.deepcopy(model), copy.deepcopy(model)
    onednn = None
    if native_fp32.available():  # the same model with oneDNN's packed copies instead of the native kernel's
        onednn = copy.deepcopy(model)
        without_native(lambda: pack_weights(onednn))()
    pack_weights(model)  # what generate does on a long call or a second call with unchanged weights (every timed
    # round here; done up front because the BLAS variant in between hides the packing from generate's check)
    for B in args.batches:
        ids = torch.randint(0, V, (B, args.prompt), generator=torch.Generator().manual_seed(B))
        mask = torch.ones_like(ids)
        hf_kw = dict(attention_mask=mask, max_new_tokens=N, min_new_tokens=N, do_sample=False, pad_token_id=0)
        fp32_bytes = streamed_bytes(model, B)
        variants = {
            "hf generate (sdpa, dynamic cache)": lambda: hf.generate(ids, **hf_kw),
            **{f"hf generate (sdpa, dynamic cache, experts {impl})": lambda m=m: m.generate(ids, **hf_kw)
               for impl, m in hfs.items() if impl != HF_EXPERTS[0] and (B == 1 or impl != "batched_mm")},
            "hf generate (sdpa, static cache)": lambda: hf.generate(ids, cache_implementation="static", **hf_kw),
            "llmarch eager (dynamic cache)": lambda: llmarch.generate(model, ids, N),
            "llmarch eager, layers as torch ops": torch_layers(lambda: llmarch.generate(model, ids, N)),
            "llmarch eager, F.linear (BLAS)": with_dense(lambda: llmarch.generate(blas, ids, N), ONEDNN=False),
            "llmarch eager, unpacked weights": unpacked(lambda: llmarch.generate(plain, ids, N)),
            "llmarch int8 eager": lambda: llmarch.generate(int8, ids, N),
            "llmarch int8 eager, layers as torch ops": torch_layers(lambda: llmarch.generate(int8, ids, N)),
            "llmarch int8 eager, int8 activations": lambda: llmarch.generate(a8, ids, N),
        }
        if onednn is not None:
            variants["llmarch eager, oneDNN packed (no native)"] = lambda: llmarch.generate(onednn, ids, N)
        if int8_native.available():
            variants["llmarch int8 eager, torch's int8 kernel"] = without_native(lambda: llmarch.generate(int8, ids, N))
        if args.compile and not moe:
            variants["llmarch static + compile"] = lambda: llmarch.generate(model, ids, N, cache="static",
                                                                            compile=True)
            variants["llmarch int8 static + compile"] = lambda: llmarch.generate(int8, ids, N, cache="static",
                                                                                 compile=True)
        if B == 1 and set(model.config.mixers) == {"attention"}:  # speculative decoding's static cache
            variants["speculative fp32 target, int8 self-draft k=4"] = lambda: speculative_generate(
                model, int8, ids, N, k=4)
        with torch.no_grad():
            times = round_robin(variants, args.repeats)
            accuracy = quantized_accuracy(model, {"int8": int8, "int8, int8 activations": a8}, ids, N)
        print(f"  {kind} B={B} accuracy against fp32: {accuracy}", flush=True)
        # transformers' fastest experts implementation for an MoE model (only the default one for a dense model)
        base = max(B * N / statistics.median(t) for name, t in times.items()
                   if name.startswith("hf generate (sdpa, dynamic"))
        for name, raw in times.items():
            tps = B * N / statistics.median(raw)
            bytes_ = streamed_bytes(int8, B) if "int8" in name and "draft" not in name else fp32_bytes
            bound = B * bandwidth * 1e9 / fp32_bytes
            row = dict(model=kind, batch=B, variant=name, tokens_per_s=tps, vs_hf=tps / base,
                       fp32_bound_tokens_per_s=bound, fraction_of_fp32_bound=tps / bound,
                       own_bound_tokens_per_s=B * bandwidth * 1e9 / bytes_, weight_bytes=bytes_, times=raw)
            if name.startswith("speculative"):
                _, stats = speculative_generate(model, int8, ids, N, k=4)
                row["acceptance_rate"] = stats.acceptance_rate
                row["tokens_per_target_call"] = stats.tokens_per_target_call
            if "int8" in name and "draft" not in name:
                row["accuracy_vs_fp32"] = accuracy["int8, int8 activations" if "activations" in name else "int8"]
            rows.append(row)
            print(f"  {kind} B={B} {name}: {tps:.1f} tok/s ({tps / bound:.0%} of bound)", flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--models", default="gpt2,llama")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--prompt", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--no-compile", dest="compile", action="store_false", help="leave out the compiled variants")
    p.add_argument("--kernels", action="store_true", help="only the per-shape kernel / layout table")
    p.add_argument("--int8-kernels", action="store_true", help="only the int8 kernel per row count table")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    # every (model, batch, cache length) is one specialisation of the same compiled step function; dynamo's
    # default limit of 8 per function is too few for this sweep
    torch._dynamo.config.recompile_limit = 64
    args.batches = [int(b) for b in args.batches.split(",")]
    if args.int8_kernels:
        rows = int8_kernel_table(args.repeats)
        print(f"wrote {write_results('decode_int8_kernels', dict(settings=vars(args), load=os.getloadavg(), rows=rows))}")
        return
    if args.kernels:
        bw, load = memory_bandwidth_gbs(), os.getloadavg()
        print(f"measured read bandwidth {bw:.1f} GB/s, threads {torch.get_num_threads()}, load {load}")
        rows = kernel_table(args.models.split(","), args.repeats)
        path = write_results("decode_kernels", dict(settings=vars(args), read_bandwidth_gbs=bw,
                                                    bandwidth_after=memory_bandwidth_gbs(), load_before=load,
                                                    load_after=os.getloadavg(), rows=rows))
        print(f"wrote {path}")
        return
    load_before = os.getloadavg()
    lim = limits()
    bw = lim["read_bandwidth_gbs"]
    print(f"measured read bandwidth {bw:.1f} GB/s, threads {torch.get_num_threads()}, load {load_before}")
    rows = []
    for kind in args.models.split(","):
        rows += run_model(kind, args, bw)
    print_table([[r["model"], r["batch"], r["variant"], r["tokens_per_s"], r["vs_hf"], r["fraction_of_fp32_bound"],
                  r.get("acceptance_rate", "")] for r in rows],
                ["model", "B", "variant", "tok/s", "x HF", "of bound", "accept"])
    path = write_results("decode", dict(settings=vars(args), limits=lim, load_before=load_before,
                                        load_after=os.getloadavg(), rows=rows))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
