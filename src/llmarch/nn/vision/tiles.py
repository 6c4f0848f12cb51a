"""Tiled images (Llama 3.2 Vision; transformers' ``MllamaVisionModel``): an image resized onto a canvas of up to
``max_num_tiles`` tiles, each tile a patch grid with its own class token. Where a tile sits is told by the image's
aspect-ratio id (an index into :func:`aspect_ratios`, 0 = no image): tanh-gated tile embeddings before the class
token and after the local blocks, and a gated mix of a shared position table and a per-tile one. Global blocks
over all tiles are residual blocks with tanh gates on both branches."""
from __future__ import annotations

import math

import torch
from torch import nn

from llmarch.nn.attention import AttnContext
from llmarch.nn.device import host_reads_ok
from llmarch.nn.vision.patch import PATCH_EMBEDDINGS


def aspect_ratios(max_num_tiles: int) -> list[tuple[int, int]]:
    """Tile arrangements (rows, columns) with at most ``max_num_tiles`` tiles, in transformers' order; id i + 1
    names the i-th (id 0 is a padding image)."""
    return [(r, c) for r in range(1, max_num_tiles + 1) for c in range(1, max_num_tiles + 1)
            if r * c <= max_num_tiles]


class TileEmbedding(nn.Module):
    """x [n, tiles, N, D] + tanh(gate) * embedding(aspect_ratio_ids) viewed [n, tiles, 1, D]."""

    def __init__(self, n_ids: int, tiles: int, d_model: int):
        super().__init__()
        self.tiles = tiles
        self.embedding = nn.Embedding(n_ids, tiles * d_model)
        self.gate = nn.Parameter(torch.zeros(1))

    def after_init(self) -> None:
        nn.init.zeros_(self.gate)

    def forward(self, x: torch.Tensor, aspect_ratio_ids: torch.Tensor) -> torch.Tensor:
        e = self.embedding(aspect_ratio_ids).view(-1, self.tiles, 1, x.shape[-1])
        return x + self.gate.tanh() * e


class TiledPatchEmbedding(nn.Module):
    """pixel_values [n, tiles, C, H, W], aspect_ratio_ids [n] -> tokens [n, tiles, N, D], N = grid² + 1: patches
    (+ pre-tile embedding), a class token first, then (1 - tanh g) * positions + tanh g * tile_positions(id)."""

    def __init__(self, channels: int, d_model: int, patch_size: int, grid: int, max_num_tiles: int,
                 bias: bool = False):
        super().__init__()
        n_ids, N = len(aspect_ratios(max_num_tiles)) + 1, grid * grid + 1
        self.tiles, self.grid, self.patch_size = max_num_tiles, grid, patch_size
        self.proj = nn.Conv2d(channels, d_model, kernel_size=patch_size, stride=patch_size, bias=bias)
        self.class_token = nn.Parameter(torch.zeros(d_model))
        self.positions = nn.Parameter(torch.zeros(N, d_model))
        self.position_gate = nn.Parameter(torch.zeros(1))
        self.tile_positions = nn.Embedding(n_ids, max_num_tiles * N * d_model)
        self.pre_tile = TileEmbedding(n_ids, max_num_tiles, d_model)
        self.post_tile = TileEmbedding(n_ids, max_num_tiles, d_model)  # read by the tower after its local blocks

    def after_init(self) -> None:
        nn.init.normal_(self.class_token, std=self.class_token.shape[0] ** -0.5)
        nn.init.zeros_(self.position_gate)

    def tokens(self, pixel_values: torch.Tensor, aspect_ratio_ids: torch.Tensor | None) -> torch.Tensor:
        if pixel_values.dim() != 5 or pixel_values.shape[1] != self.tiles:
            raise ValueError(f"pixel_values must be [images, {self.tiles} tiles, channels, height, width] (or "
                             f"[batch, images, tiles, ...]); got shape {tuple(pixel_values.shape)}")
        side = self.grid * self.patch_size
        if tuple(pixel_values.shape[-2:]) != (side, side):
            raise ValueError(f"pixel_values: tiles must be {side}x{side} (vision.image_size); got "
                             f"{tuple(pixel_values.shape[-2:])}")
        if aspect_ratio_ids is None:
            raise ValueError("aspect_ratio_ids: a tiled vision tower needs each image's aspect-ratio id "
                             "(from the image processor)")
        n, tiles = pixel_values.shape[:2]
        n_ids = self.tile_positions.num_embeddings
        if aspect_ratio_ids.numel() != n or (aspect_ratio_ids.numel() and host_reads_ok(aspect_ratio_ids) and not
                                             bool(((aspect_ratio_ids >= 0) & (aspect_ratio_ids < n_ids)).all())):
            raise ValueError(f"aspect_ratio_ids must hold one id in [0, {n_ids}) per image ({n} images); got shape "
                             f"{tuple(aspect_ratio_ids.shape)}")
        ids = aspect_ratio_ids.reshape(n)
        x = self.proj(pixel_values.flatten(0, 1).to(self.proj.weight.dtype)).flatten(2).transpose(1, 2)
        x = self.pre_tile(x.view(n, tiles, -1, x.shape[-1]), ids)  # [n, tiles, grid², D]
        x = torch.cat([self.class_token.expand(n, tiles, 1, -1), x], dim=2)  # [n, tiles, N, D]
        gate = self.position_gate.tanh()
        x = x + (1 - gate) * self.positions
        return x + gate * self.tile_positions(ids).view(x.shape[0], tiles, *self.positions.shape)


@PATCH_EMBEDDINGS.register("gated_tiles")
def tiled_patches(cfg) -> TiledPatchEmbedding:
    return TiledPatchEmbedding(cfg.channels, cfg.d_model, cfg.patch_size, cfg.grid, cfg.max_num_tiles,
                               cfg.patch_bias)


class GatedBlock(nn.Module):
    """A pre-norm block whose branches are scaled by tanh gates: x + tanh(a) attn(norm x), h + tanh(f) ffn(norm h).
    Built from the parts of a plain pre-norm block. x [B, T, D] -> [B, T, D]."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.attn, self.ffn, self.attn_norm, self.ffn_norm = block.attn, block.ffn, block.attn_norm, block.ffn_norm
        self.gate_attn = nn.Parameter(torch.full((1,), math.pi / 4))
        self.gate_ffn = nn.Parameter(torch.full((1,), math.pi / 4))

    def after_init(self) -> None:
        nn.init.constant_(self.gate_attn, math.pi / 4)
        nn.init.constant_(self.gate_ffn, math.pi / 4)

    def forward(self, x: torch.Tensor, ctx, cache=None) -> torch.Tensor:
        h = x + self.gate_attn.tanh() * self.attn(self.attn_norm(x), ctx, cache)
        return h + self.gate_ffn.tanh() * self.ffn(self.ffn_norm(h))


class FixedMaskContext(AttnContext):
    """An encoder context whose every layer uses one given boolean mask [B, 1, S, S] (True = attend)."""

    def __init__(self, fixed: torch.Tensor | None, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.fixed = fixed

    def mask(self, pattern, k_start: int, S: int):
        return self.fixed, False


def pad_tiles(x: torch.Tensor, multiple: int, tile_mask: torch.Tensor | None):
    """Tokens [n, tiles, N, D] zero-padded to a multiple of ``multiple`` per tile and flattened: [n, tiles*N', D];
    and the attention mask [n, 1, S, S] where a padding token (or one of a padding tile, ``tile_mask`` [n, tiles]
    0) sees only real tokens, and a real token sees all (as transformers masks them), or None if all are real."""
    n, tiles, N, D = x.shape
    pad = -N % multiple
    if pad == 0 and tile_mask is None:
        return x.reshape(n, -1, D), None
    if tile_mask is not None and tile_mask.numel() != n * tiles:
        raise ValueError(f"aspect_ratio_mask must be [images, {tiles} tiles] ({n} images, or [batch, images, "
                         f"tiles]); got shape {tuple(tile_mask.shape)}")
    x = nn.functional.pad(x, (0, 0, 0, pad))
    real = torch.ones(n, tiles, N + pad, dtype=torch.bool, device=x.device)
    real[:, :, N:] = False
    if tile_mask is not None:
        real = real & tile_mask.reshape(n, tiles, 1).bool()
    real = real.reshape(n, -1)
    mask = None if bool(real.all()) else (real[:, :, None] | real[:, None, :])[:, None]
    return x.reshape(n, -1, D), mask


__all__ = ["FixedMaskContext", "GatedBlock", "TileEmbedding", "TiledPatchEmbedding", "aspect_ratios", "pad_tiles"]
