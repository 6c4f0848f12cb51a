"""Autoregressive generation: prefill the prompt once, then one token per step, for a batch of left-padded rows
that stop independently. The step runs on a growing cache (``cache="dynamic"``) or a pre-allocated one
(``cache="static"``), which ``compile=True`` turns into one captured graph."""
from __future__ import annotations

import logging
from typing import Callable, Sequence

import torch

from llmarch.nn.position import position_limit
from llmarch.infer.decode import make_engine
from llmarch.infer.layout import prepare_for_decoding
from llmarch.infer.sampling import Sampling
from llmarch.infer.stopping import Stopper
from llmarch.model import check_input_ids

log = logging.getLogger(__name__)


def check_new_tokens(max_new_tokens) -> int:
    """max_new_tokens must be a positive integer (a bool, 2.5 or 0 is refused by name)."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    return max_new_tokens


def check_context(model, T: int, max_new_tokens: int) -> None:
    """The one context rule of every decode path (dynamic, static, speculative, early exit): a model with a
    learned position table holds at most ``max_seq_len`` positions, so prompt + max_new_tokens must fit in it
    (an encoder-decoder: the source, and the start token + max_new_tokens, each); RoPE, ALiBi, T5 buckets,
    sinusoids and NoPE represent any position and may run past ``max_seq_len`` (logged: beyond the length the
    model was trained on, quality usually drops)."""
    cfg = model.config
    limit = position_limit(model)
    seq2seq = cfg.kind == "encoder_decoder"
    need = max(T, 1 + max_new_tokens) if seq2seq else T + max_new_tokens
    what = (f"source ({T} tokens) or start token + max_new_tokens (1 + {max_new_tokens})" if seq2seq else
            f"prompt ({T} tokens) + max_new_tokens ({max_new_tokens}) = {need} positions")
    if limit is not None and need > limit:
        raise ValueError(f"max_new_tokens: the {what} exceed the model's learned position table "
                         f"(max_seq_len={limit}); a learned table has no positions past it, so shorten the prompt "
                         f"or lower max_new_tokens to {max(limit - (1 if seq2seq else T), 0)}")
    if need > cfg.max_seq_len:
        log.warning("generate: the %s run past max_seq_len=%d (the %s positions extrapolate; quality usually "
                    "drops past the trained length)", what, cfg.max_seq_len, cfg.position)


def check_prompt(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                 max_new_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate a prompt [B, T] (or [T]), its mask and the context it needs; returns both as [B, T]."""
    cfg = model.config
    if cfg.kind == "encoder":
        raise ValueError("generate: an encoder-only model has no decoder to generate with (kind='encoder')")
    if not isinstance(input_ids, torch.Tensor):
        raise ValueError(f"input_ids must be a tensor of token ids [batch, seq], got {type(input_ids).__name__}")
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    check_new_tokens(max_new_tokens)
    B, T = check_input_ids(input_ids, cfg.input_vocab_size)  # shape, dtype and range, for every cache kind
    if T == 0:
        raise ValueError("input_ids: the prompt is empty; give at least one token (e.g. a BOS id)")
    check_context(model, T, max_new_tokens)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if attention_mask.dim() == 1:
        attention_mask = attention_mask[None]
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected {tuple(input_ids.shape)}")
    return input_ids, attention_mask


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, max_new_tokens: int = 32, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, eos_token_id: int | None = None,
             attention_mask: torch.Tensor | None = None, pad_token_id: int | None = None,
             generator: torch.Generator | None = None, *, min_p: float | None = None,
             repetition_penalty: float = 1.0, seed: int | None = None,
             stop_sequences: Sequence[Sequence[int]] | None = None, stop_strings: Sequence[str] | None = None,
             decode: Callable[[list[int]], str] | None = None, cache: str = "dynamic", compile: bool = False,
             compile_mode: str | None = None, streamer: Callable[[torch.Tensor], None] | None = None,
             decoder_start_token_id: int | None = None, pixel_values: torch.Tensor | None = None,
             style: torch.Tensor | int | None = None, instruction: torch.Tensor | None = None,
             aspect_ratio_ids: torch.Tensor | None = None, aspect_ratio_mask: torch.Tensor | None = None,
             cross_attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Extend ``input_ids`` [B, T] (left-padded when rows differ in length; pass ``attention_mask``) by up to
    ``max_new_tokens``. Returns [B, T + n]. A finished row (eos, a stop sequence or stop string) is filled with
    ``pad_token_id`` (default: the eos id, else 0) until all rows finish. Greedy when ``temperature == 0``;
    ``seed`` makes sampling reproducible (or pass ``generator``). ``streamer(tokens [B])`` sees each step's
    tokens as they come. ``cache="static"`` pre-allocates T + max_new_tokens slots; ``compile=True`` compiles
    its one-token step.

    Encoder-decoders read ``input_ids`` (padded either side) with the encoder once and return the decoder's tokens
    [B, 1 + n], starting with ``decoder_start_token_id`` (default: the config's); finished rows are filled with
    ``pad_token_id`` (default: the config's pad id, else the eos id).

    Vision-language models take ``pixel_values`` [n_images, C, H, W]: the prefill reads them once (the image
    features enter the cache), the steps need only the new tokens; tiled towers also ``aspect_ratio_ids`` /
    ``aspect_ratio_mask``, and ``cross_blocks`` models a ``cross_attention_mask`` [B, T, images, tiles] for the
    prompt, whose last row each new token repeats. Conditioned models take ``style`` (ids [B] or one id) and/or
    ``instruction`` (token ids [B, S]; pad_token_id marks padding), their condition kept in the cache for the
    steps."""
    sampling = Sampling(temperature, top_k, top_p, min_p, repetition_penalty)
    input_ids, attention_mask = check_prompt(model, input_ids, attention_mask, max_new_tokens)
    B, T = input_ids.shape
    prepare_for_decoding(model, B * max_new_tokens)  # packed weights where they pay back, else column-major
    seq2seq = model.config.kind == "encoder_decoder"
    if generator is None and seed is not None:
        generator = torch.Generator(device=input_ids.device).manual_seed(seed)
    stopper = Stopper(B, eos_token_id, stop_sequences, stop_strings, decode, device=input_ids.device)
    fill = next((t for t in (pad_token_id, model.config.pad_token_id if seq2seq else None, eos_token_id, 0)
                 if t is not None))
    limit = position_limit(model)  # a learned table caps the slots; check_context made sure T + new fit
    slots = -(-(T + max_new_tokens) // 64) * 64  # rounded up: few compiled shapes
    slots = min(slots, limit) if limit is not None else slots
    engine = make_engine(model, cache, B, slots if cache == "static" else T + max_new_tokens, compile,
                         compile_mode, decoder_start_token_id,
                         {k: v for k, v in (("pixel_values", pixel_values), ("style", style),
                                            ("instruction", instruction), ("aspect_ratio_ids", aspect_ratio_ids),
                                            ("aspect_ratio_mask", aspect_ratio_mask),
                                            ("cross_attention_mask", cross_attention_mask)) if v is not None})
    return run_engine(model, engine, input_ids, attention_mask, max_new_tokens, sampling, stopper, fill,
                      generator, streamer)


@torch.no_grad()
def run_engine(model, engine, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, max_new_tokens: int,
               sampling: Sampling, stopper: Stopper, fill: int, generator: torch.Generator | None = None,
               streamer: Callable[[torch.Tensor], None] | None = None) -> torch.Tensor:
    """The sampling loop over any engine (``prefix``, ``prefill``, ``step``; see :mod:`llmarch.infer.decode`):
    sample, fill finished rows, stream, stop, step. Returns the engine's prefix followed by the new tokens."""
    was_training = model.training
    model.eval()
    try:
        logits = engine.prefill(input_ids, attention_mask)
        ids, mask, new = engine.prefix(input_ids, attention_mask)
        B = ids.shape[0]
        for i in range(max_new_tokens):
            history = torch.cat([ids] + [t[:, None] for t in new], 1) if sampling.repetition_penalty != 1 else None
            hist_mask = torch.cat([mask, mask.new_ones(B, len(new))], 1) if history is not None else None
            nxt = sampling.sample(logits, history, hist_mask, generator)
            nxt = torch.where(stopper.done, torch.full_like(nxt, fill), nxt)
            new.append(nxt)
            if streamer is not None:
                streamer(nxt)
            if stopper.active and stopper.update(nxt).all():
                break
            if i + 1 < max_new_tokens:
                logits = engine.step(nxt)
    finally:
        model.train(was_training)
    return torch.cat([ids] + [t[:, None] for t in new], dim=1)
