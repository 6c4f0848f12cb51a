"""The vision tower: a ViT (Dosovitskiy et al. 2021) as CLIP (Radford et al. 2021), SigLIP (Zhai et al. 2023) and
Llama 3.2 Vision build it: patch embedding (``vision.positions``: one image, or tiles by aspect ratio), optional
pre-norm, our pre-norm encoder blocks, a final LayerNorm, optional gated global blocks over all tiles, a pooling
head. Hidden state 0 is the (pre-normed) embedding, hidden state i the output of block i (the global blocks
after the local ones), as transformers counts them."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from llmarch.nn.norm import LayerNorm
from llmarch.nn.vision.patch import PATCH_EMBEDDINGS
from llmarch.nn.vision.pool import POOLS
from llmarch.nn.vision.tiles import FixedMaskContext, GatedBlock, pad_tiles
from llmarch.vision_config import VisionConfig


@dataclass
class VisionOutput:
    last_hidden_state: torch.Tensor  # [B, N, D] (after the final norm when post_norm == "all")
    pooled: torch.Tensor | None  # [B, D] from the pooling head (normed when post_norm == "pooled")
    hidden_states: list[torch.Tensor]  # L + 1 tensors [B, N, D]: embeddings, then each block's output


class VisionTower(nn.Module):
    """pixel_values [B, C, H, W] (tiled towers: [n, tiles, C, H, W] with aspect_ratio_ids [n] and
    aspect_ratio_mask [n, tiles]) -> :class:`VisionOutput`; :meth:`features` gives what a language model reads
    ([B, N', feature_dim]: ``feature_layer(s)``, ``intermediate_layers``, ``feature_select``)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        from llmarch.model import Stack  # the encoder stack of the text models

        self.config = cfg
        self.patches = PATCH_EMBEDDINGS[cfg.positions](cfg)
        self.pre_norm = LayerNorm(cfg.d_model, cfg.norm_eps) if cfg.pre_norm else nn.Identity()
        self.encoder = Stack(cfg.encoder_config(), causal=False)
        self.post_norm = LayerNorm(cfg.d_model, cfg.norm_eps) if cfg.post_norm != "none" else nn.Identity()
        self.global_layers = nn.ModuleList(
            GatedBlock(b) for b in Stack(cfg.encoder_config(cfg.global_layers), causal=False).layers
        ) if cfg.global_layers else nn.ModuleList()
        self.pool = POOLS[cfg.pool](d_model=cfg.d_model, n_heads=cfg.n_heads, d_ff=cfg.d_ff,
                                    activation=cfg.activation, norm_eps=cfg.norm_eps)

    def tied_names(self) -> dict[str, str]:
        return {}

    def hidden_states(self, pixel_values: torch.Tensor, depth: int | None = None,
                      aspect_ratio_ids: torch.Tensor | None = None,
                      aspect_ratio_mask: torch.Tensor | None = None) -> list[torch.Tensor]:
        """[embeddings, block 1 output, ..., block ``depth`` output] (default: every block), each [n, S, D] with
        S = tiles * (N padded to ``pad_to``)."""
        cfg = self.config
        if pixel_values.dim() == 6:  # [B, images, tiles, ...]: the images in reading order
            pixel_values = pixel_values.flatten(0, 1)
        tiles = self.pre_norm(self.patches.tokens(pixel_values, aspect_ratio_ids))  # [n, tiles, N, D]
        x, mask = pad_tiles(tiles, cfg.pad_to, aspect_ratio_mask)
        B, S, _ = x.shape
        ctx = FixedMaskContext(mask, 0, S, self.encoder.positions, torch.zeros(B, S, dtype=torch.long,
                               device=x.device), None, causal=False, device=x.device)
        depth = cfg.n_layers + cfg.global_layers if depth is None else depth
        states = [x]
        for layer in self.encoder.layers[:depth]:
            x = layer(x, ctx, None)
            states.append(x)
        if depth > cfg.n_layers:  # the global blocks read the normed local output with post-tile embeddings
            n, tiles = tiles.shape[:2]
            x = self.patches.post_tile(self.post_norm(x).view(n, tiles, -1, x.shape[-1]),
                                       aspect_ratio_ids.reshape(n)).view(x.shape)
            for layer in self.global_layers[:depth - cfg.n_layers]:
                x = layer(x, ctx, None)
                states.append(x)
        return states

    def forward(self, pixel_values: torch.Tensor, aspect_ratio_ids: torch.Tensor | None = None,
                aspect_ratio_mask: torch.Tensor | None = None) -> VisionOutput:
        states = self.hidden_states(pixel_values, None, aspect_ratio_ids, aspect_ratio_mask)
        last = states[-1]
        if self.config.post_norm == "all":
            last = self.post_norm(last)
        pooled = self.pool(last)
        if pooled is not None and self.config.post_norm == "pooled":
            pooled = self.post_norm(pooled)
        return VisionOutput(last, pooled, states)

    def features(self, pixel_values: torch.Tensor, aspect_ratio_ids: torch.Tensor | None = None,
                 aspect_ratio_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The selected hidden state(s) (``feature_layer``, or ``feature_layers`` concatenated on the feature axis)
        with the ``intermediate_layers`` states after them, interleaved per coordinate (as transformers stacks
        them); only the blocks they need run; padding removed, per tile; ``default`` drops the class token.
        -> [n, tiles * N', feature_dim]."""
        cfg = self.config
        states = self.hidden_states(pixel_values, cfg.feature_depth, aspect_ratio_ids, aspect_ratio_mask)
        h = torch.cat([states[i] for i in cfg.selected_layers], dim=-1)
        if cfg.intermediate_layers:  # interleaved per coordinate: [d0 of each layer, d1 of each layer, ...]
            h = torch.cat([h, torch.stack([states[i] for i in cfg.intermediate_layers], dim=-1).flatten(-2)], -1)
        P, (H, W) = cfg.patch_size, pixel_values.shape[-2:]
        n, tiles, N = h.shape[0], cfg.max_num_tiles, (H // P) * (W // P) + int(cfg.class_token)
        h = h.view(n, tiles, -1, h.shape[-1])[:, :, :N]  # [n, tiles, N, feature_dim]: padding dropped
        if cfg.class_token and cfg.feature_select == "default":
            h = h[:, :, 1:]
        return h.reshape(n, -1, h.shape[-1])
