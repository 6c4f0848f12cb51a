"""Retrieval in the loop (Borgeaud et al. 2022, sec. 2.3-2.4): neighbours for a batch of token sequences from a
:class:`~llmarch.retrieval.index.ChunkIndex` (training batches and evaluation), and RETRO generation that
retrieves once for every chunk it completes."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from llmarch.infer.generate import _sample_loop
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
    state = dict(ids=input_ids)
    state["nb"], state["mask"] = retrieve_neighbours(index, embed, input_ids, k, r.neighbour_len)

    def logits() -> torch.Tensor:
        out = model(state["ids"], neighbours=state["nb"], neighbour_mask=state["mask"])
        return out.logits[:, -1]

    def step(nxt: torch.Tensor) -> torch.Tensor:
        ids = state["ids"] = torch.cat([state["ids"], nxt[:, None]], dim=1)
        if ids.shape[1] % r.chunk_size == 0:  # a chunk just completed: retrieve its neighbours
            nb, mask = retrieve_neighbours(index, embed, ids[:, -r.chunk_size:], k, r.neighbour_len)
            state["nb"] = torch.cat([state["nb"], nb], dim=1)
            state["mask"] = torch.cat([state["mask"], mask], dim=1)
        return logits()

    was_training = model.training
    model.eval()
    try:
        fill = eos_token_id if model.config.pad_token_id is None else model.config.pad_token_id
        return _sample_loop(logits(), step, input_ids, max_new_tokens, temperature, top_k, top_p, eos_token_id,
                            fill, generator)
    finally:
        model.train(was_training)


__all__ = ["own_text_exclusion", "retrieve_neighbours", "retro_generate"]
