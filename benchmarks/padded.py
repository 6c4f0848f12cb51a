"""Masked attention on llmarch's kernels: padded batches (a fine-tuning step over right-padded rows, a prefill of
left-padded prompts) and a sliding window (Mistral-style), the LLaMA-style model (D 512, L 8, H 8, G 2), for
transformers (sdpa), llmarch, and llmarch with torch's attention kernel in place of its own
(``llmarch.native.flash``, where it builds: AVX-512), whose key-range form takes these masks (twenty-second round;
before it, every masked call ran torch's kernel). Same weights, one process, the variants taking turns each round
after one warm-up; medians. fp32, and bf16 autocast over fp32 weights for the padded step.

The step: forward, the loss over the real tokens' next-token predictions, backward (no optimizer). The prefill: a
forward without gradients over every position. Rows of 512, 448, 320 and 200 real tokens (4 x 512 slots); the
sliding window: one row of 2048 tokens, a window of 256 on every layer (transformers' "mistral").

    PYTHONPATH=src python benchmarks/padded.py [--rounds 5] [--threads 1] [--lengths 512,448,320,200] [--window 256]

Writes benchmarks/results/padded.json.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, write_results  # noqa: E402
from decode import CONFIGS, hf_model, round_robin  # noqa: E402
from prefill import torch_attention  # noqa: E402

import llmarch  # noqa: E402
from llmarch.native import flash  # noqa: E402


def loss(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the real tokens (a padded target is ignored)."""
    targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    return F.cross_entropy(logits[:, :-1].float().flatten(0, 1), targets.flatten(), ignore_index=-100)


def windowed(window: int, T: int, rounds: int, raw: dict) -> list[list]:
    """A training step (fp32) and a prefill over one row of T tokens with a sliding window on every layer."""
    import transformers

    torch.manual_seed(0)
    model = llmarch.build(CONFIGS["llama"]().replace(pattern=("sliding",), window=window, max_seq_len=T))
    with tempfile.TemporaryDirectory() as tmp:
        llmarch.hf.save(model, tmp, model_type="mistral")
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp, attn_implementation="sdpa",
                                                               dtype=torch.float32).train()
    model.train()
    ids = torch.randint(3, model.config.vocab_size, (1, T), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        agree = float((model(ids).logits - hf(ids).logits).abs().max())

    def step(m):
        def run():
            m.zero_grad(set_to_none=True)
            loss(m(ids).logits, ids, mask).backward()
        return run

    def prefill(m):
        def run():
            with torch.no_grad():
                return m(ids).logits
        return run

    rows = []
    for case, make in ((f"window {window} step fp32", step), (f"window {window} prefill fp32", prefill)):
        fns = {"hf (sdpa)": make(hf), "llmarch": make(model)}
        if flash.available():
            fns["llmarch, torch's attention kernel"] = torch_attention(make(model))
        times = round_robin(fns, rounds)
        raw[case] = times
        med = {k: statistics.median(v) for k, v in times.items()}
        for k, s in med.items():
            rows.append([case, k, s * 1e3, med["hf (sdpa)"] / s,
                         med.get("llmarch, torch's attention kernel", float("nan")) / s])
    print(f"sliding window {window} over {T} tokens: max |logit difference| llmarch - transformers {agree:.2e}")
    raw[f"window {window} max_logit_difference"] = agree
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--lengths", default="512,448,320,200", help="real tokens per row (the longest sets the width)")
    p.add_argument("--window", type=int, default=256, help="sliding window of the windowed cases (0: none)")
    p.add_argument("--window-tokens", type=int, default=2048)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    lengths = [int(n) for n in args.lengths.split(",")]
    B, T = len(lengths), max(lengths)
    torch.manual_seed(0)
    model = llmarch.build(CONFIGS["llama"]())
    with tempfile.TemporaryDirectory() as tmp:
        hf = hf_model(model, "llama", tmp).train()
    model.train()
    ids = torch.randint(3, model.config.vocab_size, (B, T), generator=torch.Generator().manual_seed(1))
    right = (torch.arange(T)[None] < torch.tensor(lengths)[:, None]).long()
    left = right.flip(-1)

    def step(m, dtype):
        def run():
            m.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
                logits = m(ids, attention_mask=right).logits
            loss(logits, ids, right).backward()
        return run

    def prefill(m):
        def run():
            with torch.no_grad():
                return m(ids, attention_mask=left).logits
        return run

    # agreement first: the real positions' logits (fp32) and the loss
    with torch.no_grad():
        ours, theirs = model(ids, attention_mask=left).logits, hf(ids, attention_mask=left).logits
    agree = float((ours - theirs)[left.bool()].abs().max())
    rows, raw = [], {}
    for case in ("step fp32", "step bf16", "prefill fp32"):
        if case.startswith("step"):
            dtype = case.split()[1]
            fns = {"hf (sdpa)": step(hf, dtype), "llmarch": step(model, dtype)}
            if flash.available():
                fns["llmarch, torch's attention kernel"] = torch_attention(step(model, dtype))
        else:
            fns = {"hf (sdpa)": prefill(hf), "llmarch": prefill(model)}
            if flash.available():
                fns["llmarch, torch's attention kernel"] = torch_attention(prefill(model))
        times = round_robin(fns, args.rounds)
        raw[case] = times
        med = {k: statistics.median(v) for k, v in times.items()}
        for k, s in med.items():
            rows.append([case, k, s * 1e3, med["hf (sdpa)"] / s,
                         med.get("llmarch, torch's attention kernel", float("nan")) / s])
    if args.window:
        rows += windowed(args.window, args.window_tokens, args.rounds, raw)
    print(f"{B} rows of {lengths} real tokens ({B} x {T} slots), {args.threads} thread(s); max |logit difference| "
          f"llmarch - transformers at real positions (fp32 prefill): {agree:.2e}")
    print_table(rows, ["case", "variant", "ms", "x hf", "x llmarch torch kernel"])
    path = write_results("padded", dict(lengths=lengths, threads=args.threads, rounds=args.rounds,
                                        max_logit_difference=agree, rows=rows, times=raw))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
