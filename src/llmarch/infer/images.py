"""Prompts with images: the processor a model directory carries (``preprocessor_config.json``, or a plain resize
to the tower's image size; tiled towers: the tiling processor), the image tokens the fusion needs in the text
(LLaVA's projector: one run of N image tokens per image; gated cross-attention blocks: one image token per image;
here placed at the start of the prompt, after a BOS) and the other inputs the model reads (aspect-ratio ids and
masks, the per-token cross-attention mask)."""
from __future__ import annotations

from pathlib import Path

import torch

from llmarch.image_processing import ImageProcessor, load_image


def processor_for(model, path: str | Path | None = None):
    """The image processor of ``model``: ``path``/preprocessor_config.json when it exists, else a resize to the
    tower's image size with mean = std = 0.5 (what llmarch's own runs train with); tiled towers tile."""
    v = getattr(model.config, "vision", None)
    if v is None:
        raise ValueError("--image: this model reads text only (its config has no vision tower)")
    config = Path(path) / "preprocessor_config.json" if path is not None else None
    if v.positions == "gated_tiles":
        from llmarch.image_tiles import TiledImageProcessor

        if config is not None and config.is_file():
            return TiledImageProcessor.from_file(config)
        return TiledImageProcessor(size={"height": v.image_size, "width": v.image_size},
                                   max_image_tiles=v.max_num_tiles)
    if config is not None and config.is_file():
        return ImageProcessor.from_file(path)
    return ImageProcessor.for_size(v.image_size)


def with_image_tokens(ids: list[int], vision, n_images: int = 1, bos: int | None = None) -> list[int]:
    """``ids`` with the fusion's image tokens per image in front (after a leading BOS); unchanged for fusions
    that keep images out of the token stream (cross_attention)."""
    from llmarch.nn.vision import FUSIONS

    per_image = FUSIONS[vision.fusion].text_tokens(vision)
    if not per_image or n_images == 0:
        return ids
    lead = [ids[0]] if ids and bos is not None and ids[0] == bos else []
    return lead + [vision.image_token_id] * (per_image * n_images) + ids[len(lead):]


def encode_images(processor, images: list) -> dict:
    """PIL images of one prompt -> the processor's outputs: pixel_values [n, C, H, W], or for tiles
    pixel_values [1, n, tiles, C, S, S] with aspect_ratio_ids, aspect_ratio_mask and num_tiles."""
    out = processor([images]) if hasattr(processor, "max_image_tiles") else processor(images)
    return out if isinstance(out, dict) else {"pixel_values": out}


def model_inputs(model, ids: list[int], encoded: dict) -> dict:
    """The keyword inputs of ``llmarch.generate`` for a prompt ``ids`` (with its image tokens) and its encoded
    images: adds the cross-attention mask that tiled cross-attention blocks read."""
    inputs = {k: t for k, t in encoded.items() if k != "num_tiles"}
    v = model.config.vision
    if "num_tiles" in encoded and v.fusion == "cross_blocks":
        from llmarch.image_tiles import cross_attention_mask

        inputs["cross_attention_mask"] = cross_attention_mask([ids], v.image_token_id, encoded["num_tiles"],
                                                              v.max_num_tiles)
    return inputs


def image_prompt(model, ids: list[int], image_paths: list[str], processor,
                 bos: int | None = None) -> tuple[list[int], dict]:
    """(prompt ids with image tokens, the image inputs of ``llmarch.generate``: {} without images) for images
    read from files."""
    if not image_paths:
        return ids, {}
    encoded = encode_images(processor, [load_image(p) for p in image_paths])
    ids = with_image_tokens(ids, model.config.vision, len(image_paths), bos)
    return ids, model_inputs(model, ids, encoded)


__all__ = ["encode_images", "image_prompt", "model_inputs", "processor_for", "with_image_tokens"]
