"""A decoder conditioned on a style id and/or an instruction (``ModelConfig.condition``; seed 002's conditioned
LLM). The condition vector c [B, D] is the style's learned embedding plus the instruction's encoding: its tokens
(the model's token embedding) through ``instruction_layers`` bidirectional blocks of the model's own kind, mean-
pooled over non-pad tokens. c enters through the fusion named by ``condition.fusion`` (add to the inputs, a fusion
layer on the inputs, or adaptive norm of the final hidden states). c is computed once per sequence; a cache keeps
it for the decode steps."""
from __future__ import annotations

import torch
from torch import nn

from llmarch.config import ModelConfig
from llmarch.model import Model, ModelOutput, Stack
from llmarch.model_inputs import check_logits_to_keep
from llmarch.nn.cache import KVCache
from llmarch.nn.condition_fusion import CONDITION_FUSIONS


class ConditionedModel(Model):
    """``model(input_ids, style=ids [B], instruction=ids [B, S], instruction_mask=[B, S])`` (either or both, as
    the config has them); a cached step without either reuses the cache's condition."""

    def __init__(self, cfg: ModelConfig):
        if cfg.condition is None:
            raise ValueError("condition: ConditionedModel needs a ConditionConfig")
        super().__init__(cfg)
        c, D = cfg.condition, cfg.d_model
        self.styles = nn.Embedding(c.n_styles, D) if c.n_styles else None
        self.instruction = Stack(cfg, causal=False, n_layers=c.instruction_layers) if c.instruction_layers else None
        self.condition_fusion = CONDITION_FUSIONS[c.fusion](D)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache: KVCache | None = None, use_cache: bool = False, *,
                style: torch.Tensor | None = None, instruction: torch.Tensor | None = None,
                instruction_mask: torch.Tensor | None = None, **kwargs) -> ModelOutput:
        check_logits_to_keep(kwargs.get("logits_to_keep", 0), self.lm_head)
        if cache is None and use_cache:
            cache = self.new_cache()
        if style is None and instruction is None:
            c = getattr(cache, "condition", None)
            if c is None:
                raise ValueError("style: this model is conditioned; pass " + " and/or ".join(self.inputs_needed()))
        else:
            c = self.condition(input_ids.shape[0], style, instruction, instruction_mask)
        if cache is not None:
            cache.condition = c
        h = self._run(self.decoder, input_ids, attention_mask, position_ids, kwargs.get("token_type_ids"), cache,
                      c)
        return self._output(self.condition_fusion.outputs(h, c), cache, logits_to_keep=kwargs.get("logits_to_keep", 0))

    def inputs_needed(self) -> list[str]:
        return ((["style=ids [batch] (llmarch generate --style N)"] if self.styles is not None else []) +
                (["instruction=token ids [batch, S]"] if self.instruction is not None else []))

    def condition(self, B: int, style, instruction, instruction_mask) -> torch.Tensor:
        """c [B, D]: the style embedding + the pooled instruction encoding (the parts given)."""
        parts = []
        if style is not None:
            if self.styles is None:
                raise ValueError("style: this model has no style table (condition.n_styles is 0)")
            style = torch.as_tensor(style, device=self.embed.tokens.weight.device).long().reshape(-1).expand(B)
            n = self.config.condition.n_styles
            if int(style.min()) < 0 or int(style.max()) >= n:
                raise ValueError(f"style: ids must be in [0, {n}) (condition.n_styles)")
            parts.append(self.styles(style))
        if instruction is not None:
            parts.append(self.encode_instruction(instruction, instruction_mask, B))
        return parts[0] if len(parts) == 1 else parts[0] + parts[1]

    def encode_instruction(self, ids: torch.Tensor, mask: torch.Tensor | None, B: int) -> torch.Tensor:
        """Instruction ids [B, S] (mask [B, S], 1 = real; default: ids != pad_token_id) -> mean of the encoder
        stack's outputs over real tokens [B, D]."""
        if self.instruction is None:
            raise ValueError("instruction: this model has no instruction encoder (condition.instruction_layers "
                             "is 0)")
        if ids.dim() != 2 or ids.shape[0] != B:
            raise ValueError(f"instruction: expected token ids [batch={B}, S], got shape {tuple(ids.shape)}")
        pad = self.config.pad_token_id
        if mask is None:
            mask = (ids != pad).long() if pad is not None else torch.ones_like(ids)
        if not bool(mask.bool().any(-1).all()):
            raise ValueError("instruction_mask: every row needs at least one real (non-pad) token")
        h = self._run(self.instruction, ids, mask, None, None, None, None)  # [B, S, D]
        w = mask.to(h.dtype)[..., None]
        return (h * w).sum(1) / w.sum(1)

    def embed_inputs(self, input_ids, positions, position_ids, token_type_ids, memory) -> torch.Tensor:
        x = super().embed_inputs(input_ids, positions, position_ids, token_type_ids, memory)
        return x if memory is None else self.condition_fusion.inputs(x, memory)  # memory: c [B, D]


__all__ = ["ConditionedModel"]
