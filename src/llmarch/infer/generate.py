"""Autoregressive generation with a KV cache: prefill the prompt once, then one token per step."""
from __future__ import annotations

import torch

from llmarch.infer.sampling import sample_next
from llmarch.nn.cache import KVCache


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, max_new_tokens: int = 32, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, eos_token_id: int | None = None,
             attention_mask: torch.Tensor | None = None, pad_token_id: int | None = None,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """Extend ``input_ids`` [B, T] (left-padded when rows differ in length; pass ``attention_mask``) by up to
    ``max_new_tokens``. Returns [B, T + n]. A row that produced ``eos_token_id`` is filled with ``pad_token_id``
    (default: the eos id) until all rows finish. Greedy when ``temperature == 0``."""
    cfg = model.config
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    B, T = input_ids.shape
    if T == 0:
        raise ValueError("input_ids: the prompt is empty; give at least one token (e.g. a BOS id)")
    if T > cfg.max_seq_len:
        raise ValueError(f"input_ids: the prompt has {T} tokens, longer than the model's context "
                         f"(max_seq_len={cfg.max_seq_len}); truncate it")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected {tuple(input_ids.shape)}")
    fill = eos_token_id if pad_token_id is None else pad_token_id
    was_training = model.training
    model.eval()
    cache = model.new_cache() if hasattr(model, "new_cache") else KVCache()
    out = model(input_ids, attention_mask=attention_mask, cache=cache)
    ids, mask = input_ids, attention_mask
    done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    for _ in range(max_new_tokens):
        nxt = sample_next(out.logits[:, -1].float(), temperature, top_k, top_p, generator)
        if eos_token_id is not None:
            nxt = torch.where(done, torch.full_like(nxt, fill), nxt)
            done = done | (nxt == eos_token_id)
        ids = torch.cat([ids, nxt[:, None]], dim=1)
        mask = torch.cat([mask, mask.new_ones(B, 1)], dim=1)
        if eos_token_id is not None and bool(done.all()):
            break
        out = model(nxt[:, None], attention_mask=mask, cache=cache)
    model.train(was_training)
    return ids
