"""Sample generations at the end of a run: continue the openings of a few validation documents."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from llmarch.checkpoint import load_model
from llmarch.infer.generate import generate
from llmarch.tokenizer import Tokenizer
from llmarch.train.settings import TrainConfig

log = logging.getLogger(__name__)
PROMPT_TOKENS = 12


def document_openings(tokens: np.ndarray, eos_id: int | None, n: int, length: int = PROMPT_TOKENS) -> list[list[int]]:
    """The first ``length`` tokens of the first ``n`` documents of a flat, eos-separated token array."""
    head = np.asarray(tokens[: 200_000])
    starts = [0] + ([int(i) + 1 for i in np.flatnonzero(head == eos_id)] if eos_id is not None else [])
    out = []
    for s in starts:
        piece = head[s:s + length].tolist()
        if len(piece) == length and (eos_id is None or eos_id not in piece):
            out.append(piece)
        if len(out) == n:
            break
    return out


def span_after_sentinel(ids: list[int], sentinel_ids: list[int]) -> list[int]:
    """The first span of a span-corruption target ``<s_0> span_0 <s_1> ...``: the tokens up to the next sentinel."""
    sentinels = set(sentinel_ids)
    ids = ids[1:] if ids and ids[0] in sentinels else ids
    end = next((i for i, t in enumerate(ids) if t in sentinels), len(ids))
    return ids[:end]


def sample_texts(checkpoint: Path, val_tokens: np.ndarray, tokenizer: Tokenizer, tc: TrainConfig,
                 temperature: float = 0.8, top_k: int = 40) -> list[tuple[str, str]]:
    """(prompt, continuation) pairs from the model saved in ``checkpoint``.

    Decoders continue the opening of a validation document. Encoder-decoders read the opening followed by the first
    span sentinel (T5's way of asking "what comes here?") and write the span behind it. Encoders have no decoder
    to generate with: skipped, with the reason logged."""
    model = load_model(checkpoint).eval()
    kind = model.config.kind
    if kind == "encoder":
        log.info("samples: skipped (an encoder predicts masked tokens in place and has no decoder to generate "
                 "text with)")
        return []
    suffix = []
    if kind == "encoder_decoder":
        if not tokenizer.sentinel_ids:
            log.info("samples: skipped (the tokenizer has no span sentinel to prompt an encoder-decoder with)")
            return []
        suffix = [tokenizer.sentinel_ids[0]] + ([tokenizer.eos_id] if tokenizer.eos_id is not None else [])
    gen = torch.Generator().manual_seed(tc.seed)
    out = []
    for prompt in document_openings(val_tokens, tokenizer.eos_id, tc.samples):
        ids = generate(model, torch.tensor([prompt + suffix]), max_new_tokens=tc.sample_tokens,
                       temperature=temperature, top_k=top_k, eos_token_id=tokenizer.eos_id, generator=gen)
        new = ids[0, len(prompt):].tolist() if kind == "decoder" else span_after_sentinel(ids[0, 1:].tolist(),
                                                                                         tokenizer.sentinel_ids)
        out.append((tokenizer.decode(prompt), tokenizer.decode(new, skip_special_tokens=True)))
    return out
