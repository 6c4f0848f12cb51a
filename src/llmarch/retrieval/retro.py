"""RETRO (Borgeaud et al. 2022, sec. 2.4, Algorithm 1): a decoder whose layers listed in ``retrieval.cca_layers``
add chunked cross-attention (CCA) between self-attention and the FFN, attending to retrieved neighbours encoded by a
bidirectional stack that cross-attends to the decoder's chunk activations.

Glossary for this file: m chunk size, C chunks (C = T // m complete chunks), k neighbours per chunk, r neighbour
length (a retrieved chunk and its continuation). Neighbour ids are [B, C, k, r]; chunk u's neighbours were
retrieved with tokens [u·m, (u+1)·m).

Causality (the paper's shift by m - 1): token t attends the neighbours of chunk u = (t + 1) // m - 1, the last
chunk it has wholly seen; tokens t < m - 1 attend none. So changing chunk u's neighbours changes logits only from
position (u+1)·m - 1 on (the last token of chunk u, which predicts the first token of chunk u + 1).
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import Callable

import torch
import torch.nn.functional as F

from llmarch.config import ModelConfig
from llmarch.model import Model, ModelOutput, Stack, cross_attention_for
from llmarch.model_inputs import check_logits_to_keep
from llmarch.nn.cache import CrossMemory, KVCache
from llmarch.nn.cross_attention import CrossAttention

# encode(ids [B, C, k, r], mask [B, C, k, r] | None, chunks [B, C, m, D]) -> (E [B, C, k*r, D], padding | None)
Encode = Callable[[torch.Tensor, torch.Tensor | None, torch.Tensor],
                  tuple[torch.Tensor, torch.Tensor | None]]


class Neighbours:
    """The retrieval memory of one forward: neighbour ids [B, C', k, r] (C' >= the complete chunks; extra ones are
    unused) with an optional mask (1 = real token), and their encoding, computed once by the first CCA layer from
    that layer's chunk activations and shared by the later ones (Algorithm 1)."""

    def __init__(self, ids: torch.Tensor, mask: torch.Tensor | None, encode: Encode):
        self.ids, self.mask, self._encode = ids, mask, encode
        self._encoded: tuple[torch.Tensor, torch.Tensor | None] | None = None

    @property
    def k(self) -> int:
        return self.ids.shape[2]

    def encoded(self, chunks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """chunks [B, C, m, D] -> E [B, C, k*r, D] and its key padding [B, C, k*r] (bool, True = real) or None."""
        if self._encoded is None:
            C = chunks.shape[1]
            mask = None if self.mask is None else self.mask[:, :C]
            self._encoded = self._encode(self.ids[:, :C], mask, chunks)
        return self._encoded


class ChunkedCrossAttention(CrossAttention):
    """CCA: x [B, T, D] -> [B, T, D]. The attending span of chunk u is tokens [u·m + m - 1, (u+1)·m + m - 1) (the
    sequence shifted left by m - 1, padded at the end); its queries attend E_u, the k·r encoded neighbour tokens
    of chunk u. The first m - 1 tokens get 0. No neighbours (``ctx.memory`` None or k = 0): 0 everywhere, so the
    layer is exactly its block without retrieval. Positions inside the CCA are not modelled (the paper adds
    relative encodings there)."""

    def __init__(self, *args, chunk_size: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.chunk_size = chunk_size

    def after_init(self) -> None:
        """Zero the output projection after the model's init: a fresh RETRO computes exactly its base decoder and
        learns to use the neighbours from there (the gradient reaches ``out`` first, then q/kv)."""
        torch.nn.init.zeros_(self.out.weight)

    def forward(self, x: torch.Tensor, ctx, cache=None) -> torch.Tensor:
        memory: Neighbours | None = ctx.memory
        B, T, D = x.shape
        m = self.chunk_size
        C = T // m
        if memory is None or memory.k == 0 or C == 0:
            return torch.zeros_like(x)
        E, key_padding = memory.encoded(x[:, :C * m].reshape(B, C, m, D))  # [B, C, S, D], S = k*r
        S = E.shape[2]
        q = F.pad(x[:, m - 1:], (0, 0, 0, C * m - (T - m + 1)))  # [B, C*m, D]: chunk u's span at rows u*m..
        padding = None if key_padding is None else key_padding.reshape(B * C, S)
        seen = None if padding is None else padding.any(-1)  # [B*C]: chunks with at least one real key
        if seen is not None:
            padding = padding | ~seen[:, None]  # keep the softmax finite; the output is zeroed below
        keys = CrossMemory(E.reshape(B * C, S, D), padding)
        y = super().forward(q.reshape(B * C, m, D), SimpleNamespace(memory=keys), None)  # [B*C, m, D]
        if seen is not None:
            y = y * seen[:, None, None].to(y.dtype)
        y = y.reshape(B, C * m, D)[:, :T - m + 1]
        return torch.cat([x.new_zeros(B, m - 1, D), y], dim=1)


class RetroModel(Model):
    """A decoder Model with CCA in the layers of ``cfg.retrieval.cca_layers`` and a ``neighbour_encoder`` (a
    bidirectional stack of ``retrieval.encoder_layers`` blocks, each cross-attending to the chunk's decoder
    activations; it shares the token embedding). Without neighbours it is exactly its base decoder: the weights
    outside the CCA and the neighbour encoder load into ``build(cfg.replace(retrieval=None))``."""

    def __init__(self, cfg: ModelConfig):
        if cfg.retrieval is None:
            raise ValueError("retrieval: RetroModel needs a RetrievalConfig (e.g. llmarch.preset('retro-tiny'))")
        super().__init__(cfg)
        self.neighbour_encoder = Stack(cfg, causal=False, n_layers=cfg.retrieval.encoder_layers,
                                       cross_for=lambda i: cross_attention_for(cfg, i))

    def decoder_cross(self, cfg: ModelConfig):
        r = cfg.retrieval
        return lambda i: (cross_attention_for(cfg, i, ChunkedCrossAttention, chunk_size=r.chunk_size)
                          if i in r.cca_layers else None)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache: KVCache | None = None, use_cache: bool = False, *,
                neighbours: torch.Tensor | None = None, neighbour_mask: torch.Tensor | None = None,
                **kwargs) -> ModelOutput:
        """As :meth:`Model.forward`, plus ``neighbours`` [B, C', k, r] token ids for the C = T // m complete
        chunks of input_ids [B, T] (C' >= C) and an optional ``neighbour_mask`` like it. Chunks count from slot 0,
        so pad on the right. ``neighbours=None`` switches retrieval off (the base decoder; caches allowed)."""
        if neighbours is None:
            return super().forward(input_ids, attention_mask, position_ids, cache, use_cache, **kwargs)
        if cache is not None or use_cache:
            raise ValueError("cache: RETRO with neighbours runs whole sequences (the chunk alignment needs every "
                             "token); use llmarch.retrieval.retro_generate, or neighbours=None for the base decoder")
        check_logits_to_keep(kwargs.get("logits_to_keep", 0), self.lm_head)
        self.check_neighbours(input_ids, neighbours, neighbour_mask)
        memory = Neighbours(neighbours, neighbour_mask, self.encode_neighbours)
        h = self._run(self.decoder, input_ids, attention_mask, position_ids, kwargs.get("token_type_ids"), None,
                      memory)
        return self._output(h, None, logits_to_keep=kwargs.get("logits_to_keep", 0))

    def check_neighbours(self, input_ids: torch.Tensor, neighbours: torch.Tensor, mask: torch.Tensor | None) -> None:
        r = self.config.retrieval
        C = input_ids.shape[1] // r.chunk_size
        if neighbours.dim() != 4 or neighbours.shape[0] != input_ids.shape[0] or neighbours.shape[1] < C:
            raise ValueError(f"neighbours has shape {tuple(neighbours.shape)}; expected [batch {input_ids.shape[0]}, "
                             f"chunks >= {C} (= T // chunk_size), k, r]")
        if neighbours.dtype.is_floating_point:
            raise ValueError(f"neighbours must hold token ids; got dtype {neighbours.dtype}")
        if neighbours.shape[3] > self.config.max_seq_len:
            raise ValueError(f"neighbours: length r={neighbours.shape[3]} exceeds max_seq_len "
                             f"{self.config.max_seq_len}")
        if mask is not None and mask.shape != neighbours.shape:
            raise ValueError(f"neighbour_mask has shape {tuple(mask.shape)}; expected {tuple(neighbours.shape)}")

    def encode_neighbours(self, ids: torch.Tensor, mask: torch.Tensor | None,
                          chunks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """ids [B, C, k, r] + the decoder's chunk activations [B, C, m, D] -> E [B, C, k*r, D] (+ key padding).
        Each neighbour is encoded on its own, cross-attending to the m activations of the chunk that retrieved
        it."""
        B, C, k, r = ids.shape
        m, D = chunks.shape[2], chunks.shape[3]
        condition = chunks[:, :, None].expand(B, C, k, m, D).reshape(B * C * k, m, D)
        flat_mask = None if mask is None else mask.reshape(B * C * k, r)
        h = self._run(self.neighbour_encoder, ids.reshape(B * C * k, r), flat_mask, None, None, None,
                      CrossMemory(condition))  # [B*C*k, r, D]
        padding = None if mask is None else mask.reshape(B, C, k * r).bool()
        return h.reshape(B, C, k * r, D), padding


__all__ = ["ChunkedCrossAttention", "Neighbours", "RetroModel"]
