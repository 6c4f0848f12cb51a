"""Quality of the inference shortcuts on a trained model: validation perplexity of fp32, int8 (per channel; with
fp32 or int8 activations) and int4 (groups of 32 / 64 / 128), and early exit (CALM) at several thresholds with the mean layers used per token.

    PYTHONPATH=src python benchmarks/quality.py --checkpoint runs/demo [--max-tokens 131072] [--exit-tokens 2048]

Without ``--checkpoint`` it first trains llama-tiny for 150 steps on the standard library (a few minutes on CPU)
so the figures can be reproduced from a fresh clone.

Held-out text: the validation split of the run itself (the run's corpus, size cap and val_fraction re-applied
through ``llmarch.data``, tokenised with the run's tokenizer, eos after each file), cut into the run's
``seq_len + 1`` windows like the trainer's validation. fp32 and the quantized copies score whole windows in one
forward. Early exit has no batched path: ``early_exit_nll`` teacher-forces token by token through a KV cache, so
it runs on the first ``--exit-tokens`` tokens only; the fp32 full forward is scored on the same tokens as its
reference, and threshold 1.0 must reproduce it.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, write_results  # noqa: E402

import llmarch  # noqa: E402
from llmarch import data  # noqa: E402
from llmarch.checkpoint import load_model  # noqa: E402
from llmarch.infer.early_exit import early_exit_nll  # noqa: E402
from llmarch.infer.quantize import quantize  # noqa: E402
from llmarch.tokenizer import load_tokenizer_for  # noqa: E402
from llmarch.train import TrainConfig, train  # noqa: E402
from llmarch.train.checkpoints import resolve_model_dir  # noqa: E402


def train_default(out: Path, steps: int) -> Path:
    """A small llama-tiny run on the standard library (the `make demo` recipe, fewer steps and data)."""
    tc = TrainConfig(out=str(out), steps=steps, batch_size=16, seq_len=128, lr=3e-3, warmup=20, max_data_mb=4.0,
                     vocab_size=2048, eval_every=steps, eval_batches=8, save_every=steps, samples=0,
                     progress=False)
    result = train(llmarch.preset("llama-tiny"), tc)
    return result.checkpoint


def run_settings(model_dir: Path) -> dict:
    """The training settings saved with the checkpoint (state.json), or {} for a bare model directory."""
    state = model_dir / "state.json"
    return json.loads(state.read_text()).get("train", {}) if state.is_file() else {}


def validation_tokens(tok, settings: dict) -> tuple[np.ndarray, dict]:
    """The run's validation split, tokenised with its tokenizer: (tokens, description)."""
    root, files = data.corpus_files(settings.get("data"))
    mb = settings.get("max_data_mb")
    files = data.take_bytes(files, None if mb is None else int(mb * 1e6))
    _, val_files = data.split_files(root, files, settings.get("val_fraction", 0.05))
    with tempfile.TemporaryDirectory() as tmp:
        n = data.tokenize_to_file(data.read_texts(val_files), tok, Path(tmp) / "val.bin")
        dtype = np.uint16 if tok.vocab_size <= 2**16 else np.uint32
        tokens = np.fromfile(Path(tmp) / "val.bin", dtype=dtype, count=n)
    source = "the run's validation split" if settings else "validation split of the default stdlib corpus"
    return tokens, dict(source=source, files=[f.relative_to(root).as_posix() for f in val_files], tokens=int(n))


@torch.no_grad()
def window_nll(model, windows: torch.Tensor, batch: int = 16) -> tuple[float, int]:
    """Summed next-token NLL over windows [N, T+1] (predict positions 1..T), and the count."""
    total, count = 0.0, 0
    for i in range(0, windows.shape[0], batch):
        w = windows[i:i + batch]
        logits = model(w[:, :-1]).logits.float()
        total += float(F.cross_entropy(logits.flatten(0, 1), w[:, 1:].flatten(), reduction="sum"))
        count += w[:, 1:].numel()
    return total, count


def row(name: str, nll: float, ref: float, tokens: int, **extra) -> dict:
    return dict(variant=name, nll=nll, ppl=math.exp(nll), ppl_change=math.exp(nll) / math.exp(ref) - 1,
                tokens=tokens, **extra)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--checkpoint", default=None, help="model directory or training run (newest checkpoint)")
    p.add_argument("--train-steps", type=int, default=150, help="steps of the default run without --checkpoint")
    p.add_argument("--max-tokens", type=int, default=131072, help="tokens scored for fp32 / int8 / int4")
    p.add_argument("--exit-tokens", type=int, default=2048, help="tokens scored token by token for early exit")
    p.add_argument("--thresholds", default="1.0,0.99,0.95,0.9,0.8")
    p.add_argument("--criteria", default="softmax,state")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before, start = os.getloadavg(), time.perf_counter()

    tmp = None
    if args.checkpoint is None:
        tmp = tempfile.TemporaryDirectory()
        print(f"no --checkpoint: training llama-tiny for {args.train_steps} steps ...", flush=True)
        model_dir = train_default(Path(tmp.name) / "run", args.train_steps)
    else:
        model_dir = resolve_model_dir(args.checkpoint)
    settings = run_settings(model_dir)
    step = json.loads((model_dir / "state.json").read_text())["step"] if settings else None
    model, tok = load_model(model_dir).eval(), load_tokenizer_for(model_dir)
    tokens, held_out = validation_tokens(tok, settings)
    T = settings.get("seq_len", 128)
    seqs = data.PackedSequences(tokens, T + 1, shuffle=False)
    n_windows = min(len(seqs), max(1, args.max_tokens // T))
    windows = torch.from_numpy(np.stack([seqs.chunk(i) for i in range(n_windows)]).astype(np.int64))
    print(f"checkpoint {model_dir} (step {step}); {held_out['source']}: {len(held_out['files'])} files, "
          f"{held_out['tokens']} tokens; scoring {windows[:, 1:].numel()} in windows of {T}", flush=True)

    rows = []
    linear_sizes = {k: m.weight.numel() for k, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    s, n = window_nll(model, windows)
    ref = s / n
    rows.append(row("fp32", ref, ref, n, fp32_layers=[], quantized_weight_fraction=0.0))
    for mode, gs, act in (("int8", None, "fp32"), ("int8", None, "int8"), ("int4", 32, "fp32"), ("int4", 64, "fp32"),
                          ("int4", 128, "fp32")):
        q = quantize(copy.deepcopy(model), mode, group_size=gs or 64, activations=act)
        s, n = window_nll(q, windows)
        kept = q.quantization["skip"]  # Linear layers whose in_features the group size does not divide
        name = f"{mode}" + (f" g{gs}" if gs else " per-channel") + (", int8 activations" if act == "int8" else "")
        rows.append(row(name, s / n, ref, n, fp32_layers=kept,
                        quantized_weight_fraction=1 - sum(linear_sizes[k] for k in kept) / sum(linear_sizes.values())))
        print(f"  {rows[-1]['variant']}: ppl {rows[-1]['ppl']:.3f}", flush=True)

    # early exit: token by token on the first windows, against the fp32 forward on the same tokens
    n_exit = max(1, math.ceil(args.exit_tokens / T))
    exit_windows = windows[:n_exit]
    s, n = window_nll(model, exit_windows)
    exit_ref = s / n
    L = len(model.decoder.layers)
    exit_rows = [row("fp32 full forward", exit_ref, exit_ref, n, criterion="", threshold=None, mean_layers=float(L))]
    for crit in args.criteria.split(","):
        for th in (float(x) for x in args.thresholds.split(",")):
            total, count, layers = 0.0, 0, []
            for w in exit_windows:
                nll, stats = early_exit_nll(model, w[None], th, criterion=crit)
                total += nll * (len(w) - 1)
                count += len(w) - 1
                layers += stats.layers
            exit_rows.append(row(f"early exit {crit} > {th:g}", total / count, exit_ref, count, criterion=crit,
                                 threshold=th, mean_layers=sum(layers) / len(layers),
                                 layer_histogram={k: layers.count(k) for k in range(1, L + 1)}))
            print(f"  {exit_rows[-1]['variant']}: ppl {exit_rows[-1]['ppl']:.3f}, "
                  f"{exit_rows[-1]['mean_layers']:.2f} / {L} layers", flush=True)

    print_table([[r["variant"], r["tokens"], r["nll"], r["ppl"], f"{r['ppl_change']:+.2%}",
                  f"{r['quantized_weight_fraction']:.0%}"] for r in rows],
                ["weights", "tokens", "NLL", "ppl", "ppl change", "Linear weights quantized"])
    print()
    print_table([[r["variant"], r["tokens"], r["mean_layers"], r["nll"], r["ppl"], f"{r['ppl_change']:+.2%}"]
                 for r in exit_rows], ["early exit", "tokens", f"layers (of {L})", "NLL", "ppl", "ppl change"])
    path = write_results("quality", dict(
        settings=vars(args), checkpoint=str(model_dir), step=step, run_settings=settings, held_out=held_out,
        window=T, quantization=rows, early_exit=exit_rows, seconds=time.perf_counter() - start,
        load_before=load_before, load_after=os.getloadavg()))
    print(f"wrote {path}")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
