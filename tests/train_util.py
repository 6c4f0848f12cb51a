"""Shared tiny settings for the training tests: a 2-layer model and ~0.2 MB of the standard library."""
from __future__ import annotations

import llmarch
from llmarch.train import TrainConfig

TINY = llmarch.preset("llama-tiny").replace(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                                            max_seq_len=64)


def settings(out, cache, **changes) -> TrainConfig:
    base = dict(out=str(out), steps=6, batch_size=4, seq_len=32, lr=3e-3, warmup=2, max_data_mb=0.2, vocab_size=400,
                cache_dir=str(cache), eval_every=3, eval_batches=2, log_every=1, save_every=1000, progress=False,
                samples=0)
    base.update(changes)
    return TrainConfig(**base)


