"""The ``joint`` fusion: cross-modal layers over the concatenation [image features; text] (the seed's multimodal
GPT-4 sketch; the single-stream fusion of VisualBERT, Li et al. 2019, and of decoder-only VLMs). The decoder
layers of ``vision.cross_layers`` run over one sequence whose first N positions are the projected image features:
image positions attend to every image position, text positions to every image position and causally to text; the
other layers see the text alone, and only text positions produce outputs (and a loss).

Because image positions never attend to text, the image stream through the scheduled layers depends on the image
alone: it runs once, as a prefix of the KV cache (slots 0..N-1 of the scheduled layers; text takes slots N...),
and the text forward is the text model's own, with its positions shifted by N. The same weights (attention and
FFN of the scheduled blocks) serve both modalities.
"""
from __future__ import annotations

import torch

from llmarch.nn.attention import AttnContext
from llmarch.nn.cache import KVCache
from llmarch.nn.vision.fusion import FUSIONS, Fusion, no_token_mask
from llmarch.validation import fail


def image_prefix(stack, z: torch.Tensor, cache: KVCache, layers) -> None:
    """Run image features z [B, N, D] through the blocks ``layers`` of ``stack`` (bidirectional among images,
    positions 0..N-1), leaving each layer's image k/v in ``cache`` slots 0..N-1; advance the cache by N."""
    B, N, _ = z.shape
    ids = torch.arange(N, device=z.device).expand(B, N)
    ctx = AttnContext(0, N, stack.positions, ids, None, causal=False, device=z.device)
    for i in sorted(layers):
        z = stack.layers[i](z, ctx, cache)
    cache.advance(N)


@FUSIONS.register("joint")
class JointFusion(Fusion):
    """Image features as a bidirectional prefix of the scheduled self-attention layers (one image per row)."""

    per_row = True

    @staticmethod
    def check(v, model) -> None:
        bad = [i for i in v.cross_layers if model.layer_mixer(i) != "attention"]
        if bad:
            fail("vision.cross_layers", f"joint fusion runs images through self-attention layers; layers {bad} "
                 "have another mixer (layer_mixers)")

    @staticmethod
    def enter(model, features, cache, attention_mask, cross_attention_mask, T):
        """New features fill the cache's image prefix (a private cache when the caller passed none); a mask over
        the text gains N leading ones for the image slots. Returns (cache, memory None, attention_mask)."""
        no_token_mask(cross_attention_mask)
        if features is not None:
            if cache is not None and cache.length:
                raise ValueError("pixel_values: images enter with the first call of a cache (the prefill); this "
                                 f"cache already holds {cache.length} slots")
            cache = KVCache() if cache is None else cache
            image_prefix(model.decoder, features, cache, model.config.vision.cross_layers)
            cache.image_slots = features.shape[1]
        n = getattr(cache, "image_slots", 0)
        if n and attention_mask is not None:
            attention_mask = torch.cat([attention_mask.new_ones(attention_mask.shape[0], n), attention_mask], dim=1)
        return cache, None, attention_mask


__all__ = ["JointFusion", "image_prefix"]
