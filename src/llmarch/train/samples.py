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


def sample_texts(checkpoint: Path, val_tokens: np.ndarray, tokenizer: Tokenizer, tc: TrainConfig,
                 temperature: float = 0.8, top_k: int = 40) -> list[tuple[str, str]]:
    """(prompt, continuation) pairs from the model saved in ``checkpoint`` (decoder models only)."""
    model = load_model(checkpoint).eval()
    if model.config.kind != "decoder":
        log.info("samples: skipped (generation samples are for decoder models; this is %s)", model.config.kind)
        return []
    gen = torch.Generator().manual_seed(tc.seed)
    out = []
    for prompt in document_openings(val_tokens, tokenizer.eos_id, tc.samples):
        ids = generate(model, torch.tensor([prompt]), max_new_tokens=tc.sample_tokens, temperature=temperature,
                       top_k=top_k, eos_token_id=tokenizer.eos_id, generator=gen)
        out.append((tokenizer.decode(prompt), tokenizer.decode(ids[0, len(prompt):].tolist(),
                                                               skip_special_tokens=True)))
    return out
