"""Masked attention on llmarch's kernels: padded batches (a fine-tuning step over right-padded rows, a prefill of
left-padded prompts), a sliding window (Mistral-style) and ALiBi (BLOOM-style, padded), the LLaMA-style model (D
512, L 8, H 8, G 2; BLOOM's layers at the same sizes, H 8 of 64), for
transformers (sdpa), llmarch, and llmarch with torch's attention kernel in place of its own
(``llmarch.native.flash``, where it builds: AVX-512), whose key-range form takes these masks (twenty-second round;
before it, every masked call ran torch's kernel). Same weights, one process, the variants taking turns each round
after one warm-up; medians. fp32, and bf16 autocast over fp32 weights for the padded step.

The step: forward, the loss over the real tokens' next-token predictions, backward (no optimizer). The prefill: a
forward without gradients over every position. Rows of 512, 448, 320 and 200 real tokens (4 x 512 slots); the
sliding window: one row of 2048 tokens, a window of 256 on every layer (transformers' "mistral"); ALiBi: the padded
rows again (transformers' "bloom", whose attention is its eager one: the family has no SDPA path there).

    PYTHONPATH=src python benchmarks/padded.py [--rounds 5] [--threads 1] [--lengths 512,448,320,200] [--window 256]
        [--no-alibi]

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
from decode import CONFIGS, round_robin  # noqa: E402
from prefill import torch_attention  # noqa: E402

import llmarch  # noqa: E402
from llmarch.native import flash  # noqa: E402


def loss(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean next-token cross-entropy over the real tokens (a padded target is ignored)."""
    targets = ids[:, 1:] if mask is None else ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    return F.cross_entropy(logits[:, :-1].float().flatten(0, 1), targets.flatten(), ignore_index=-100)


def runner(model, ids: torch.Tensor, mask: torch.Tensor | None, train: bool, dtype: str = "fp32"):
    """A training step's forward, loss and backward (``train``), or a forward without gradients."""
    def run():
        if not train:
            with torch.no_grad():
                return model(ids, attention_mask=mask).logits
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
            logits = model(ids, attention_mask=mask).logits
        loss(logits, ids, mask).backward()
    return run


def compare(hf, model, cases: dict, rounds: int, raw: dict) -> list[list]:
    """Each case (name: ids, mask, train, dtype) for transformers, llmarch and llmarch on torch's attention kernel,
    taking turns; rows of (case, variant, ms, x hf, x llmarch on torch's kernel)."""
    rows = []
    for case, (ids, mask, train, dtype) in cases.items():
        fns = {"transformers": runner(hf, ids, mask, train, dtype), "llmarch": runner(model, ids, mask, train, dtype)}
        if flash.available():
            fns["llmarch, torch's attention kernel"] = torch_attention(runner(model, ids, mask, train, dtype))
        times = round_robin(fns, rounds)
        raw[case] = times
        med = {k: statistics.median(v) for k, v in times.items()}
        for k, s in med.items():
            rows.append([case, k, s * 1e3, med["transformers"] / s,
                         med.get("llmarch, torch's attention kernel", float("nan")) / s])
    return rows


def hf_copy(model, model_type: str):
    """transformers' copy of ``model`` (fp32, sdpa where the family has it: not BLOOM), in training mode."""
    import transformers

    with tempfile.TemporaryDirectory() as tmp:
        llmarch.hf.save(model, tmp, model_type=model_type)
        kw = {} if model_type == "bloom" else {"attn_implementation": "sdpa"}
        return transformers.AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32, **kw).train()


def max_difference(a, b, ids: torch.Tensor, mask: torch.Tensor | None) -> float:
    """max |logit difference| of two models at the real positions."""
    with torch.no_grad():
        d = a(ids, attention_mask=mask).logits - b(ids, attention_mask=mask).logits
    return float((d if mask is None else d[mask.bool()]).abs().max())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--lengths", default="512,448,320,200", help="real tokens per row (the longest sets the width)")
    p.add_argument("--window", type=int, default=256, help="sliding window of the windowed cases (0: none)")
    p.add_argument("--window-tokens", type=int, default=2048)
    p.add_argument("--no-alibi", dest="alibi", action="store_false", help="skip the BLOOM-style cases")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    lengths = [int(n) for n in args.lengths.split(",")]
    B, T = len(lengths), max(lengths)
    ids = torch.randint(3, 8192, (B, T), generator=torch.Generator().manual_seed(1))
    right = (torch.arange(T)[None] < torch.tensor(lengths)[:, None]).long()
    left = right.flip(-1)
    rows, raw, agree = [], {}, {}

    torch.manual_seed(0)
    model = llmarch.build(CONFIGS["llama"]())
    hf = hf_copy(model, "llama")
    model.train()
    agree["padded"] = max_difference(model, hf, ids, left)
    rows += compare(hf, model, {"step fp32": (ids, right, True, "fp32"), "step bf16": (ids, right, True, "bf16"),
                                "prefill fp32": (ids, left, False, "fp32")}, args.rounds, raw)
    if args.window:
        torch.manual_seed(0)
        W, n = args.window, args.window_tokens
        model = llmarch.build(CONFIGS["llama"]().replace(pattern=("sliding",), window=W, max_seq_len=n))
        hf = hf_copy(model, "mistral")
        model.train()
        one = torch.randint(3, 8192, (1, n), generator=torch.Generator().manual_seed(2))
        agree[f"window {W}"] = max_difference(model, hf, one, None)
        rows += compare(hf, model, {f"window {W} step fp32": (one, None, True, "fp32"),
                                    f"window {W} prefill fp32": (one, None, False, "fp32")}, args.rounds, raw)
    if args.alibi:  # BLOOM's layers (ALiBi, LayerNorm, GELU) at the same sizes
        torch.manual_seed(0)
        model = llmarch.build(llmarch.preset("bloom-tiny").replace(d_model=512, n_layers=8, n_heads=8, d_ff=2048,
                                                                   vocab_size=8192, max_seq_len=2048))
        hf = hf_copy(model, "bloom")
        model.train()
        agree["alibi"] = max_difference(model, hf, ids, right)
        rows += compare(hf, model, {"alibi step fp32": (ids, right, True, "fp32"),
                                    "alibi prefill fp32": (ids, right, False, "fp32")}, args.rounds, raw)
    print(f"{B} rows of {lengths} real tokens ({B} x {T} slots), {args.threads} thread(s); max |logit difference| "
          "llmarch - transformers at real positions: " + ", ".join(f"{k} {v:.2e}" for k, v in agree.items()))
    print_table(rows, ["case", "variant", "ms", "x transformers", "x llmarch torch kernel"])
    path = write_results("padded", dict(lengths=lengths, threads=args.threads, rounds=args.rounds,
                                        window=args.window, max_logit_difference=agree, rows=rows, times=raw))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
