"""Frozen chunk embedders for the index: an encoder of this library (a BERT-style ``Model`` or a DPR context
encoder) maps chunk token ids [N, m] to one vector each, by mean pooling (RETRO's frozen BERT, Borgeaud et al.
2022, sec. 2.3) or by the first ([CLS]) position (DPR)."""
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


def embedder_for(index) -> EncoderEmbedder:
    """The frozen embedder an index was built with, when its encoder is stored in the index directory (as
    ``llmarch index build`` does): queries must be embedded exactly like the chunks."""
    from llmarch.checkpoint import load_model

    path = index.path / index.meta.get("encoder", "")
    if not index.meta.get("encoder") or not (path / "config.json").is_file():
        raise ValueError(f"{index.path}: the index does not store its encoder (meta.json encoder="
                         f"{index.meta.get('encoder')!r}); build it with `llmarch index build` or pass an embedder")
    return EncoderEmbedder(load_model(path), pool=index.meta.get("pool", "mean"))


__all__ = ["EncoderEmbedder", "POOLINGS", "embedder_for"]
