"""The mixture-of-experts FFN (Shazeer et al. 2017): a router picks K of E experts per token, a capacity rule may
drop assignments, a dispatcher runs the experts, and optional shared experts run on every token
(DeepSeekMoE, Dai et al. 2024; Qwen2-MoE).

The forward keeps the FFN protocol ([B, T, D] -> [B, T, D]). What the training loss and the logs need is left on
the module after each forward: ``aux_loss`` (balance_coef * balance + z_coef * z [+ importance term], the ``moe.balance``
loss of nn/balance.py; a scalar with grad) and the
detached routing decision, from which :meth:`MoE.stats` computes load statistics only when asked (no cost on the
hot path). :func:`aux_loss` sums the former over a model; :func:`router_stats` reads the latter per layer.
"""
from __future__ import annotations

import torch
from torch import nn

from llmarch.moe_config import MoEConfig
from llmarch.nn import fused_moe
from llmarch.nn.dispatch import DISPATCHERS, CapacityLimit, Dropless
from llmarch.nn.experts import EXPERTS
from llmarch.nn.ffn import FFNS
from llmarch.nn.balance import BALANCE_LOSSES
from llmarch.nn.router import ROUTERS, Routing, balance_loss, z_loss


class SharedExperts(nn.Module):
    """Always-on experts, fused into one FFN of width n_shared * F_shared. [N, D] -> [N, D]."""

    def __init__(self, d_model: int, d_ff: int, activation: str, kind: str):
        super().__init__()
        self.ffn = EXPERTS[kind].dense(d_model, d_ff, activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ffn(x)


class GatedSharedExperts(SharedExperts):
    """Shared experts scaled per token by sigmoid(gate(x)), gate a [1, D] projection (Qwen2-MoE)."""

    def __init__(self, d_model: int, d_ff: int, activation: str, kind: str):
        super().__init__(d_model, d_ff, activation, kind)
        self.gate = nn.Linear(d_model, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.gate(x)) * self.ffn(x)


@FFNS.register("moe")
class MoE(nn.Module):
    """Routed experts (+ shared experts). x [B, T, D] -> [B, T, D]; routing in fp32, experts in x's dtype.

    ``d_ff`` is the width F of one routed expert; everything else comes from ``moe``."""

    def __init__(self, d_model: int, d_ff: int, activation: str, bias: bool = False, dropout: float = 0.0, *,
                 moe: MoEConfig):
        super().__init__()
        if bias:
            raise ValueError("ffn_bias: experts have no biases; set ffn_bias=False for an MoE model")
        self.d_model, self.d_ff, self.activation, self.moe = d_model, d_ff, activation, moe
        E, K = moe.n_experts, moe.top_k
        self.router = ROUTERS[moe.router](d_model, E, K, bias=moe.router_bias, jitter=moe.jitter,
                                          scale=moe.routed_scale, n_groups=moe.n_groups, topk_groups=moe.topk_groups)
        self.experts = EXPERTS[moe.expert_ffn](E, d_model, d_ff, activation)
        limited = moe.capacity_factor is not None or moe.expert_capacity is not None
        self.capacity = CapacityLimit(E, moe.capacity_factor, moe.expert_capacity) if limited else Dropless()
        self.dispatch = DISPATCHERS[moe.dispatch]
        self.shared = None
        if moe.n_shared:
            width = moe.n_shared * (moe.shared_d_ff or d_ff)
            self.shared = (GatedSharedExperts if moe.shared_gate else SharedExperts)(d_model, width, activation,
                                                                                     moe.expert_ffn)
        self.dropout = nn.Dropout(dropout)
        self._aux: Routing | torch.Tensor | None = None  # the last forward's routing until aux_loss is read
        self.last_routing: tuple[Routing, torch.Tensor | None] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        flat = x.reshape(B * T, D)
        native = fused_moe.forward(self, flat)  # inference on CPU: routing and experts in one native call
        if native is not None:
            (y, route), keep = native, None
        else:
            route = self.router(flat)
            K = route.experts.shape[-1]
            keep = self.capacity(route.experts.view(B, T, K))  # [B, T, K] bool, or None when dropless
            keep = keep.reshape(B * T, K) if keep is not None else None
            y = self.dispatch(flat, route.experts, route.weights, keep, self.experts)  # [N, D]
            if self.shared is not None:
                y = y + self.shared(flat)
        self._aux = route  # the auxiliary losses are computed when first read (inference never reads them)
        self.last_routing = (Routing(route.logits.detach(), route.probs.detach(), route.weights.detach(),
                                     route.experts), keep)
        return self.dropout(y.view(B, T, D))

    @property
    def aux_loss(self) -> torch.Tensor | None:
        """The last forward's auxiliary loss (balance + z, with their coefficients; None before any forward),
        computed from its routing on first read, with gradients to the router when the forward had them."""
        if isinstance(self._aux, Routing):
            route = self._aux
            terms = BALANCE_LOSSES[self.moe.balance](route)
            aux = self.moe.balance_coef * terms["balance"] + self.moe.z_coef * z_loss(route.logits)
            if "importance" in terms:
                aux = aux + self.moe.importance_weight() * terms["importance"]
            self._aux = aux
        return self._aux

    def stats(self) -> dict[str, torch.Tensor]:
        """Load statistics of the last forward (empty before the first)."""
        if self.last_routing is None:
            return {}
        return routing_stats(*self.last_routing, self.moe.n_experts)


@torch.no_grad()
def routing_stats(route: Routing, keep: torch.Tensor | None, E: int) -> dict[str, torch.Tensor]:
    """Per-expert load and routing entropy of one forward (detached tensors, no host sync)."""
    ones = torch.ones(route.experts.numel(), device=route.experts.device)
    routed = torch.zeros(E, device=ones.device).index_add_(0, route.experts.reshape(-1), ones)  # [E]
    kept = routed if keep is None else torch.zeros(E, device=ones.device).index_add_(
        0, route.experts.reshape(-1), keep.reshape(-1).float())
    p = route.probs
    return dict(tokens_per_expert=routed, kept_per_expert=kept,
                dropped_fraction=1.0 - kept.sum() / routed.sum().clamp(min=1.0),
                router_entropy=-(p * p.clamp(min=1e-20).log()).sum(-1).mean(),
                balance_loss=balance_loss(route.probs, route.experts), z_loss=z_loss(route.logits))


def moe_layers(model: nn.Module) -> list[tuple[str, MoE]]:
    """(name, module) of every MoE FFN in ``model``, in order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, MoE)]


def aux_loss(model: nn.Module, like: torch.Tensor) -> torch.Tensor:
    """Sum of the MoE layers' auxiliary losses from the last forward; 0 (shaped/placed like ``like``) if none."""
    total = like.new_zeros((), dtype=torch.float32)
    for _, m in moe_layers(model):
        if m.aux_loss is not None:
            total = total + m.aux_loss
    return total


def router_stats(model: nn.Module) -> list[dict]:
    """Expert-load statistics of every MoE layer from the last forward: ``layer`` (module name),
    ``tokens_per_expert`` (assignments before capacity, list of E), ``kept_per_expert``, ``dropped_fraction``,
    ``load_entropy`` (entropy of the load distribution, in nats; log E is perfectly even), ``max_load_ratio``
    (busiest expert's load / the uniform load), ``router_entropy`` (mean per-token entropy of the router),
    ``balance_loss`` and ``z_loss`` (before coefficients)."""
    out = []
    for name, m in moe_layers(model):
        s = m.stats()
        if not s:
            continue
        load = s["tokens_per_expert"]
        frac = load / load.sum().clamp(min=1.0)
        out.append(dict(layer=name, tokens_per_expert=load.tolist(), kept_per_expert=s["kept_per_expert"].tolist(),
                        dropped_fraction=float(s["dropped_fraction"]),
                        load_entropy=float(-(frac * frac.clamp(min=1e-20).log()).sum()),
                        max_load_ratio=float(frac.max() * len(frac)),
                        router_entropy=float(s["router_entropy"]), balance_loss=float(s["balance_loss"]),
                        z_loss=float(s["z_loss"])))
    return out


def moe_metrics(model: nn.Module) -> dict[str, float]:
    """A flat summary for training logs (means over MoE layers); empty for dense models."""
    stats = router_stats(model)
    if not stats:
        return {}
    keys = ("dropped_fraction", "load_entropy", "max_load_ratio", "router_entropy", "balance_loss", "z_loss")
    return {f"moe_{k}": sum(s[k] for s in stats) / len(stats) for k in keys}
