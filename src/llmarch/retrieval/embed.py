"""Frozen chunk embedders for the index: an encoder of this library (a BERT-style ``Model`` or a DPR context
encoder) maps chunk token ids [N, m] to one vector each, by mean pooling (RETRO's frozen BERT, Borgeaud et al.
2022, sec. 2.3) or by the first ([CLS]) position (DPR); or, with no model at all, a hashed bag of token n-grams
(the lexical retriever of sparse IR, as a dense vector so that a faiss inner-product index can search it)."""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

POOLINGS = ("mean", "first")


class EncoderEmbedder:
    """Callable: ids [N, m] (numpy int) -> float32 [N, D], L2-normalised when ``normalize`` (so an inner-product
    index ranks by cosine). ``remap`` turns chunk ids into the encoder's ids when the vocabularies differ (e.g.
    detokenise + retokenise); by default the encoder reads the chunk ids as they are. The encoder is frozen: it
    runs in eval mode without gradients."""

    def __init__(self, model: torch.nn.Module, pool: str = "mean", normalize: bool = True,
                 remap: Callable[[np.ndarray], np.ndarray] | None = None, pad_id: int | None = None):
        if pool not in POOLINGS:
            raise ValueError(f"pool: {pool!r} is not allowed; choose one of {list(POOLINGS)}")
        self.model, self.pool, self.normalize, self.remap, self.pad_id = model.eval(), pool, normalize, remap, pad_id
        self.dim = model.config.d_model

    @torch.no_grad()
    def __call__(self, ids: np.ndarray) -> np.ndarray:
        ids = self.remap(ids) if self.remap is not None else ids
        x = torch.as_tensor(np.asarray(ids), dtype=torch.long)
        mask = torch.ones_like(x) if self.pad_id is None else (x != self.pad_id).long()
        h = self.model(x, attention_mask=mask).hidden_states  # [N, m, D]
        if self.pool == "first":
            v = h[:, 0]
        else:
            w = mask[..., None].to(h.dtype)
            v = (h * w).sum(1) / w.sum(1).clamp(min=1)
        if self.normalize:
            v = torch.nn.functional.normalize(v.float(), dim=-1)
        return v.float().numpy()


_HASH_MUL = np.uint64(0x9E3779B97F4A7C15)  # odd 64-bit constant (Fibonacci hashing) to mix token ids
_HASH_ADD = np.uint64(0xBF58476D1CE4E5B9)


class HashedNgramEmbedder:
    """Callable: ids [N, m] (numpy int) -> float32 [N, dim]: the counts of every token n-gram (n = 1..``max_n``)
    hashed into ``dim`` buckets, each n-gram order weighted by n (longer shared n-grams count more), then
    L2-normalised, so the inner product is the cosine of two bags of n-grams (Manning et al. 2008, ch. 6; feature
    hashing: Weinberger et al. 2009). Needs no training and is deterministic (a fixed integer hash, no seed), so
    near-duplicate chunks are each other's nearest neighbours. Tokens equal to ``pad_id`` are ignored when given."""

    kind = "ngram"

    def __init__(self, dim: int = 1024, max_n: int = 4, pad_id: int | None = None):
        for name, v in (("dim", dim), ("max_n", max_n)):
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name}: must be a positive integer, got {v!r}")
        self.dim, self.max_n, self.pad_id = dim, max_n, pad_id

    @property
    def meta(self) -> dict:
        """What an index records so that :func:`embedder_for` rebuilds this embedder."""
        return dict(embedder=self.kind, dim=self.dim, ngram_max_n=self.max_n, ngram_pad_id=self.pad_id)

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        N, m = ids.shape
        out = np.zeros((N, self.dim), dtype=np.float64)
        rows = np.arange(N)[:, None]
        valid = np.ones_like(ids, dtype=bool) if self.pad_id is None else ids != self.pad_id
        h = np.zeros((N, m), dtype=np.uint64)
        ok = valid  # n-grams made only of real tokens
        with np.errstate(over="ignore"):  # wrap-around uint64 arithmetic is the hash
            for n in range(1, min(self.max_n, m) + 1):
                L = m - n + 1
                h = (h[:, :L] + np.uint64(1)) * _HASH_MUL + ids[:, n - 1:].astype(np.uint64) + _HASH_ADD
                h ^= h >> np.uint64(29)
                ok = ok[:, :L] & valid[:, n - 1:]
                bucket = ((h * _HASH_MUL) >> np.uint64(32)) % np.uint64(self.dim)
                np.add.at(out, (np.broadcast_to(rows, bucket.shape)[ok], bucket[ok].astype(np.int64)), float(n))
        norm = np.linalg.norm(out, axis=1, keepdims=True)
        return (out / np.maximum(norm, 1e-12)).astype(np.float32)


def embedder_for(index) -> "EncoderEmbedder | HashedNgramEmbedder":
    """The frozen embedder an index was built with: a hashed n-gram embedder rebuilt from ``meta.json``, or the
    encoder stored in the index directory (as ``llmarch index build`` does): queries must be embedded exactly
    like the chunks."""
    from llmarch.checkpoint import load_model

    if index.meta.get("embedder") == HashedNgramEmbedder.kind:
        m = index.meta
        return HashedNgramEmbedder(m["dim"], m.get("ngram_max_n", 4), m.get("ngram_pad_id"))

    path = index.path / index.meta.get("encoder", "")
    if not index.meta.get("encoder") or not (path / "config.json").is_file():
        raise ValueError(f"{index.path}: the index does not store its encoder (meta.json encoder="
                         f"{index.meta.get('encoder')!r}); build it with `llmarch index build` or pass an embedder")
    return EncoderEmbedder(load_model(path), pool=index.meta.get("pool", "mean"))


__all__ = ["EncoderEmbedder", "HashedNgramEmbedder", "POOLINGS", "embedder_for"]
