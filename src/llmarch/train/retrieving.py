"""Retrieval in the training loop (Borgeaud et al. 2022, sec. 2.4): every batch of a RETRO config retrieves the
neighbours of its input chunks from a :class:`~llmarch.retrieval.ChunkIndex` and hands them to the model.
``llmarch train --preset retro-tiny --index DIR``.

No own-text exclusion: the index is built by ``llmarch index build`` from its own token stream, whose offsets the
training stream (documents joined with eos, packed, shuffled) cannot name, so a sample may retrieve its own text
and continuation when the index holds the training corpus. Build the index from text disjoint from the training
split (or accept that leak); validation batches retrieve the same way."""
from __future__ import annotations

import logging

import torch

from llmarch.config import ModelConfig
from llmarch.tokenizer import Tokenizer
from llmarch.train.objectives import Batch, Objective

log = logging.getLogger(__name__)

BYTES = "bytes"  # meta.json "tokenizer" of an index over raw UTF-8 bytes


def index_tokenizer(tok: Tokenizer | None) -> dict:
    """What ``meta.json`` records about the tokens of an index: the tokenizer's content hash and size."""
    if tok is None:
        return {"tokenizer": BYTES, "vocab_size": 256}
    return {"tokenizer": tok.content_hash(), "vocab_size": tok.vocab_size}


def check_index_tokenizer(index, tok: Tokenizer) -> None:
    """Refuse an index whose chunk tokens come from another tokenizer than the model's."""
    have = index.meta.get("tokenizer")
    want = index_tokenizer(tok)
    if have is None:
        log.warning("%s: meta.json does not say which tokenizer made its chunks; assuming the model's (%s)",
                    index.path, want["tokenizer"])
        return
    if have != want["tokenizer"]:
        name = lambda t, v: "UTF-8 bytes (V=256)" if t == BYTES else f"tokenizer {t} (V={v})"
        raise ValueError(f"index {index.path}: its chunks are {name(have, index.meta.get('vocab_size'))} but the "
                         f"model reads {name(want['tokenizer'], want['vocab_size'])}; rebuild it with `llmarch "
                         "index build --tokenizer RUN/tokenizer.json`")


def load_index(path: str, cfg: ModelConfig, tok: Tokenizer):
    """(index, embedder) for a RETRO config, checked: chunk size and tokenizer match the model's."""
    from llmarch.retrieval import ChunkIndex, embedder_for

    if cfg.retrieval is None:
        raise ValueError(f"index: {path} was given but the model config has no retrieval sub-config; use a RETRO "
                         "preset (retro-tiny) or drop --index")
    index = ChunkIndex.load(path)
    if index.chunk_size != cfg.retrieval.chunk_size:
        raise ValueError(f"index: {path} has chunks of {index.chunk_size} tokens but retrieval.chunk_size is "
                         f"{cfg.retrieval.chunk_size}; rebuild with --chunk-size {cfg.retrieval.chunk_size} or "
                         f"--set retrieval.chunk_size={index.chunk_size}")
    check_index_tokenizer(index, tok)
    return index, embedder_for(index)


class Retrieving:
    """Wraps an objective: each batch gets ``neighbours`` [B, C, k, r] and ``neighbour_mask`` for its inputs."""

    def __init__(self, inner: Objective, index, embed, k: int, neighbour_len: int):
        self.inner, self.index, self.embed, self.k, self.r = inner, index, embed, k, neighbour_len

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def make_batch(self, chunk: torch.Tensor, generator: torch.Generator) -> Batch:
        from llmarch.retrieval import retrieve_neighbours

        batch = self.inner.make_batch(chunk, generator)
        nb, mask = retrieve_neighbours(self.index, self.embed, batch.inputs["input_ids"], self.k, self.r)
        batch.inputs.update(neighbours=nb, neighbour_mask=mask)
        return batch

    def loss_sums(self, out, batch: Batch) -> dict[str, torch.Tensor]:
        return self.inner.loss_sums(out, batch)


def with_retrieval(objective: Objective, tc, cfg: ModelConfig, tokenizer: Tokenizer):
    """``objective`` unchanged for plain configs; for a RETRO config with ``tc.index`` wrapped in
    :class:`Retrieving`; a RETRO config without an index trains with retrieval off (the base decoder path)."""
    r = cfg.retrieval
    if r is None and tc.index is None:
        return objective
    if tc.index is None:
        log.info("retrieval off: the config has a retrieval sub-config but no --index was given; the model "
                 "trains with zero neighbours (its base decoder path; the neighbour encoder and CCA get no "
                 "gradient)")
        return objective
    if objective.name != "causal_lm":
        raise ValueError(f"index: retrieval trains the causal_lm objective, not {objective.name!r}")
    index, embed = load_index(tc.index, cfg, tokenizer)
    log.info("retrieval on: %d chunks of %d tokens from %s, k=%d neighbours of %d tokens", len(index),
             index.chunk_size, tc.index, r.n_neighbours, r.neighbour_len)
    return Retrieving(objective, index, embed, r.n_neighbours, r.neighbour_len)


__all__ = ["Retrieving", "with_retrieval", "load_index", "check_index_tokenizer", "index_tokenizer"]
