"""Tiled preprocessing equals transformers' MllamaImageProcessorPil (canvas choice, resize, padding, tiles,
aspect-ratio ids and masks) for Pillow-drawn images, read from the preprocessor_config.json it saves; and the
cross-attention mask equals MllamaProcessor's for prompts with one, several and adjacent image tokens."""
import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from llmarch.image_tiles import TiledImageProcessor, best_canvas, cross_attention_mask

TOL = 1e-6  # the same float32 operations in the same order


def drawn(width: int, height: int, seed: int) -> Image.Image:
    g = np.random.default_rng(seed)
    im = Image.new("RGB", (width, height), tuple(int(v) for v in g.integers(0, 256, 3)))
    d = ImageDraw.Draw(im)
    for _ in range(4):
        x0, y0 = int(g.integers(0, width)), int(g.integers(0, height))
        d.ellipse((x0, y0, x0 + width // 3, y0 + height // 3), fill=tuple(int(v) for v in g.integers(0, 256, 3)))
    return im


def test_pixel_values_ids_and_masks_equal_transformers(tmp_path):
    import transformers

    theirs = transformers.MllamaImageProcessorPil(size={"height": 28, "width": 28}, max_image_tiles=4,
                                                  image_mean=[0.48, 0.45, 0.4], image_std=[0.26, 0.26, 0.27])
    theirs.save_pretrained(tmp_path)
    ours = TiledImageProcessor.from_file(tmp_path)
    rgba = drawn(20, 20, 4).convert("RGBA")
    rows = [[drawn(90, 30, 0), drawn(17, 40, 1)], [drawn(28, 28, 2)], [drawn(50, 61, 3), rgba, drawn(3, 200, 5)]]
    want = theirs(rows, return_tensors="pt")
    got = ours(rows)
    for key in ("aspect_ratio_ids", "aspect_ratio_mask"):
        assert torch.equal(got[key], want[key]), key
    assert got["num_tiles"] == want["num_tiles"]
    assert got["pixel_values"].shape == want["pixel_values"].shape
    assert (got["pixel_values"] - want["pixel_values"]).abs().max() <= TOL
    assert {len(set(r)) for r in got["num_tiles"]} != {1}  # the batch mixes tile counts


def test_canvas_equals_transformers_over_many_shapes():
    from transformers.models.mllama.image_processing_pil_mllama import get_optimal_tiled_canvas

    g = np.random.default_rng(0)
    shapes = [(30, 90), (10, 10), (500, 500), (28, 56), (56, 28)] + [tuple(g.integers(1, 300, 2)) for _ in range(200)]
    for h, w in shapes:
        for tiles in (1, 2, 4, 6):
            rows, cols = best_canvas(int(h), int(w), tiles, 28)
            assert (rows * 28, cols * 28) == tuple(get_optimal_tiled_canvas(int(h), int(w), tiles, 28))
    assert best_canvas(30, 90, 4, 28) == (1, 3)  # equal scale for 1x3 and 1x4: the smaller canvas


def test_cross_attention_mask_equals_the_processor():
    from transformers.models.mllama.processing_mllama import (convert_sparse_cross_attention_mask_to_dense,
                                                              get_cross_attention_token_mask)

    I = 99
    rows = [[1, I, 5, 6, I, 7, 8], [1, 2, I, I, 3, 4, 5, 6], [1, I, 2, 3]]
    tiles = [[2, 4], [1, 3], [4]]
    want = convert_sparse_cross_attention_mask_to_dense([get_cross_attention_token_mask(r, I) for r in rows],
                                                        tiles, 4, 8)
    got = cross_attention_mask(rows, I, tiles, 4, 8)
    assert torch.equal(got, torch.from_numpy(want))


def test_bad_inputs_name_the_field():
    with pytest.raises(ValueError, match="size"):
        TiledImageProcessor(size={"height": 28, "width": 32})
    with pytest.raises(ValueError, match="PIL"):
        TiledImageProcessor()([[np.zeros((4, 4, 3))]])
