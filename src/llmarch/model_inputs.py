"""The inputs of a forward pass, checked and turned into what the stacks read: token ids and token types
(validated against the vocabulary), the padding mask as key padding, positions that skip left padding, packed
documents (segment ids and per-document positions), global-token masks, and how many positions the head scores."""
from __future__ import annotations

import torch

from llmarch.nn.device import assert_on_device, host_reads_ok

def position_ids_from_mask(attention_mask: torch.Tensor, T: int) -> torch.Tensor:
    """Positions that skip left padding: cumsum(mask) - 1 over the whole (cached + new) mask, last T kept.
    [B, S_total] -> [B, T]."""
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.clamp(min=0)[:, -T:]


def check_documents(document_ids: torch.Tensor, shape: tuple[int, int], cache) -> torch.Tensor:
    if cache is not None:
        raise ValueError("document_ids: packed documents are for whole-sequence forwards (training, scoring); "
                         "decode each document with its own cache")
    if tuple(document_ids.shape) != shape:
        raise ValueError(f"document_ids has shape {tuple(document_ids.shape)}; expected {shape} like input_ids")
    return document_ids


def document_positions(document_ids: torch.Tensor) -> torch.Tensor:
    """Positions that restart at 0 wherever the document id changes along a row. [B, T] -> [B, T] long."""
    B, T = document_ids.shape
    idx = torch.arange(T, device=document_ids.device).expand(B, T)
    starts = torch.ones_like(document_ids, dtype=torch.bool)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    return idx - torch.where(starts, idx, torch.zeros_like(idx)).cummax(-1).values


def _global_mask(global_attention_mask: torch.Tensor | None, shape: tuple[int, int]) -> torch.Tensor | None:
    """[B, S_total] bool (True = global token) for patterns with global attention, or None."""
    if global_attention_mask is None:
        return None
    if tuple(global_attention_mask.shape) != shape:
        raise ValueError(f"global_attention_mask has shape {tuple(global_attention_mask.shape)}; expected {shape} "
                         "= (batch, cached + new tokens)")
    return global_attention_mask.bool()


def _key_padding(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """[B, S] bool (True = real token), or None when nothing is padded."""
    if attention_mask is None:
        return None
    key_padding = attention_mask.bool()
    if not host_reads_ok(key_padding):  # keep the mask rather than read it back: same result, no host sync
        return key_padding
    return None if bool(key_padding.all()) else key_padding


def check_token_types(token_type_ids: torch.Tensor, shape: tuple[int, int], type_vocab_size: int) -> None:
    if type_vocab_size == 0:
        raise ValueError("token_type_ids: this model has no token-type embeddings (type_vocab_size=0)")
    if tuple(token_type_ids.shape) != shape:
        raise ValueError(f"token_type_ids has shape {tuple(token_type_ids.shape)}; expected {shape} like input_ids")
    if token_type_ids.numel() and token_type_ids.device.type != "meta":
        lo, hi = int(token_type_ids.min()), int(token_type_ids.max())
        if lo < 0 or hi >= type_vocab_size:
            raise ValueError(f"token_type_ids: type {hi if hi >= type_vocab_size else lo} is outside "
                             f"[0, {type_vocab_size}) (type_vocab_size)")


def check_input_ids(input_ids: torch.Tensor, vocab_size: int) -> tuple[int, int]:
    """Validate token ids [B, T]: integer dtype and inside the vocabulary."""
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, seq]; got shape {tuple(input_ids.shape)}")
    if input_ids.dtype not in (torch.long, torch.int, torch.int16, torch.uint8):
        raise ValueError(f"input_ids must hold integer token ids; got dtype {input_ids.dtype}")
    # the range check reads two numbers back: on the CPU only (skipped while torch.compile traces, a graph break);
    # an accelerator asserts on the device instead, so the forward never waits for the launch queue to drain
    if input_ids.numel() and host_reads_ok(input_ids):
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= vocab_size:
            raise ValueError(f"input_ids: token id {hi if hi >= vocab_size else lo} is outside the vocabulary "
                             f"[0, {vocab_size}); check the tokenizer matches the model")
    elif input_ids.numel():
        assert_on_device(((input_ids >= 0) & (input_ids < vocab_size)).all(),
                         f"input_ids: a token id is outside the vocabulary [0, {vocab_size}); check the tokenizer")
    return input_ids.shape[0], input_ids.shape[1]


def check_logits_to_keep(n, head) -> None:
    """logits_to_keep: a non-negative int; 0 only for a head that reads other positions than those it scores."""
    if n == 0 and not isinstance(n, bool):
        return
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"logits_to_keep must be a non-negative int (0: every position), got {n!r}")
    if not getattr(head, "per_position", True):
        raise ValueError(f"logits_to_keep: the {type(head).__name__} reads positions other than those it scores "
                         "(a pooled first token, the last real token); pass 0")
