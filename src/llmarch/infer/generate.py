"""Autoregressive generation with a KV cache: prefill the prompt once, then one token per step."""
from __future__ import annotations

import torch

from llmarch.infer.layout import decode_layout
from llmarch.infer.sampling import sample_next
from llmarch.nn.cache import KVCache


def generate(model, input_ids: torch.Tensor, max_new_tokens: int = 32, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, eos_token_id: int | None = None,
             attention_mask: torch.Tensor | None = None, pad_token_id: int | None = None,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """Extend ``input_ids`` [B, T] (left-padded when rows differ in length; pass ``attention_mask``) by up to
    ``max_new_tokens``. Returns [B, T + n]. A row that produced ``eos_token_id`` is filled with ``pad_token_id``
    (default: the eos id) until all rows finish. Greedy when ``temperature == 0``.

    The first call stores the model's wide linear weights column-major (:func:`decode_layout`: same values,
    faster matrix-vector products)."""
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
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected {tuple(input_ids.shape)}")
    decode_layout(model)  # outside inference mode: parameters must stay ordinary tensors
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            ids = _decode(model, input_ids, max_new_tokens, temperature, top_k, top_p, eos_token_id,
                          attention_mask, eos_token_id if pad_token_id is None else pad_token_id, generator)
        return ids.clone()  # cloned outside inference mode: an ordinary tensor the caller may train on
    finally:
        model.train(was_training)


def _decode(model, input_ids, max_new_tokens, temperature, top_k, top_p, eos_token_id, attention_mask, fill,
            generator) -> torch.Tensor:
    B, T = input_ids.shape
    ids = input_ids.new_empty(B, T + max_new_tokens)  # filled as tokens come: no torch.cat per step
    ids[:, :T] = input_ids
    mask = None  # None while no row is padded: positions are then just the slot numbers
    if attention_mask is not None and not bool(attention_mask.bool().all()):
        mask = attention_mask.new_ones(B, T + max_new_tokens)
        mask[:, :T] = attention_mask
    cache = KVCache()
    out = model(input_ids, attention_mask=None if mask is None else mask[:, :T], cache=cache)
    done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    n = T
    for _ in range(max_new_tokens):
        nxt = sample_next(out.logits[:, -1].float(), temperature, top_k, top_p, generator)
        if eos_token_id is not None:
            nxt = torch.where(done, torch.full_like(nxt, fill), nxt)
            done = done | (nxt == eos_token_id)
        ids[:, n] = nxt
        n += 1
        if n == ids.shape[1] or (eos_token_id is not None and bool(done.all())):
            break
        out = model(ids[:, n - 1:n], attention_mask=None if mask is None else mask[:, :n], cache=cache)
    return ids[:, :n]
