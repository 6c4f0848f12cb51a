"""Decode speed: tokens/s at batch 1 and 8 for GPT-2-124M and a LLaMA-style model, Hugging Face `generate`
against llmarch (eager, static cache + torch.compile, int8, speculative), each as a fraction of
the memory-bandwidth bound (weight bytes streamed per step / measured read bandwidth).

    PYTHONPATH=src python benchmarks/decode.py [--new-tokens 32] [--repeats 3] [--models gpt2,llama]

Greedy, prompt of 16 tokens, fixed output length; a timed call includes the prompt's prefill (one weight pass,
like one decode step at these sizes). Random weights: speed does not depend on them (speculative acceptance
does; see its row).
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import limits, median_time, print_table, write_results  # noqa: E402

import llmarch  # noqa: E402
from llmarch.infer.quantize import quantize  # noqa: E402
from llmarch.infer.speculative import speculative_generate  # noqa: E402

CONFIGS = {
    "gpt2": lambda: llmarch.preset("gpt2"),
    "llama": lambda: llmarch.preset("llama-tiny").replace(d_model=512, n_layers=8, n_heads=8, n_kv_heads=2,
                                                          d_ff=1376, vocab_size=8192, max_seq_len=2048),
}
HF_TYPE = {"gpt2": "gpt2", "llama": "llama"}


def weight_bytes(model) -> int:
    """Bytes of the matrices one decode step streams: every Linear-like weight, the LM head included."""
    total = 0
    for m in model.modules():
        for name, t in list(m.named_parameters(recurse=False)) + list(m.named_buffers(recurse=False)):
            if t is not None and t.dim() == 2 and not isinstance(m, torch.nn.Embedding) and "position" not in name:
                total += t.numel() * t.element_size()
    if getattr(model.config, "tie_embeddings", False) and isinstance(model.lm_head, torch.nn.Linear):
        total += model.lm_head.weight.numel() * model.lm_head.weight.element_size()  # shared with the embedding
    return total


def hf_model(model, kind: str, tmp: str):
    import transformers

    llmarch.hf.save(model, tmp, model_type=HF_TYPE[kind])
    return transformers.AutoModelForCausalLM.from_pretrained(tmp, attn_implementation="sdpa",
                                                             dtype=torch.float32).eval()


def run_model(kind: str, args, bandwidth: float) -> list[dict]:
    torch.manual_seed(0)
    model = llmarch.build(CONFIGS[kind]()).eval()
    V, N = model.config.vocab_size, args.new_tokens
    fp32_bytes = weight_bytes(model)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        hf = hf_model(model, kind, tmp)
    int8 = quantize(copy.deepcopy(model), "int8")
    for B in args.batches:
        ids = torch.randint(0, V, (B, args.prompt), generator=torch.Generator().manual_seed(B))
        mask = torch.ones_like(ids)
        hf_kw = dict(attention_mask=mask, max_new_tokens=N, min_new_tokens=N, do_sample=False, pad_token_id=0)
        variants = {
            "hf generate (sdpa, dynamic cache)": lambda: hf.generate(ids, **hf_kw),
            "hf generate (sdpa, static cache)": lambda: hf.generate(ids, cache_implementation="static", **hf_kw),
            "llmarch eager (dynamic cache)": lambda: llmarch.generate(model, ids, N),
            "llmarch static + compile": lambda: llmarch.generate(model, ids, N, cache="static", compile=True),
            "llmarch int8 static + compile": lambda: llmarch.generate(int8, ids, N, cache="static", compile=True),
        }
        if B == 1:
            variants["speculative fp32 target, int8 self-draft k=4"] = lambda: speculative_generate(
                model, int8, ids, N, k=4)
        base = None
        for name, fn in variants.items():
            with torch.no_grad():
                t, raw = median_time(fn, repeats=args.repeats, warmup=1)
            tps = B * N / t
            bytes_ = weight_bytes(int8) if "int8 static" in name else fp32_bytes
            bound = B * bandwidth * 1e9 / fp32_bytes
            if name.startswith("hf generate (sdpa, dynamic"):
                base = tps
            row = dict(model=kind, batch=B, variant=name, tokens_per_s=tps, vs_hf=tps / base,
                       fp32_bound_tokens_per_s=bound, fraction_of_fp32_bound=tps / bound,
                       own_bound_tokens_per_s=B * bandwidth * 1e9 / bytes_, weight_bytes=bytes_, times=raw)
            if name.startswith("speculative"):
                _, stats = speculative_generate(model, int8, ids, N, k=4)
                row["acceptance_rate"] = stats.acceptance_rate
                row["tokens_per_target_call"] = stats.tokens_per_target_call
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
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    # every (model, batch, cache length) is one specialisation of the same compiled step function; dynamo's
    # default limit of 8 per function is too few for this sweep
    torch._dynamo.config.recompile_limit = 64
    args.batches = [int(b) for b in args.batches.split(",")]
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
