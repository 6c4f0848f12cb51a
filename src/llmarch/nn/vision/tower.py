"""The vision tower: a ViT (Dosovitskiy et al. 2021) as CLIP (Radford et al. 2021) and SigLIP (Zhai et al. 2023)
build it: patch embedding, optional pre-norm, our pre-norm encoder blocks, a final LayerNorm and a pooling head.
Hidden state 0 is the (pre-normed) embedding, hidden state i the output of block i, as transformers counts them."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from llmarch.nn.attention import AttnContext
from llmarch.nn.norm import LayerNorm
from llmarch.nn.vision.patch import PatchEmbedding
from llmarch.nn.vision.pool import POOLS
from llmarch.vision_config import VisionConfig


@dataclass
class VisionOutput:
    last_hidden_state: torch.Tensor  # [B, N, D] (after the final norm when post_norm == "all")
    pooled: torch.Tensor | None  # [B, D] from the pooling head (normed when post_norm == "pooled")
    hidden_states: list[torch.Tensor]  # L + 1 tensors [B, N, D]: embeddings, then each block's output


class VisionTower(nn.Module):
    """pixel_values [B, C, H, W] -> :class:`VisionOutput`; :meth:`features` gives the states a language model
    reads ([B, N', D * selected layers], ``feature_layer(s)`` / ``feature_select``)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        from llmarch.model import Stack  # the encoder stack of the text models

        self.config = cfg
        self.patches = PatchEmbedding(cfg.channels, cfg.d_model, cfg.patch_size, cfg.grid, cfg.class_token,
                                      cfg.patch_bias)
        self.pre_norm = LayerNorm(cfg.d_model, cfg.norm_eps) if cfg.pre_norm else nn.Identity()
        self.encoder = Stack(cfg.encoder_config(), causal=False)
        self.post_norm = LayerNorm(cfg.d_model, cfg.norm_eps) if cfg.post_norm != "none" else nn.Identity()
        self.pool = POOLS[cfg.pool](d_model=cfg.d_model, n_heads=cfg.n_heads, d_ff=cfg.d_ff,
                                    activation=cfg.activation, norm_eps=cfg.norm_eps)

    def tied_names(self) -> dict[str, str]:
        return {}

    def hidden_states(self, pixel_values: torch.Tensor, depth: int | None = None) -> list[torch.Tensor]:
        """[embeddings, block 1 output, ..., block ``depth`` output] (default: every block), each [B, N, D]."""
        x = self.pre_norm(self.patches(pixel_values))
        B, N, _ = x.shape
        positions = self.encoder.positions
        ctx = AttnContext(0, N, positions, torch.zeros(B, N, dtype=torch.long, device=x.device), None,
                          causal=False, device=x.device)
        states = [x]
        for layer in self.encoder.layers[:depth]:
            x = layer(x, ctx, None)
            states.append(x)
        return states

    def forward(self, pixel_values: torch.Tensor) -> VisionOutput:
        states = self.hidden_states(pixel_values)
        last = states[-1]
        if self.config.post_norm == "all":
            last = self.post_norm(last)
        pooled = self.pool(last)
        if pooled is not None and self.config.post_norm == "pooled":
            pooled = self.post_norm(pooled)
        return VisionOutput(last, pooled, states)

    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The selected hidden state(s) (``feature_layer``, or ``feature_layers`` concatenated on the feature axis;
        only the blocks they need run); ``default`` drops the class token. [B, C, H, W] -> [B, N', D * layers]."""
        cfg = self.config
        states = self.hidden_states(pixel_values, cfg.feature_depth)
        h = torch.cat([states[i] for i in cfg.selected_layers], dim=-1)
        return h[:, 1:] if cfg.class_token and cfg.feature_select == "default" else h
