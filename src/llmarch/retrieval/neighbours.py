"""Retrieval in the loop (Borgeaud et al. 2022, sec. 2.3-2.4): neighbours for a batch of token sequences from a
:class:`~llmarch.retrieval.index.ChunkIndex` (training batches and evaluation), and RETRO generation that
retrieves once for every chunk it completes."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from llmarch.infer.decode import prompt_prefix
from llmarch.infer.generate import run_engine
from llmarch.infer.sampling import Sampling
from llmarch.infer.stopping import Stopper
from llmarch.retrieval.index import ChunkIndex, Embed


def own_text_exclusion(starts: Sequence[int], T: int, chunk_size: int) -> np.ndarray:
    """For sequences cut from the indexed stream at token offsets ``starts`` (length T each): per query chunk, the
    chunk-id range [lo, hi) whose chunk or continuation overlaps the sequence itself, so training never retrieves
    its own (future) text. Returns [B * (T // m), 2] in the row order of :func:`retrieve_neighbours`."""
    m, C = chunk_size, T // chunk_size
    rows = [(s // m - 1, -(-(s + T) // m)) for s in starts]  # neighbour j spans tokens [j*m, (j+2)*m)
    return np.repeat(np.array(rows, dtype=np.int64).reshape(-1, 2), C, axis=0)


def retrieve_neighbours(index: ChunkIndex, embed: Embed, tokens: torch.Tensor, k: int,
                        neighbour_len: int | None = None,
                        exclude: np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Neighbours of every complete chunk of tokens [B, T]: ids [B, C, k, r] and mask [B, C, k, r] (0 where fewer
    than k chunks were found), C = T // m, r = ``neighbour_len`` (default 2m: the chunk and its continuation)."""
    m = index.chunk_size
    r = neighbour_len or 2 * m
    if r > 2 * m:
        raise ValueError(f"neighbour_len: {r} is longer than a chunk and its continuation (2 x {m}) in the index")
    B, T = tokens.shape
    C = T // m
    if C == 0 or k == 0:
        empty = torch.zeros(B, C, k, r, dtype=torch.long, device=tokens.device)
        return empty, empty.clone()
    chunks = tokens[:, :C * m].reshape(B * C, m).cpu().numpy()
    ids, _ = index.search(embed(chunks), k, exclude)  # [B*C, k]
    nb = index.neighbours(ids)[..., :r]  # [B*C, k, r]
    mask = np.broadcast_to((ids >= 0)[..., None], nb.shape)
    as_tensor = lambda a: torch.from_numpy(np.ascontiguousarray(a)).long().view(B, C, k, r).to(tokens.device)
    return as_tensor(nb), as_tensor(mask)


@torch.no_grad()
def retro_generate(model, input_ids: torch.Tensor, index: ChunkIndex, embed: Embed, max_new_tokens: int = 32,
                   temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                   eos_token_id: int | None = None, generator: torch.Generator | None = None,
                   n_neighbours: int | None = None) -> torch.Tensor:
    """Extend input_ids [B, T] (unpadded) by up to ``max_new_tokens`` with a RETRO model, retrieving the neighbours
    of each chunk as soon as it is complete. Each step runs the whole sequence (no KV cache): the chunk alignment
    of the CCA needs every position. Returns [B, T + n]."""
    r = model.config.retrieval
    if r is None:
        raise ValueError("retrieval: the model has no RetrievalConfig; use llmarch.generate for plain decoders")
    if index.chunk_size != r.chunk_size:
        raise ValueError(f"index chunk_size {index.chunk_size} != retrieval.chunk_size {r.chunk_size}: build the "
                         "index with the model's chunk size")
    if input_ids.shape[1] + max_new_tokens > model.config.max_seq_len:
        raise ValueError(f"max_new_tokens: {input_ids.shape[1]} prompt + {max_new_tokens} new tokens exceed "
                         f"max_seq_len={model.config.max_seq_len}")
    k = r.n_neighbours if n_neighbours is None else n_neighbours
    engine = RetroEngine(model, index, embed, k)
    stopper = Stopper(input_ids.shape[0], eos_token_id, device=input_ids.device)
    fill = next(t for t in (model.config.pad_token_id, eos_token_id, 0) if t is not None)
    return run_engine(model, engine, input_ids, None, max_new_tokens, Sampling(temperature, top_k, top_p), stopper,
                      fill, generator)


class RetroEngine:
    """Decode engine (see :mod:`llmarch.infer.decode`) that re-runs the whole sequence each step and retrieves the
    neighbours of every chunk as soon as it is complete."""

    prefix = staticmethod(prompt_prefix)

    def __init__(self, model, index: ChunkIndex, embed: Embed, n_neighbours: int):
        self.model, self.index, self.embed, self.k = model, index, embed, n_neighbours
        self.r = model.config.retrieval

    def _retrieve(self, tokens: torch.Tensor):
        return retrieve_neighbours(self.index, self.embed, tokens, self.k, self.r.neighbour_len)

    def _logits(self) -> torch.Tensor:
        return self.model(self.ids, neighbours=self.nb, neighbour_mask=self.mask,
                          logits_to_keep=1).logits[:, -1].float()

    def prefill(self, input_ids: torch.Tensor, attention_mask=None) -> torch.Tensor:
        self.ids = input_ids
        self.nb, self.mask = self._retrieve(input_ids)
        return self._logits()

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        self.ids = torch.cat([self.ids, tokens[:, None]], dim=1)
        if self.ids.shape[1] % self.r.chunk_size == 0:  # a chunk just completed: retrieve its neighbours
            nb, mask = self._retrieve(self.ids[:, -self.r.chunk_size:])
            self.nb, self.mask = torch.cat([self.nb, nb], dim=1), torch.cat([self.mask, mask], dim=1)
        return self._logits()


__all__ = ["own_text_exclusion", "retrieve_neighbours", "retro_generate"]
