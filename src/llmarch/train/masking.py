"""Corruptions for denoising objectives, as pure tensor functions of a seeded generator.

- :func:`mlm_mask`: BERT's masked LM with RoBERTa's dynamic masking (Liu et al. 2019): a fresh 15 % of the
  non-special tokens per batch; of those 80 % become the mask token, 10 % a random token, 10 % stay.
- :func:`nsp_pairs`: next-sentence pairs [cls] A [sep] B [sep] from packed chunks (Devlin et al. 2019).
- :func:`span_corrupt`: T5's span corruption (Raffel et al. 2020, sec. 3.1.4): 15 % of tokens in spans of mean
  length 3, each span replaced by one sentinel in the input; the target lists the sentinels with their spans.
"""
from __future__ import annotations

import torch

IGNORE = -100  # label of positions that carry no loss


def mlm_mask(ids: torch.Tensor, mask_id: int, special_ids: torch.Tensor, vocab_size: int,
             generator: torch.Generator, prob: float = 0.15,
             split: tuple[float, float] = (0.8, 0.1)) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [B, T] -> (corrupted ids [B, T], labels [B, T] with IGNORE where no prediction is asked).

    Special tokens are never selected and never drawn as random replacements."""
    is_special = torch.isin(ids, special_ids)
    selected = (torch.rand(ids.shape, generator=generator) < prob) & ~is_special
    u = torch.rand(ids.shape, generator=generator)
    to_mask = selected & (u < split[0])
    to_random = selected & (u >= split[0]) & (u < split[0] + split[1])
    allowed = torch.ones(vocab_size, dtype=torch.bool)
    allowed[special_ids] = False
    pool = allowed.nonzero().squeeze(1)
    random_tokens = pool[torch.randint(len(pool), ids.shape, generator=generator)]
    out = torch.where(to_mask, torch.full_like(ids, mask_id), ids)
    out = torch.where(to_random, random_tokens, out)
    labels = torch.where(selected, ids, torch.full_like(ids, IGNORE))
    return out, labels


def nsp_pairs(chunks: torch.Tensor, cls_id: int, sep_id: int,
              generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """chunks [B, T-3] -> (ids [B, T], token_type_ids [B, T], is_random_next [B]).

    Segment A is the first half of a chunk; segment B is its second half (label 0) or, with probability 1/2, the
    second half of another row's chunk (label 1)."""
    B, n = chunks.shape
    if B < 2:
        raise ValueError("next-sentence prediction needs a micro-batch of at least 2 sequences")
    half = n // 2
    a = chunks[:, :half]
    random_next = torch.rand(B, generator=generator) < 0.5
    other = (torch.arange(B) + 1 + torch.randint(B - 1, (B,), generator=generator)) % B  # never the row itself
    b = torch.where(random_next[:, None], chunks[other, half:], chunks[:, half:])
    col = lambda v: torch.full((B, 1), v, dtype=chunks.dtype)  # noqa: E731
    ids = torch.cat([col(cls_id), a, col(sep_id), b, col(sep_id)], dim=1)
    types = torch.cat([torch.zeros(B, half + 2, dtype=torch.long), torch.ones(B, n - half + 1, dtype=torch.long)], 1)
    return ids, types, random_next.long()


def _segments(n_items: int, n_segments: int, generator: torch.Generator) -> list[int]:
    """A random composition of ``n_items`` into ``n_segments`` positive lengths."""
    cuts = torch.randperm(n_items - 1, generator=generator)[:n_segments - 1].sort().values + 1
    edges = [0] + cuts.tolist() + [n_items]
    return [edges[i + 1] - edges[i] for i in range(n_segments)]


def span_plan(T: int, density: float = 0.15, mean_span: float = 3.0) -> tuple[int, int]:
    """(noise tokens, spans) for a sequence of T tokens: round(T * density) and round(noise / mean_span)."""
    n_noise = min(max(1, round(T * density)), T - 1)
    n_spans = max(1, min(round(n_noise / mean_span), T - n_noise))
    return n_noise, n_spans


def span_mask(T: int, generator: torch.Generator, density: float = 0.15, mean_span: float = 3.0) -> torch.Tensor:
    """A boolean noise mask [T] of alternating clean / noise runs starting with a clean run."""
    n_noise, n_spans = span_plan(T, density, mean_span)
    noise = _segments(n_noise, n_spans, generator)
    clean = _segments(T - n_noise, n_spans, generator)
    mask = torch.zeros(T, dtype=torch.bool)
    pos = 0
    for c, s in zip(clean, noise):
        pos += c
        mask[pos:pos + s] = True
        pos += s
    return mask


def span_corrupt(ids: torch.Tensor, sentinel_ids: list[int], eos_id: int, generator: torch.Generator,
                 density: float = 0.15, mean_span: float = 3.0) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [B, T] -> (inputs [B, T - noise + spans + 1], targets [B, noise + spans + 1]).

    inputs:  clean_0 <s_0> clean_1 <s_1> ... <s_{n-1}> eos; targets: <s_0> span_0 <s_1> span_1 ... span_{n-1} eos.
    Every row has the same noise and span counts, so rows have equal lengths and need no padding."""
    B, T = ids.shape
    _, n_spans = span_plan(T, density, mean_span)
    if n_spans > len(sentinel_ids):
        raise ValueError(f"span corruption of {T} tokens needs {n_spans} sentinel tokens but the tokenizer has "
                         f"{len(sentinel_ids)}; train the tokenizer with more sentinels or use a shorter --seq-len")
    inputs, targets = [], []
    for row in ids:
        noise = span_mask(T, generator, density, mean_span)
        starts = noise & ~torch.cat([torch.zeros(1, dtype=torch.bool), noise[:-1]])
        span_no = starts.long().cumsum(0) - 1  # index of the span each noise token belongs to
        sentinels = torch.tensor(sentinel_ids)[span_no.clamp(min=0)]
        keep_in = ~noise | starts  # a span's first token becomes its sentinel, the rest is dropped
        inp = torch.where(noise, sentinels, row)[keep_in]
        tgt = torch.stack([sentinels, row], 1)[noise]  # [noise, 2]: sentinel then token, per noise token
        keep_tgt = torch.stack([starts, torch.ones_like(starts)], 1)[noise]  # the sentinel only at a start
        inputs.append(torch.cat([inp, torch.tensor([eos_id])]))
        targets.append(torch.cat([tgt[keep_tgt], torch.tensor([eos_id])]))
    return torch.stack(inputs).to(ids.dtype), torch.stack(targets).to(ids.dtype)


def span_restore(inputs: torch.Tensor, targets: torch.Tensor, sentinel_ids: list[int]) -> list[int]:
    """Inverse of :func:`span_corrupt` for one row: put every sentinel's span back. [Tin], [Ttgt] -> ids."""
    spans: dict[int, list[int]] = {}
    current = None
    for t in targets.tolist()[:-1]:  # the final eos was added by corruption
        if t in sentinel_ids:
            current = t
            spans[current] = []
        elif current is not None:
            spans[current].append(t)
    out: list[int] = []
    for t in inputs.tolist()[:-1]:
        out.extend(spans[t] if t in spans else [t])
    return out


__all__ = ["IGNORE", "mlm_mask", "nsp_pairs", "span_corrupt", "span_restore", "span_mask", "span_plan"]
