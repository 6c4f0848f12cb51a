"""Pixel values equal transformers' PIL image processors (CLIP: shortest-edge resize + center crop; SigLIP: fixed
resize), read from the preprocessor_config.json they save. Tolerance: exact up to float32 rounding (<= 1e-6)."""
import numpy as np
import pytest
import torch
from PIL import Image

from llmarch.image_processing import ImageProcessor

TOL = 1e-6  # the same float32 operations in the same order; nothing should differ


def images():
    g = np.random.default_rng(0)
    rgb = Image.fromarray(g.integers(0, 256, (37, 23, 3), dtype=np.uint8))  # portrait, odd sizes
    wide = Image.fromarray(g.integers(0, 256, (19, 41, 3), dtype=np.uint8))
    gray = Image.fromarray(g.integers(0, 256, (30, 30), dtype=np.uint8))  # converted to RGB
    rgba = Image.fromarray(g.integers(0, 256, (12, 9, 4), dtype=np.uint8))  # smaller than the crop: padded
    return [rgb, wide, gray, rgba]


@pytest.mark.parametrize("kind,kwargs", [
    ("CLIPImageProcessorPil", dict(size={"shortest_edge": 20}, crop_size={"height": 16, "width": 18})),
    ("SiglipImageProcessorPil", dict(size={"height": 16, "width": 24})),
])
def test_pixel_values_equal_transformers(kind, kwargs, tmp_path):
    import transformers

    theirs = getattr(transformers, kind)(**kwargs)
    theirs.save_pretrained(tmp_path)
    ours = ImageProcessor.from_file(tmp_path)
    for im in images():
        want = torch.as_tensor(theirs(im, return_tensors="np")["pixel_values"])
        got = ours(im)
        assert got.shape == want.shape and got.dtype == torch.float32
        assert (got - want).abs().max() <= TOL


def test_unknown_processor_type_names_the_field():
    with pytest.raises(ValueError, match="image_processor_type"):
        ImageProcessor.from_dict({"image_processor_type": "NopeImageProcessor"})
