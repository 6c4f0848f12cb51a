"""Autoregressive generation with a KV cache: prefill the prompt once, then one token per step. Encoder-decoders
encode the input once and decode from the decoder start token, reusing the cross-attention keys/values."""
from __future__ import annotations

from typing import Callable

import torch

from llmarch.infer.sampling import sample_next
from llmarch.nn.cache import EncoderDecoderCache, KVCache


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, max_new_tokens: int = 32, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, eos_token_id: int | None = None,
             attention_mask: torch.Tensor | None = None, pad_token_id: int | None = None,
             generator: torch.Generator | None = None, decoder_start_token_id: int | None = None) -> torch.Tensor:
    """Extend ``input_ids`` [B, T] (left-padded when rows differ in length; pass ``attention_mask``) by up to
    ``max_new_tokens``. Returns [B, T + n]. A row that produced ``eos_token_id`` is filled with ``pad_token_id``
    (default: the eos id) until all rows finish. Greedy when ``temperature == 0``.

    Encoder-decoders read ``input_ids`` (padded either side) with the encoder and return the decoder's tokens
    [B, 1 + n], starting with ``decoder_start_token_id`` (default: the config's); finished rows are filled with
    ``pad_token_id`` (default: the config's pad id, else the eos id)."""
    cfg = model.config
    if cfg.kind == "encoder":
        raise ValueError("generate: an encoder-only model has no decoder to generate with (kind='encoder')")
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
    was_training = model.training
    model.eval()
    try:
        if cfg.kind == "encoder_decoder":
            start = cfg.decoder_start_token_id if decoder_start_token_id is None else decoder_start_token_id
            if start is None:
                raise ValueError("decoder_start_token_id: the config has none; pass decoder_start_token_id=")
            fill = pad_token_id if pad_token_id is not None else (
                cfg.pad_token_id if cfg.pad_token_id is not None else eos_token_id)
            memory = model.encode(input_ids, attention_mask)
            cache = EncoderDecoderCache(memory)
            ids = torch.full((B, 1), start, dtype=torch.long, device=input_ids.device)
            first = model.decode(ids, memory, cache=cache).logits[:, -1]

            def step(nxt: torch.Tensor) -> torch.Tensor:
                return model.decode(nxt[:, None], memory, cache=cache).logits[:, -1]
        else:
            fill = eos_token_id if pad_token_id is None else pad_token_id
            cache, ids, masks = model.new_cache(), input_ids, [attention_mask]
            first = model(input_ids, attention_mask=attention_mask, cache=cache).logits[:, -1]

            def step(nxt: torch.Tensor) -> torch.Tensor:
                masks[0] = torch.cat([masks[0], masks[0].new_ones(B, 1)], dim=1)
                return model(nxt[:, None], attention_mask=masks[0], cache=cache).logits[:, -1]

        return _sample_loop(first, step, ids, max_new_tokens, temperature, top_k, top_p, eos_token_id, fill,
                            generator)
    finally:
        model.train(was_training)


def _sample_loop(logits: torch.Tensor, step: Callable[[torch.Tensor], torch.Tensor], ids: torch.Tensor,
                 max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None,
                 eos_token_id: int | None, fill: int | None, generator: torch.Generator | None) -> torch.Tensor:
    """Sample from next-token ``logits`` [B, V], append, and ask ``step`` for the next logits, up to
    ``max_new_tokens`` times or until every row has produced ``eos_token_id``. ids [B, T] -> [B, T + n]."""
    done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    for _ in range(max_new_tokens):
        nxt = sample_next(logits.float(), temperature, top_k, top_p, generator)
        if eos_token_id is not None:
            nxt = torch.where(done, torch.full_like(nxt, fill), nxt)
            done = done | (nxt == eos_token_id)
        ids = torch.cat([ids, nxt[:, None]], dim=1)
        if eos_token_id is not None and bool(done.all()):
            break
        logits = step(nxt)
    return ids
