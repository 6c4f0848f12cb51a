"""Shared pieces of the mixture-of-experts translators: the experts stack/unstack transform and per-layer FFN
rules for models whose layers are not all alike (a dense/MoE layer schedule)."""
from __future__ import annotations

import logging
from typing import Callable, Sequence

import torch

from llmarch.config import ModelConfig
from llmarch.hf.convert import Rule
from llmarch.moe_config import MoEConfig

log = logging.getLogger(__name__)


def experts_rule(ours: str, per_expert: Sequence[str], rows: Sequence[int] | None, n_experts: int) -> Rule:
    """``ours`` [E, in, sum(rows)] <- for each expert e the checkpoint tensors ``per_expert`` (names holding
    ``{e}``), each an nn.Linear weight [rows[j], in], concatenated along rows, transposed to our [in, out] expert
    layout and stacked over experts; and back. ``rows`` None: one tensor per expert."""
    names = tuple(n.replace("{e}", str(e)) for e in range(n_experts) for n in per_expert)
    n = len(per_expert)

    def stack(ts: Sequence[torch.Tensor]) -> torch.Tensor:
        return torch.stack([torch.cat(list(ts[e * n:(e + 1) * n]), dim=0).t() for e in range(n_experts)])

    def unstack(t: torch.Tensor) -> list[torch.Tensor]:
        parts = [[t[e].t()] if rows is None else t[e].t().split(list(rows), dim=0) for e in range(n_experts)]
        return [p.contiguous() for ps in parts for p in ps]

    return Rule(ours, names, stack, unstack)


def per_layer_rules(base: Sequence[Rule], cfg: ModelConfig, moe_rules: Callable[[int], list[Rule]],
                    dense_rules: Callable[[int], list[Rule]]) -> list[Rule]:
    """``base`` without its ``{layer}`` FFN rules, plus each layer's own FFN rules (MoE or dense per schedule)."""
    rules = [r for r in base if not r.ours.startswith("decoder.layers.{layer}.ffn.")]
    for i in range(cfg.n_layers):
        rules += moe_rules(i) if cfg.moe.is_moe_layer(i) else dense_rules(i)
    return rules


def warn_dropped(cfg: ModelConfig, model_type: str) -> None:
    """Training-only settings the Hugging Face config cannot hold are dropped on save, with a log line."""
    if cfg.moe is not None and cfg.moe.z_coef:
        log.warning("%s config has no router z-loss; moe.z_coef=%s is not saved", model_type, cfg.moe.z_coef)


def moe_on_dense_reason(dense_accepts, cfg, model_type: str) -> str | None:
    """The checks every MoE family over a dense one shares: the config has an MoE, its dense part fits the dense
    family (``dense_accepts`` of the config with a GLU FFN), and the routing is plain (no DeepSeek-style scale)."""
    if cfg.moe is None:
        return f"{model_type} is a mixture of experts; the config has no moe"
    return dense_accepts(cfg.replace(ffn="glu", moe=None)) or plain_routing(cfg.moe, model_type)


def plain_routing(moe: MoEConfig, model_type: str) -> str | None:
    """Why ``model_type`` cannot hold DeepSeek-style routing (a routed weight scale, group-limited choice)."""
    if moe.routed_scale != 1.0 or moe.n_groups != 1:
        return f"{model_type} has no routed weight scale or group-limited routing (routed_scale=1, n_groups=1)"
    return None
