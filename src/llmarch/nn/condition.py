"""A decoder conditioned on a style id (``ModelConfig.condition``): the id's learned embedding e [B, D] is added to
every input position (``add``) or turns into a scale and shift of the final hidden states, h * (1 + s) + b with
(s, b) = Linear(e) initialised at zero (``adanorm``; FiLM, Perez et al. 2018; adaLN-Zero, Peebles & Xie 2023).
The condition is given once per sequence; a cache keeps it for the decode steps."""
from __future__ import annotations

import torch
from torch import nn

from llmarch.config import ModelConfig
from llmarch.model import Model, ModelOutput
from llmarch.nn.cache import KVCache


class ConditionedModel(Model):
    """``model(input_ids, style=ids [B])``; a cached step without ``style`` reuses the cache's."""

    def __init__(self, cfg: ModelConfig):
        if cfg.condition is None:
            raise ValueError("condition: ConditionedModel needs a ConditionConfig")
        super().__init__(cfg)
        D = cfg.d_model
        self.styles = nn.Embedding(cfg.condition.n_styles, D)
        self.modulation = nn.Linear(D, 2 * D) if cfg.condition.fusion == "adanorm" else None

    def after_init(self) -> None:
        if self.modulation is not None:  # start as the unmodulated model
            nn.init.zeros_(self.modulation.weight)
            nn.init.zeros_(self.modulation.bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache: KVCache | None = None, use_cache: bool = False, *,
                style: torch.Tensor | None = None, **kwargs) -> ModelOutput:
        if cache is None and use_cache:
            cache = self.new_cache()
        if style is None:
            style = getattr(cache, "style", None)
            if style is None:
                raise ValueError("style: this model is conditioned; pass style=ids [batch] (llmarch generate "
                                 "--style N)")
        style = torch.as_tensor(style, device=input_ids.device).long().reshape(-1).expand(input_ids.shape[0])
        if int(style.min()) < 0 or int(style.max()) >= self.config.condition.n_styles:
            raise ValueError(f"style: ids must be in [0, {self.config.condition.n_styles}) (condition.n_styles)")
        if cache is not None:
            cache.style = style
        e = self.styles(style)  # [B, D]
        h = self._run(self.decoder, input_ids, attention_mask, position_ids, kwargs.get("token_type_ids"), cache,
                      e)
        if self.modulation is not None:
            scale, shift = self.modulation(e)[:, None].chunk(2, dim=-1)  # [B, 1, D] each
            h = h * (1 + scale) + shift
        return self._output(h, cache)

    def embed_inputs(self, input_ids, positions, position_ids, token_type_ids, memory) -> torch.Tensor:
        x = super().embed_inputs(input_ids, positions, position_ids, token_type_ids, memory)
        return x + memory[:, None] if self.modulation is None else x  # memory: the style embedding [B, D]


__all__ = ["ConditionedModel"]
