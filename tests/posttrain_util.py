"""Shared fixtures of the post-training tests: a tiny 'pretrained' model directory with its tokenizer, and JSONL
rows of each kind."""
from __future__ import annotations

import json
from pathlib import Path

import torch

import llmarch
from llmarch.checkpoint import save_model
from llmarch.tokenizer import train_tokenizer
from llmarch.train import TrainConfig

TEXTS = ["def add(a, b):\n    return a + b\n", "What is two plus two? Four.", "The answer is yes, no or maybe."] * 30


def tiny_model_dir(root: Path, preset: str = "llama-tiny", seed: int = 0) -> Path:
    """An llmarch model directory (config.json, model.safetensors, tokenizer.json) of a 2-layer model."""
    tok = train_tokenizer(TEXTS, vocab_size=300)
    cfg = llmarch.preset(preset).replace(d_model=32, n_layers=2, n_heads=4, d_ff=64, max_seq_len=128,
                                         vocab_size=tok.vocab_size, bos_token_id=tok.bos_id,
                                         eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    if cfg.kv_heads != cfg.n_heads:
        cfg = cfg.replace(n_kv_heads=2)
    torch.manual_seed(seed)
    d = root / f"base-{preset}"
    save_model(llmarch.build(cfg), d)
    tok.save(d)
    return d


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


SFT_ROWS = [{"messages": [{"role": "system", "content": "Be brief."},
                          {"role": "user", "content": f"What is {i} plus {i}?"},
                          {"role": "assistant", "content": f"{2 * i}."}]} for i in range(12)] + \
           [{"prompt": f"Say yes {i}", "response": "yes"} for i in range(12)]
PREF_ROWS = [{"prompt": f"Is {i} even?", "chosen": "yes" if i % 2 == 0 else "no",
              "rejected": "maybe"} for i in range(16)]


def ft_settings(out, base: Path, data: Path, **changes) -> TrainConfig:
    kw = dict(out=str(out), init_from=str(base), data=None if data is None else str(data), steps=4, batch_size=4, seq_len=48, lr=3e-3,
              warmup=1, eval_every=2, eval_batches=1, log_every=1, save_every=1000, progress=False, samples=0,
              val_fraction=0.2)
    kw.update(changes)
    return TrainConfig(**kw)
