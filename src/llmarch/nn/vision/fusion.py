"""Image-text fusions (the ``vision.fusion`` value). Both project the tower's features into the text width D with
an MLP projector (LLaVA, Liu et al. 2023, sec. 4.1: Linear, activation, Linear); they differ in where the features
enter the decoder:

- ``projector``: the features replace the embeddings of the image tokens of the text (LLaVA);
- ``cross_attention``: decoder layers of ``vision.cross_layers`` add tanh-gated cross-attention to them, gates
  starting at zero so the fresh model is exactly its text model (Flamingo, Alayrac et al. 2022, sec. 2.2).
"""
from __future__ import annotations

import torch
from torch import nn

from llmarch.nn.activation import ACTIVATIONS
from llmarch.nn.cache import CrossMemory, EncoderDecoderCache, KVCache
from llmarch.nn.cross_attention import CrossAttention
from llmarch.registry import Registry


class Projector(nn.Module):
    """features [B, N, Dv] -> [B, N, D]: proj_out(act(proj_in(x)))."""

    def __init__(self, d_in: int, d_model: int, activation: str, bias: bool = True):
        super().__init__()
        self.activation = activation
        self.act = ACTIVATIONS[activation]
        self.proj_in = nn.Linear(d_in, d_model, bias=bias)
        self.proj_out = nn.Linear(d_model, d_model, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj_out(self.act(self.proj_in(x)))


class GatedCrossAttention(CrossAttention):
    """tanh(gate) * cross-attention(x, image features): x [B, T, D] -> [B, T, D]. ``gate`` is a scalar that
    starts at 0 (``after_init``), so the layer adds nothing until training opens it; with no image in the context
    (``ctx.memory`` None) the layer adds exactly 0."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.gate = nn.Parameter(torch.zeros(()))

    def after_init(self) -> None:
        nn.init.zeros_(self.gate)

    def forward(self, x: torch.Tensor, ctx, cache=None) -> torch.Tensor:
        if getattr(ctx, "memory", None) is None:  # no image (or a text-only static decode context)
            return torch.zeros_like(x)
        return torch.tanh(self.gate).to(x.dtype) * super().forward(x, ctx, cache)


FUSIONS: Registry[type["Fusion"]] = Registry("vision.fusion")


class Fusion:
    """Where projected image features [n_images, N, D] enter the decoder."""

    cache: type[KVCache] = KVCache
    per_row = False  # one image per row of input_ids (else images fill image-token slots)

    @staticmethod
    def check(v, model) -> None:
        """Fusion-specific config checks (``v`` the VisionConfig, ``model`` its ModelConfig)."""

    @staticmethod
    def enter(model, features, cache, attention_mask):
        """Before the decoder runs: (cache, the memory its layers read, attention_mask). By default the features
        are the memory (kept in an EncoderDecoderCache for later steps)."""
        return cache, memory_of(features, cache), attention_mask

    @staticmethod
    def feature_norm(cfg) -> nn.Module:
        """A norm on the projected features (identity by default)."""
        return nn.Identity()

    @staticmethod
    def cross_for(cfg):
        """Builder of the decoder's per-layer cross modules (None: none)."""
        return None

    @staticmethod
    def place(x: torch.Tensor, input_ids: torch.Tensor, memory, image_token_id: int | None) -> torch.Tensor:
        """The decoder input [B, T, D] with the features placed (identity by default)."""
        return x


@FUSIONS.register("projector")
class ProjectorFusion(Fusion):
    """Image token slots take the features, image after image in reading order (as transformers' LLaVA does)."""

    @staticmethod
    def place(x, input_ids, memory, image_token_id):
        slots = input_ids == image_token_id  # [B, T]
        if memory is None:
            return x
        feats = memory.states.reshape(-1, x.shape[-1])  # [n_images * N, D]
        n = int(slots.sum())
        if n != feats.shape[0]:
            raise ValueError(f"input_ids hold {n} image tokens (id {image_token_id}) but the images give "
                             f"{feats.shape[0]} features ({memory.states.shape[0]} images x {memory.states.shape[1]}"
                             "); put vision.image_tokens image tokens in the text per image")
        return x.masked_scatter(slots[..., None], feats.to(x.dtype))


@FUSIONS.register("cross_attention")
class CrossAttentionFusion(Fusion):
    """Gated cross-attention in ``vision.cross_layers``; the features stay outside the token stream (one image per
    row: features [B, N, D]) and their k/v are projected once into the cache."""

    cache = EncoderDecoderCache
    per_row = True

    @staticmethod
    def feature_norm(cfg) -> nn.Module:
        """The model's norm on the features: keys and values of unit scale whatever the projector's output scale
        (a token embedding is normed by the next block; cross-attention memory is not, as in T5's encoder
        output or Flamingo's resampler output)."""
        from llmarch.model import norm_for

        return norm_for(cfg)

    @staticmethod
    def cross_for(cfg):
        from llmarch.model import cross_attention_for

        layers = set(cfg.vision.cross_layers)
        return lambda i: cross_attention_for(cfg, i, GatedCrossAttention) if i in layers else None


def memory_of(features: torch.Tensor | None, cache) -> CrossMemory | None:
    """The image memory of one forward: new features (stored in an EncoderDecoderCache for later steps) or the
    ones a cache already holds."""
    if features is not None:
        memory = CrossMemory(features)
        if isinstance(cache, EncoderDecoderCache):
            cache.memory = memory
        return memory
    return getattr(cache, "memory", None)
