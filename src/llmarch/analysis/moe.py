"""How the analysis reads a mixture-of-experts FFN from the config, in one place.

The MoE sub-config (``cfg.moe``) is read only here, so the counts in ``params``/``flops``/``memory`` depend on a
small :class:`MoESpec`, not on the sub-config's field names. A config without ``moe`` (or with ``moe=None``) is
dense. Field names read: ``num_experts`` (E), ``top_k`` (K), and optionally ``d_ff`` (expert width, default the
model's ``d_ff``), ``n_shared_experts``, ``shared_d_ff``, ``router_bias``, ``every`` (an MoE FFN on every n-th
layer, default 1) and ``first_dense`` (that many leading layers stay dense, default 0). A missing required name
raises a ValueError that says to update this file.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MoESpec:
    """E routed experts of width ``expert_ff``, K of them per token, plus always-on shared experts."""

    num_experts: int
    top_k: int
    expert_ff: int
    n_shared: int = 0
    shared_ff: int = 0
    router_bias: bool = False
    every: int = 1
    first_dense: int = 0

    def is_moe_layer(self, layer: int) -> bool:
        return layer >= self.first_dense and (layer - self.first_dense) % self.every == 0


def moe_spec(cfg) -> MoESpec | None:
    """The MoE shape of ``cfg``, or None for a dense FFN."""
    moe = getattr(cfg, "moe", None)
    if moe is None or getattr(moe, "num_experts", 1) in (None, 0):
        return None

    def need(name: str):
        if not hasattr(moe, name):
            raise ValueError(f"moe.{name}: the analysis needs this field of the MoE config; update "
                             "llmarch/analysis/moe.py to the MoE config's field names")
        return getattr(moe, name)

    expert_ff = getattr(moe, "d_ff", None) or cfg.d_ff
    n_shared = getattr(moe, "n_shared_experts", 0) or 0
    return MoESpec(num_experts=need("num_experts"), top_k=need("top_k"), expert_ff=expert_ff,
                   n_shared=n_shared, shared_ff=(getattr(moe, "shared_d_ff", None) or expert_ff) if n_shared else 0,
                   router_bias=bool(getattr(moe, "router_bias", False)), every=getattr(moe, "every", 1) or 1,
                   first_dense=getattr(moe, "first_dense", 0) or 0)
