"""Decode after a long prompt: milliseconds per new token of the LLaMA-style model (benchmarks/decode.py's, with
a 4096-token context) for transformers `generate` (sdpa) and llmarch eager: with each decoder layer in one native
call (``llmarch.nn.fused_decode``, generate's default here), and with the layers as torch ops
(``LLMARCH_FUSED_DECODE=0``) using the sdpa kernel's single-query route
(``llmarch.nn.kernels.SINGLE_QUERY_MIN_KEYS``) or torch's fused kernel for every query.

    PYTHONPATH=src python benchmarks/decode_long.py [--cases 1x2048,8x512] [--rounds 3] [--threads 1]
    PYTHONPATH=src python benchmarks/decode_long.py --dtype bf16   # bf16 model: native bf16 layers vs torch ops

With ``--dtype bf16`` the model is converted to bf16 and compared with its torch-op layers (which widen the whole
bf16 cache at every step) and with the same model in fp32 on the native layers; transformers is left out (its bf16
prefill runs torch's generic bf16 kernel on a CPU without bf16 products: minutes per call at 2048 tokens) and the
"x" column is against the torch-op bf16 layers. Writes decode_long_bf16.json then.

Per-token time: a call generating 40 tokens, timed from its first new token to its last through a streamer (each
library's own), / 39, so the prompt's prefill is left out (the twelfth round and before subtracted a call
generating 8 tokens instead, which a long, variable bf16 prefill swamps); greedy; the variants alternate within
each round and the figures are medians. Also checks that both llmarch
variants give transformers' tokens. Writes benchmarks/results/decode_long.json.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, write_results  # noqa: E402
from decode import CONFIGS, hf_model  # noqa: E402

import llmarch  # noqa: E402
from llmarch.infer.layout import pack_weights  # noqa: E402
from llmarch.nn import kernels  # noqa: E402

SHORT, LONG = 8, 40


class _Clock:
    """Time stamps of the tokens a generate call streams: llmarch calls it with each step's tokens, transformers'
    streamer interface with the prompt first (``put``) and then each new token."""

    def __init__(self):
        self.stamps = []

    def __call__(self, tokens) -> None:
        self.stamps.append(time.perf_counter())

    def put(self, value) -> None:
        self.stamps.append(time.perf_counter())

    def end(self) -> None:
        pass

    def per_token_ms(self, n: int) -> float:
        """ms per token between the first of the ``n`` new tokens and the last."""
        new = self.stamps[-n:]
        return (new[-1] - new[0]) / (n - 1) * 1e3


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--cases", default="1x2048,8x512", help="batch x prompt tokens, comma-separated")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = llmarch.build(CONFIGS["llama"]().replace(max_seq_len=4096)).eval()
    bf16 = args.dtype == "bf16"
    if bf16:
        fp32 = llmarch.build(CONFIGS["llama"]().replace(max_seq_len=4096)).eval()
        fp32.load_state_dict(model.state_dict())
        pack_weights(fp32)
        model = model.to(torch.bfloat16)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            hf = hf_model(model, "llama", tmp)
    pack_weights(model)
    on = kernels.SINGLE_QUERY_MIN_KEYS

    def ours(route: int, native_layers: bool = False, model=model):
        def run(ids, n, clock=None):
            kernels.SINGLE_QUERY_MIN_KEYS = route
            os.environ["LLMARCH_FUSED_DECODE"] = "1" if native_layers else "0"
            try:
                return llmarch.generate(model, ids, n, streamer=clock)
            finally:
                kernels.SINGLE_QUERY_MIN_KEYS = on
                os.environ.pop("LLMARCH_FUSED_DECODE")
        return run

    def theirs(ids, n, clock=None):
        return hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, pad_token_id=0, streamer=clock)

    variants = {"hf generate (sdpa)": theirs, "llmarch, native layers": ours(on, native_layers=True),
                "llmarch, torch-op layers, single-query route": ours(on),
                "llmarch, torch-op layers, fused kernel only": ours(1 << 62)}
    reference = "hf generate (sdpa)"
    if bf16:
        reference = "llmarch bf16, torch-op layers"
        variants = {reference: ours(on), "llmarch bf16, native layers": ours(on, native_layers=True),
                    "llmarch fp32, native layers": ours(on, native_layers=True, model=fp32)}
    rows, table = [], []
    for case in args.cases.split(","):
        B, P = (int(x) for x in case.split("x"))
        ids = torch.randint(0, model.config.vocab_size, (B, P), generator=torch.Generator().manual_seed(B))
        with torch.no_grad():
            outs = {name: fn(ids, SHORT) for name, fn in variants.items()}  # warm-up, and the tokens to compare
            same = all(torch.equal(o, outs[reference]) for o in outs.values())
            ms = {name: [] for name in variants}
            for _ in range(args.rounds):
                for name, fn in variants.items():
                    clock = _Clock()
                    fn(ids, LONG, clock)
                    ms[name].append(clock.per_token_ms(LONG))
        med = {name: statistics.median(v) for name, v in ms.items()}
        base = med[reference]
        for name, m in med.items():
            rows.append(dict(batch=B, prompt=P, variant=name, ms_per_token=m, reference=reference,
                             vs_reference=base / m, same_tokens=same, ms=ms[name]))
            table.append([B, P, name, m, base / m, same])
    print_table(table, ["B", "prompt", "variant", "ms / token", "x " + ("torch-op bf16" if bf16 else "HF"),
                        "same tokens"])
    path = write_results("decode_long_bf16" if bf16 else "decode_long",
                         dict(settings=vars(args), load=os.getloadavg(), rows=rows))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
