"""Prompts with images: the processor a model directory carries (``preprocessor_config.json``, or a plain resize
to the tower's image size), and the image tokens a projector fusion needs in the text (LLaVA: one run of N image
tokens per image, here placed at the start of the prompt, after a BOS)."""
from __future__ import annotations

from pathlib import Path

import torch

from llmarch.image_processing import ImageProcessor, load_image


def processor_for(model, path: str | Path | None = None) -> ImageProcessor:
    """The image processor of ``model``: ``path``/preprocessor_config.json when it exists, else a resize to the
    tower's image size with mean = std = 0.5 (what llmarch's own runs train with)."""
    v = getattr(model.config, "vision", None)
    if v is None:
        raise ValueError("--image: this model reads text only (its config has no vision tower)")
    if path is not None and (Path(path) / "preprocessor_config.json").is_file():
        return ImageProcessor.from_file(path)
    return ImageProcessor.for_size(v.image_size)


def with_image_tokens(ids: list[int], vision, n_images: int = 1, bos: int | None = None) -> list[int]:
    """``ids`` with ``vision.image_tokens`` image tokens per image in front (after a leading BOS); unchanged
    for fusions that keep images out of the token stream (cross-attention)."""
    if vision.fusion != "projector" or n_images == 0:
        return ids
    lead = [ids[0]] if ids and bos is not None and ids[0] == bos else []
    return lead + [vision.image_token_id] * (vision.image_tokens * n_images) + ids[len(lead):]


def image_prompt(model, ids: list[int], image_paths: list[str], processor: ImageProcessor,
                 bos: int | None = None) -> tuple[list[int], torch.Tensor | None]:
    """(prompt ids with image tokens, pixel_values [n, C, H, W] or None) for images read from files."""
    if not image_paths:
        return ids, None
    pixels = processor([load_image(p) for p in image_paths])
    return with_image_tokens(ids, model.config.vision, len(image_paths), bos), pixels


__all__ = ["image_prompt", "processor_for", "with_image_tokens"]
