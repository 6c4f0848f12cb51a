"""Image-text fusions (the ``vision.fusion`` value, one :class:`Fusion` protocol). All project the tower's
features into the text width D (``vision.projector``: LLaVA's MLP, Liu et al. 2023, sec. 4.1, or one Linear); they
differ in where the features enter the decoder:

- ``projector``: the features replace the embeddings of the image tokens of the text (LLaVA);
- ``cross_attention``: decoder layers of ``vision.cross_layers`` add tanh-gated cross-attention to them, gates
  starting at zero so the fresh model is exactly its text model (Flamingo, Alayrac et al. 2022, sec. 2.2);
- ``cross_blocks`` (``cross_blocks.py``): those layers are replaced by gated cross-attention blocks over tiles
  (Llama 3.2 Vision);
- ``joint`` (``joint.py``): those layers run over [image features; text].
"""
from __future__ import annotations

import torch
from torch import nn

from llmarch.nn.activation import ACTIVATIONS
from llmarch.nn.cache import CrossMemory, EncoderDecoderCache, KVCache
from llmarch.nn.cross_attention import CrossAttention
from llmarch.registry import Registry
from llmarch.validation import fail


PROJECTORS: Registry[type[nn.Module]] = Registry("vision.projector")


@PROJECTORS.register("mlp")
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


@PROJECTORS.register("linear")
class LinearProjector(nn.Module):
    """features [B, N, Dv] -> [B, N, D]: proj_in(x), one linear map (Llama 3.2 Vision)."""

    def __init__(self, d_in: int, d_model: int, activation: str, bias: bool = True):
        super().__init__()
        self.proj_in = nn.Linear(d_in, d_model, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj_in(x)


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
    """The protocol of a ``vision.fusion`` entry: where projected image features [n_images, N, D] enter the decoder.
    Every entry answers the same hooks (the defaults: features neither in the layers nor in the token stream).

    - ``cache`` the KV cache class of a generation; ``per_row`` one image (or one row of images) per text row,
      else images fill image-token slots; ``text_tokens(vision)`` image tokens a prompt holds per image;
    - at build time: ``check(vision, model)`` config checks, ``feature_norm(cfg)`` a norm on the projected
      features, ``cross_for(cfg)`` a cross module added to scheduled layers, ``block_for(cfg)`` a whole block
      replacing scheduled layers;
    - per forward: ``enter(...)`` turns new features (or a cache's) into what the layers read, ``place(...)`` puts
      features into the embedded tokens."""

    cache: type[KVCache] = KVCache
    per_row = False

    @staticmethod
    def check(v, model) -> None:
        """Fusion-specific config checks (``v`` the VisionConfig, ``model`` its ModelConfig)."""

    @staticmethod
    def feature_norm(cfg) -> nn.Module:
        """A norm on the projected features (identity by default)."""
        return nn.Identity()

    @staticmethod
    def cross_for(cfg):
        """Builder of the decoder's per-layer cross modules (None: none)."""
        return None

    @staticmethod
    def block_for(cfg):
        """Builder of decoder blocks that replace the plain ones on a schedule (None: none)."""
        return None

    @staticmethod
    def text_tokens(vision) -> int:
        """Image tokens a prompt holds per image (0: the image stays out of the token stream)."""
        return 0

    @staticmethod
    def enter(model, features, cache, attention_mask, cross_attention_mask, T: int):
        """Before the decoder runs on T new tokens: (cache, the memory its layers read, attention_mask). By
        default the features are the memory (kept in an EncoderDecoderCache for later steps); only fusions with
        a per-token image mask read ``cross_attention_mask``."""
        no_token_mask(cross_attention_mask)
        return cache, memory_of(features, cache), attention_mask

    @staticmethod
    def place(x: torch.Tensor, input_ids: torch.Tensor, memory, image_token_id: int | None) -> torch.Tensor:
        """The decoder input [B, T, D] with the features placed (identity by default)."""
        return x


def no_token_mask(cross_attention_mask) -> None:
    """Refuse a per-token image mask in a fusion that has none."""
    if cross_attention_mask is not None:
        raise ValueError("cross_attention_mask: only vision.fusion='cross_blocks' reads one")


@FUSIONS.register("projector")
class ProjectorFusion(Fusion):
    """Image token slots take the features, image after image in reading order (as transformers' LLaVA does)."""

    @staticmethod
    def text_tokens(vision) -> int:
        return vision.image_tokens

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
    def check(v, model) -> None:
        if model.norm_placement != "pre":
            fail("vision", "gated cross-attention is wired pre-norm; set norm_placement='pre'")

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


def memory_of(features: torch.Tensor | None, cache, make=CrossMemory) -> CrossMemory | None:
    """The image memory of one forward: new features (``make(features)``, stored in an EncoderDecoderCache for
    later steps) or the ones a cache already holds."""
    if features is not None:
        memory = make(features)
        if isinstance(cache, EncoderDecoderCache):
            cache.memory = memory
        return memory
    return getattr(cache, "memory", None)
