"""ViT patch embedding (Dosovitskiy et al. 2021, sec. 3.1): a P x P stride-P convolution cuts the image into
patches, an optional class token leads them, and a learned position table is added; for another image size the
patch rows of the table are resized bicubically (as DINO / transformers' ``interpolate_pos_encoding`` do)."""
from __future__ import annotations

import torch
from torch import nn

from llmarch.registry import Registry

# the ``vision.positions`` value -> a builder of the patch embedding from a VisionConfig. Every entry maps
# pixel_values (+ aspect-ratio ids) to per-tile tokens [n, tiles, N, D] through ``tokens``.
PATCH_EMBEDDINGS: Registry = Registry("vision.positions")


class PatchEmbedding(nn.Module):
    """pixel_values [B, C, H, W] -> [B, N, D] with N = (H/P)(W/P) (+ 1 class token first).

    ``positions`` [grid² (+ 1), D]: the class token's row first, then the patches in row-major order."""

    def __init__(self, channels: int, d_model: int, patch_size: int, grid: int, class_token: bool, bias: bool):
        super().__init__()
        self.patch_size, self.grid = patch_size, grid
        self.proj = nn.Conv2d(channels, d_model, kernel_size=patch_size, stride=patch_size, bias=bias)
        self.class_token = nn.Parameter(torch.zeros(d_model)) if class_token else None
        self.positions = nn.Parameter(torch.zeros(grid * grid + int(class_token), d_model))

    def after_init(self) -> None:
        """A class token of unit scale per coordinate: normal(0, D^-1/2), as CLIP initialises it."""
        if self.class_token is not None:
            nn.init.normal_(self.class_token, std=self.class_token.shape[0] ** -0.5)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if pixel_values.dim() != 4 or pixel_values.shape[1] != self.proj.in_channels:
            raise ValueError(f"pixel_values must be [batch, {self.proj.in_channels}, height, width]; got shape "
                             f"{tuple(pixel_values.shape)}")
        H, W = pixel_values.shape[-2:]
        P = self.patch_size
        if H < P or W < P:
            raise ValueError(f"pixel_values: the image ({H}x{W}) is smaller than one {P}x{P} patch")
        x = self.proj(pixel_values.to(self.proj.weight.dtype)).flatten(2).transpose(1, 2)  # [B, h*w, D]
        if self.class_token is not None:
            x = torch.cat([self.class_token.expand(x.shape[0], 1, -1), x], dim=1)
        return x + self.table(H // P, W // P, square=H == W)

    def tokens(self, pixel_values: torch.Tensor, aspect_ratio_ids: torch.Tensor | None = None) -> torch.Tensor:
        """One tile per image: [B, C, H, W] -> [B, 1, N, D] (aspect-ratio ids are not read)."""
        return self(pixel_values)[:, None]

    def table(self, h: int, w: int, square: bool = True) -> torch.Tensor:
        """Positions for an h x w patch grid: [h*w (+ 1), D]; the stored table unless the grid differs."""
        if h * w == self.grid ** 2 and square:
            return self.positions
        lead = 1 if self.class_token is not None else 0
        D = self.positions.shape[-1]
        grid = self.positions[lead:].reshape(1, self.grid, self.grid, D).permute(0, 3, 1, 2)  # [1, D, g, g]
        grid = nn.functional.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)
        return torch.cat([self.positions[:lead], grid.permute(0, 2, 3, 1).reshape(h * w, D)], dim=0)


@PATCH_EMBEDDINGS.register("learned")
def learned_patches(cfg) -> PatchEmbedding:
    return PatchEmbedding(cfg.channels, cfg.d_model, cfg.patch_size, cfg.grid, cfg.class_token, cfg.patch_bias)
