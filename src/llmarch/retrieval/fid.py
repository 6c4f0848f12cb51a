"""Fusion-in-Decoder (Izacard & Grave 2021): an encoder-decoder (T5) encodes each (question + passage) on its own;
the decoder cross-attends to all the encoded passages at once, concatenated along the key axis. The encoder cost
grows linearly in the number of passages N, and the evidence is fused only in the decoder.

Shapes: N passages of T tokens per example, inputs [B, N, T]; the fused memory is [B, N*T, D]."""
from __future__ import annotations

from typing import Sequence

import torch

from llmarch.infer.decode import Seq2SeqEngine
from llmarch.infer.generate import run_engine
from llmarch.infer.sampling import Sampling
from llmarch.infer.stopping import Stopper
from llmarch.model import Model, ModelOutput
from llmarch.nn.cache import CrossMemory


def fid_inputs(question: Sequence[int], passages: Sequence[Sequence[int]], max_len: int, pad_id: int,
               sep: Sequence[int] = ()) -> tuple[torch.Tensor, torch.Tensor]:
    """One example's encoder rows: question + ``sep`` + passage for each passage, truncated to ``max_len`` and
    right-padded with ``pad_id``. Returns ids [N, T] and mask [N, T] (T = the longest row)."""
    rows = [(list(question) + list(sep) + list(p))[:max_len] for p in passages]
    if not rows:
        raise ValueError("passages: FiD needs at least one passage")
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, :len(r)] = 1
    return ids, mask


def fid_encode(model: Model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> CrossMemory:
    """Encode every passage independently and fuse: ids [B, N, T] (+ mask) -> memory states [B, N*T, D] with the
    passages' padding as key padding."""
    if model.config.kind != "encoder_decoder":
        raise ValueError(f"FiD needs an encoder-decoder model (kind is {model.config.kind!r}); e.g. fid-base")
    if input_ids.dim() != 3:
        raise ValueError(f"input_ids must be [batch, passages, seq]; got shape {tuple(input_ids.shape)}")
    B, N, T = input_ids.shape
    flat_mask = None if attention_mask is None else attention_mask.reshape(B * N, T)
    memory = model.encode(input_ids.reshape(B * N, T), flat_mask)  # each passage alone: [B*N, T, D]
    states = memory.states.reshape(B, N * T, -1)
    key_padding = None if memory.key_padding is None else memory.key_padding.reshape(B, N * T)
    return CrossMemory(states, key_padding)


def fid_forward(model: Model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                decoder_input_ids: torch.Tensor) -> ModelOutput:
    """Decoder logits [B, T', V] for decoder_input_ids [B, T'] given passages input_ids [B, N, T]."""
    return model.decode(decoder_input_ids, fid_encode(model, input_ids, attention_mask))


@torch.no_grad()
def fid_generate(model: Model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 max_new_tokens: int = 32, temperature: float = 0.0, top_k: int | None = None,
                 top_p: float | None = None, eos_token_id: int | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Answer tokens [B, 1 + n] (starting with the decoder start token) from passages [B, N, T]; the fused memory
    is encoded once and its cross-attention keys/values are cached."""
    cfg = model.config
    engine = Seq2SeqEngine(model, None, encode=lambda ids, mask: fid_encode(model, ids, mask))
    stopper = Stopper(input_ids.shape[0], eos_token_id, device=input_ids.device)
    fill = next(t for t in (cfg.pad_token_id, eos_token_id, 0) if t is not None)
    return run_engine(model, engine, input_ids, attention_mask, max_new_tokens, Sampling(temperature, top_k, top_p),
                      stopper, fill, generator)


__all__ = ["fid_encode", "fid_forward", "fid_generate", "fid_inputs"]
