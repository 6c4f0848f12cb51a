"""Tiled image preprocessing (Llama 3.2 Vision; transformers' ``MllamaImageProcessor``) with Pillow + torch: each
image goes onto the canvas of tiles (rows x columns, at most ``max_image_tiles``) that needs the least upscaling
(or, if every canvas is smaller, the least downscaling; ties: the smallest area), is resized to fit it keeping its
aspect ratio (no side below one tile), zero-padded at the bottom and right, rescaled, normalised and cut into
tiles in row-major order. Rows of images are packed into [B, images, max_image_tiles, C, S, S] with their
aspect-ratio ids (1 + the canvas's index in :func:`~llmarch.nn.vision.tiles.aspect_ratios`, 0 = no image) and
tile masks; :func:`cross_attention_mask` gives which image tiles each text token sees."""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from llmarch.image_processing import ImageProcessor, checked_rgb, pixels
from llmarch.nn.vision.tiles import aspect_ratios


def best_canvas(height: int, width: int, max_tiles: int, tile: int) -> tuple[int, int]:
    """(rows, columns) of tiles for an image of ``height`` x ``width``."""
    shapes = aspect_ratios(max_tiles)
    scales = [min(r * tile / height, c * tile / width) for r, c in shapes]
    up = [s for s in scales if s >= 1]
    chosen = min(up) if up else max(scales)
    fits = [shape for shape, s in zip(shapes, scales) if s == chosen]
    return min(fits, key=lambda rc: rc[0] * rc[1])  # the first of the smallest area


def fit_to_canvas(height: int, width: int, canvas_h: int, canvas_w: int, tile: int) -> tuple[int, int]:
    """(height, width) after the resize: the aspect ratio kept, each side between one tile and the canvas."""
    target_w, target_h = min(max(width, tile), canvas_w), min(max(height, tile), canvas_h)
    scale_h, scale_w = target_h / height, target_w / width
    if scale_w < scale_h:
        return min(math.floor(height * scale_w) or 1, target_h), target_w
    return target_h, min(math.floor(width * scale_h) or 1, target_w)


@dataclass(frozen=True)
class TiledImageProcessor:
    """Rows of PIL images -> dict(pixel_values [B, images, tiles, C, S, S] float32, aspect_ratio_ids [B, images],
    aspect_ratio_mask [B, images, tiles], num_tiles) with S = ``size["height"]``."""

    size: dict = dataclasses.field(default_factory=lambda: {"height": 224, "width": 224})
    max_image_tiles: int = 4
    resample: int = 2  # PIL.Image.Resampling.BILINEAR
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    image_std: tuple[float, ...] = (0.5, 0.5, 0.5)
    do_convert_rgb: bool = True

    def __post_init__(self) -> None:
        if self.size.get("height") != self.size.get("width") or not self.size.get("height"):
            raise ValueError(f"size must be square tiles {{'height': S, 'width': S}}, got {self.size}")
        if self.max_image_tiles < 1:
            raise ValueError(f"max_image_tiles must be >= 1, got {self.max_image_tiles}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TiledImageProcessor":
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in d.items() if k in known and v is not None}
        for name in ("image_mean", "image_std"):
            if name in values:
                values[name] = tuple(values[name]) if isinstance(values[name], (list, tuple)) else (values[name],) * 3
        return cls(**values)

    @classmethod
    def from_file(cls, path: str | Path) -> "TiledImageProcessor":
        path = Path(path)
        return cls.from_dict(json.loads((path / "preprocessor_config.json" if path.is_dir() else path).read_text()))

    def scaler(self) -> ImageProcessor:
        return ImageProcessor(do_rescale=self.do_rescale, rescale_factor=self.rescale_factor,
                              do_normalize=self.do_normalize, image_mean=self.image_mean, image_std=self.image_std)

    def one(self, image) -> tuple[torch.Tensor, tuple[int, int]]:
        """A PIL image -> (tiles [rows * columns, C, S, S], (rows, columns))."""
        S = self.size["height"]
        image = checked_rgb(image, self.do_convert_rgb)
        rows, cols = best_canvas(image.height, image.width, self.max_image_tiles, S)
        x = pixels(image, fit_to_canvas(image.height, image.width, rows * S, cols * S, S), self.resample)
        x = torch.nn.functional.pad(x, (0, cols * S - x.shape[2], 0, rows * S - x.shape[1]))  # zeros, uint8
        x = self.scaler().scale(x)
        C = x.shape[0]
        tiles = x.view(C, rows, S, cols, S).permute(1, 3, 0, 2, 4).reshape(rows * cols, C, S, S)
        return tiles, (rows, cols)

    def __call__(self, images) -> dict[str, Any]:
        """A PIL image, a list (one row per image) or a list of rows (lists of images)."""
        rows = [[images]] if not isinstance(images, (list, tuple)) else \
            [list(r) if isinstance(r, (list, tuple)) else [r] for r in images]
        if not rows or any(not r for r in rows):
            raise ValueError("images: every row needs at least one image")
        done = [[self.one(im) for im in r] for r in rows]
        B, n, T, S = len(rows), max(len(r) for r in rows), self.max_image_tiles, self.size["height"]
        C = done[0][0][0].shape[1]
        out = torch.zeros(B, n, T, C, S, S)
        ids = torch.zeros(B, n, dtype=torch.long)
        mask = torch.zeros(B, n, T, dtype=torch.long)
        mask[:, :, 0] = 1
        shapes = aspect_ratios(T)
        for b, r in enumerate(done):
            for j, (tiles, shape) in enumerate(r):
                out[b, j, :len(tiles)] = tiles
                ids[b, j] = shapes.index(shape) + 1
                mask[b, j, :len(tiles)] = 1
        return dict(pixel_values=out, aspect_ratio_ids=ids, aspect_ratio_mask=mask,
                    num_tiles=[[len(t) for t, _ in r] for r in done])


def image_spans(ids: Sequence[int], image_token_id: int) -> list[tuple[int, int | None]]:
    """Per image token of ``ids``, the tokens [start, end) that see its image: up to the next image token, and a
    run of adjacent image tokens shares the span of the last of them (to the end of the row). A lone image token
    sees to the end of the batch (end None), as transformers' processor has it."""
    at = [i for i, t in enumerate(ids) if t == image_token_id]
    if len(at) == 1:
        return [(at[0], None)]
    spans = [[a, b] for a, b in zip(at, at[1:] + [len(ids)])]
    end = len(ids)
    for s in reversed(spans):
        if s[0] == s[1] - 1:
            s[1] = end
        end = s[1]
    return [(a, b) for a, b in spans]


def cross_attention_mask(rows: Sequence[Sequence[int]], image_token_id: int, num_tiles: Sequence[Sequence[int]],
                         max_tiles: int, length: int | None = None) -> torch.Tensor:
    """[B, length, images, max_tiles] long: 1 where a text token sees a tile of an image (its span, real tiles)."""
    length = max(len(r) for r in rows) if length is None else length
    spans = [image_spans(r, image_token_id) for r in rows]
    n = max([len(s) for s in spans] + [len(t) for t in num_tiles] + [1])
    out = torch.zeros(len(rows), length, n, max_tiles, dtype=torch.long)
    for b, (row_spans, tiles) in enumerate(zip(spans, num_tiles)):
        for j, ((start, end), k) in enumerate(zip(row_spans, tiles)):
            out[b, start:length if end is None else min(end, length), j, :k] = 1
    return out


__all__ = ["TiledImageProcessor", "best_canvas", "cross_attention_mask", "fit_to_canvas", "image_spans"]
