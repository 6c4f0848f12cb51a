"""Image preprocessing with Pillow + torch, as transformers' PIL image processors do it (CLIPImageProcessor,
SiglipImageProcessor): convert to RGB (transparency over white), resize (shortest edge to ``size["shortest_edge"]`` keeping the aspect
ratio, or to ``size["height"] x size["width"]``) with Pillow's filter ``resample`` (3 = bicubic) on uint8
pixels, center crop, rescale (float64 * ``rescale_factor``, then float32) and normalise per channel in float32.
Settings come from a checkpoint's ``preprocessor_config.json``; keys it leaves out take the defaults of its
``image_processor_type``."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# the defaults of each processor type (what transformers assumes for keys a file leaves out)
DEFAULTS = {
    "CLIPImageProcessor": dict(size={"shortest_edge": 224}, do_center_crop=True,
                               crop_size={"height": 224, "width": 224}, image_mean=OPENAI_CLIP_MEAN,
                               image_std=OPENAI_CLIP_STD),
    "SiglipImageProcessor": dict(size={"height": 224, "width": 224}, do_center_crop=False,
                                 image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5)),
}


@dataclass(frozen=True)
class ImageProcessor:
    """PIL images -> pixel_values [B, C, H, W] float32."""

    size: dict = field(default_factory=lambda: {"shortest_edge": 224})
    resample: int = 3  # PIL.Image.Resampling.BICUBIC
    do_resize: bool = True
    do_center_crop: bool = True
    crop_size: dict = field(default_factory=lambda: {"height": 224, "width": 224})
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    image_std: tuple[float, ...] = OPENAI_CLIP_STD
    do_convert_rgb: bool = True

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ImageProcessor":
        """From the fields of a ``preprocessor_config.json`` (unknown keys, such as processor_class, ignored)."""
        kind = str(d.get("image_processor_type", "CLIPImageProcessor")).removesuffix("Fast").removesuffix("Pil")
        if kind not in DEFAULTS:
            raise ValueError(f"preprocessor_config.json image_processor_type={d.get('image_processor_type')!r} is "
                             f"not supported; supported: {sorted(DEFAULTS)}")
        known = {f.name for f in dataclasses.fields(cls)}
        values = {**DEFAULTS[kind], **{k: v for k, v in d.items() if k in known and v is not None}}
        for name in ("size", "crop_size"):
            if isinstance(values.get(name), int):  # older files: one number
                n = values[name]
                values[name] = {"shortest_edge": n} if name == "size" and kind == "CLIPImageProcessor" else \
                    {"height": n, "width": n}
        for name in ("image_mean", "image_std"):
            if name in values:
                v = values[name]
                values[name] = tuple(v) if isinstance(v, (list, tuple)) else (float(v),) * 3
        return cls(**values)

    @classmethod
    def from_file(cls, path: str | Path) -> "ImageProcessor":
        """From ``path`` (a preprocessor_config.json or a directory holding one)."""
        path = Path(path)
        if path.is_dir():
            path = path / "preprocessor_config.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist; a vision checkpoint carries preprocessor_config.json")
        return cls.from_dict(json.loads(path.read_text()))

    @classmethod
    def for_size(cls, image_size: int, kind: str = "SiglipImageProcessor") -> "ImageProcessor":
        """A processor producing ``image_size`` x ``image_size`` inputs with the defaults of ``kind``."""
        return cls.from_dict({"image_processor_type": kind, "size": {"height": image_size, "width": image_size},
                              "crop_size": {"height": image_size, "width": image_size}}
                             | ({"size": {"shortest_edge": image_size}} if kind == "CLIPImageProcessor" else {}))

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) after the resize."""
        if "shortest_edge" in self.size:
            s = self.size["shortest_edge"]
            short, long = (width, height) if width <= height else (height, width)
            new_long = int(s * long / short)
            return (new_long, s) if width <= height else (s, new_long)
        return self.size["height"], self.size["width"]

    def one(self, image) -> torch.Tensor:
        """A PIL image -> [C, H, W] float32."""
        image = checked_rgb(image, self.do_convert_rgb)
        size = self.output_size(image.height, image.width) if self.do_resize else None
        x = pixels(image, size, self.resample)
        if self.do_center_crop:
            x = center_crop(x, self.crop_size["height"], self.crop_size["width"])
        return self.scale(x)

    def scale(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 [C, H, W] -> float32: rescaled in float64, then normalised per channel in float32."""
        x = x.double() * self.rescale_factor if self.do_rescale else x.double()
        x = x.float()
        if self.do_normalize:
            mean = torch.tensor(self.image_mean, dtype=torch.float32)[:, None, None]
            std = torch.tensor(self.image_std, dtype=torch.float32)[:, None, None]
            x = (x - mean) / std
        return x

    def __call__(self, images: Sequence) -> torch.Tensor:
        """PIL images (or one) -> pixel_values [B, C, H, W] float32."""
        images = [images] if not isinstance(images, (list, tuple)) else images
        return torch.stack([self.one(im) for im in images])


def checked_rgb(image, convert: bool = True):
    """A PIL image (RGB when ``convert``); anything else is a ValueError."""
    from PIL import Image

    if not isinstance(image, Image.Image):
        raise ValueError(f"images must be PIL images; got {type(image).__name__} (use llmarch.image_processing."
                         "load_image for a file)")
    return to_rgb(image) if convert else image


def pixels(image, size: tuple[int, int] | None, resample: int) -> torch.Tensor:
    """A PIL image, resized to ``size`` (height, width) with Pillow's ``resample`` unless None -> uint8 [C, H, W]."""
    import numpy as np

    if size is not None:
        image = image.resize((size[1], size[0]), resample=resample)
    x = torch.from_numpy(np.array(image))  # [H, W, C] uint8
    x = x[..., None] if x.dim() == 2 else x
    return x.permute(2, 0, 1)


def to_rgb(image):
    """RGB; transparent pixels are composited onto white first (as transformers does)."""
    from PIL import Image

    if "A" in image.getbands() or image.info.get("transparency") is not None:
        image = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", image.size, (255, 255, 255, 255)), image).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def center_crop(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[C, H, W] -> [C, height, width] around the centre (top/left rounded down); zero-padded where too small."""
    C, H, W = x.shape
    top, left = (H - height) // 2, (W - width) // 2
    if top >= 0 and left >= 0:
        return x[:, top:top + height, left:left + width]
    out = x.new_zeros(C, max(H, height), max(W, width))
    pt, pl = -(-(max(H, height) - H) // 2), -(-(max(W, width) - W) // 2)
    out[:, pt:pt + H, pl:pl + W] = x
    top, left = (out.shape[1] - height) // 2, (out.shape[2] - width) // 2
    return out[:, top:top + height, left:left + width]


def load_image(path: str | Path):
    """A PIL image from a file (``--image PATH``)."""
    from PIL import Image

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image {path} does not exist")
    with Image.open(path) as im:
        im.load()
        return im.copy()


__all__ = ["ImageProcessor", "center_crop", "load_image"]
