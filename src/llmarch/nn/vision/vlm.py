"""A decoder that reads images: the text Model plus a vision tower (``vision``), the projector into the text width
(``projector``) and the fusion named by ``vision.fusion`` (LLaVA, Liu et al. 2023; gated cross-attention,
Alayrac et al. 2022; gated cross-attention blocks over tiles, Llama 3.2 Vision). Without pixel_values it is
exactly its text model."""
from __future__ import annotations

import torch
from torch import nn

from llmarch.config import ModelConfig
from llmarch.model import Model, ModelOutput
from llmarch.model_inputs import check_logits_to_keep
from llmarch.nn.cache import KVCache
from llmarch.nn.vision.fusion import FUSIONS, PROJECTORS
from llmarch.nn.vision.tower import VisionTower


class VisionLanguageModel(Model):
    """``model(input_ids, pixel_values=...)``: pixel_values [n_images, C, H, W] (projector fusion: one image per
    run of ``vision.image_tokens`` image tokens in input_ids, in reading order; cross_attention and joint: one
    image per row). Tiled towers take pixel_values [B, images, tiles, C, H, W] with aspect_ratio_ids [B, images] and
    aspect_ratio_mask [B, images, tiles]; ``cross_blocks`` also cross_attention_mask [B, T, images, tiles].
    Image features are computed once per call; a cached decode step needs no pixel_values."""

    def __init__(self, cfg: ModelConfig):
        if cfg.vision is None:
            raise ValueError("vision: VisionLanguageModel needs a VisionConfig (e.g. llmarch.preset('llava-tiny'))")
        self.fusion = FUSIONS[cfg.vision.fusion]
        super().__init__(cfg)
        v = cfg.vision
        self.vision = VisionTower(v)
        self.projector = PROJECTORS[v.projector](v.feature_dim, cfg.d_model, v.projector_activation,
                                                 v.projector_bias)
        self.feature_norm = self.fusion.feature_norm(cfg)
        if v.extra_token_rows:  # ids past the head's vocabulary (an image token) still embed
            self.embed.tokens = nn.Embedding(cfg.input_vocab_size, cfg.d_model)

    def decoder_cross(self, cfg: ModelConfig):
        return self.fusion.cross_for(cfg)

    def decoder_blocks(self, cfg: ModelConfig):
        return self.fusion.block_for(cfg)

    def new_cache(self) -> KVCache:
        return self.fusion.cache()

    def image_features(self, pixel_values: torch.Tensor, aspect_ratio_ids: torch.Tensor | None = None,
                       aspect_ratio_mask: torch.Tensor | None = None) -> torch.Tensor:
        """pixel_values [n_images, C, H, W] (tiled: [B, images, tiles, C, H, W]) -> projected features
        [n_images, N, D] (tiled: [B, images x tiles x N, D], each row's images in order)."""
        dtype = self.projector.proj_in.weight.dtype
        if pixel_values.dim() == 6:
            B, n = pixel_values.shape[:2]
            if aspect_ratio_mask is not None:
                aspect_ratio_mask = aspect_ratio_mask.reshape(B * n, -1)
            feats = self.vision.features(pixel_values.flatten(0, 1).to(dtype), aspect_ratio_ids, aspect_ratio_mask)
            return self.feature_norm(self.projector(feats)).reshape(B, -1, self.config.d_model)
        feats = self.vision.features(pixel_values.to(dtype), aspect_ratio_ids, aspect_ratio_mask)
        return self.feature_norm(self.projector(feats))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache: KVCache | None = None, use_cache: bool = False, *,
                pixel_values: torch.Tensor | None = None, token_type_ids: torch.Tensor | None = None,
                aspect_ratio_ids: torch.Tensor | None = None, aspect_ratio_mask: torch.Tensor | None = None,
                cross_attention_mask: torch.Tensor | None = None, **kwargs) -> ModelOutput:
        """As :meth:`Model.forward`, plus ``pixel_values`` (and for tiled towers ``aspect_ratio_ids`` /
        ``aspect_ratio_mask``; for ``cross_blocks`` a ``cross_attention_mask``)."""
        if kwargs.get("decoder_input_ids") is not None:
            raise ValueError("decoder_input_ids: a vision-language decoder takes input_ids and pixel_values")
        check_logits_to_keep(kwargs.get("logits_to_keep", 0), self.lm_head)
        features = None
        if pixel_values is not None:
            features = self.image_features(pixel_values, aspect_ratio_ids, aspect_ratio_mask)
            if self.fusion.per_row and features.shape[0] != input_ids.shape[0]:
                raise ValueError(f"pixel_values: {features.shape[0]} images for {input_ids.shape[0]} rows; "
                                 f"fusion {self.config.vision.fusion!r} takes one image per row")
        if cache is None and use_cache:
            cache = self.new_cache()
        private = cache is None  # a fusion may need a cache of its own for this call (joint: the image prefix)
        cache, memory, attention_mask = self.fusion.enter(self, features, cache, attention_mask,
                                                          cross_attention_mask, input_ids.shape[1])
        if features is None and memory is None and not self.fusion.per_row:
            self.check_no_image_tokens(input_ids, cache)
        h = self._run(self.decoder, input_ids, attention_mask, position_ids, token_type_ids, cache, memory,
                      kwargs.get("global_attention_mask"))
        return self._output(h, None if private else cache, logits_to_keep=kwargs.get("logits_to_keep", 0))

    def check_no_image_tokens(self, input_ids: torch.Tensor, cache: KVCache | None) -> None:
        if cache is None or cache.length == 0:
            if bool((input_ids == self.config.vision.image_token_id).any()):
                raise ValueError("pixel_values: input_ids hold image tokens but no image was given")

    def embed_inputs(self, input_ids, positions, position_ids, token_type_ids, memory) -> torch.Tensor:
        x = super().embed_inputs(input_ids, positions, position_ids, token_type_ids, memory)
        return self.fusion.place(x, input_ids, memory, self.config.vision.image_token_id)


__all__ = ["VisionLanguageModel"]
