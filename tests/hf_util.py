"""Shared helpers for parity tests: build a tiny random HF model from our config through the production
translator, save it, load it with llmarch.hf.load, and compare."""
from __future__ import annotations

import json
from pathlib import Path

import torch

import llmarch
from llmarch.hf.io import family

# One tolerance table keyed by dtype (max abs diff on logits).
TOL = {torch.float32: 1e-4}


def make_hf_model(cfg: llmarch.ModelConfig, model_type: str, tmp: Path, seed: int = 0, model_class: str | None = None,
                  **hf_overrides):
    """A randomly initialised transformers model for ``cfg`` (via our translator), saved under ``tmp/hf``.
    ``model_class`` names the transformers class (default: AutoModelForCausalLM)."""
    import transformers

    hf_cfg = family(model_type).from_config(cfg)
    hf_cfg.update(hf_overrides)
    d = tmp / "hf"
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(hf_cfg))
    config = transformers.AutoConfig.from_pretrained(d)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    if model_class is None:
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    else:
        model = getattr(transformers, model_class)(config).to(torch.float32)
    with torch.no_grad():  # biases and norm gains are zero/one at init; randomise so they are tested too
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    model.eval()
    model.save_pretrained(d)
    return model, d


def padded_batch(vocab: int, lengths=(12, 7), seed: int = 1):
    """Left-padded ids [B, T] and attention mask for rows of different lengths."""
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.randint(0, vocab, (len(lengths), T), generator=g)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, T - n:] = 1
    ids = ids.masked_fill(mask == 0, 0)
    return ids, mask


def hf_logits(model, ids, mask):
    """HF logits with position ids that skip left padding (what HF generate uses)."""
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, position_ids=pos).logits


def assert_close_at(ours: torch.Tensor, theirs: torch.Tensor, mask: torch.Tensor, tol: float = TOL[torch.float32]):
    """Max abs diff over real (unpadded) positions."""
    real = mask.bool()
    diff = (ours[real] - theirs[real]).abs().max().item()
    assert diff <= tol, f"max abs diff {diff:.3g} > {tol}"
    return diff
