"""Token-choice routers for mixtures of experts: each token picks K of E experts and a weight for each.

All routers compute their logits and probabilities in fp32 whatever the model dtype ("selective precision",
Fedus et al. 2021, Switch Transformers). They differ only in how the K weights are formed:

- ``topk_softmax``: softmax over the K largest logits (Mixtral, Jiang et al. 2024); the weights sum to one.
- ``softmax_topk``: softmax over all E, keep the K largest probabilities as they are (Qwen1.5/2-MoE, DeepSeek-V2).
- ``softmax_topk_norm``: as above, then divided by their sum (Qwen3-MoE, DeepSeek-V3 style); sums to one.
- ``switch``: top-1 of the softmax, weighted by that probability (Fedus et al. 2021); requires K = 1.

Jitter (Switch): during training the router input is multiplied by uniform noise in [1 - eps, 1 + eps]; the
experts still see the clean input.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from llmarch.registry import Registry

ROUTERS: Registry[type["Router"]] = Registry("moe.router")


@dataclass
class Routing:
    """One routing decision for N tokens: logits/probs [N, E] fp32, weights [N, K] fp32, experts [N, K] long."""

    logits: torch.Tensor
    probs: torch.Tensor
    weights: torch.Tensor
    experts: torch.Tensor


class Router(nn.Module):
    """A linear scorer [N, D] -> logits [N, E]; subclasses turn logits into (weights, experts).

    ``fixed_k``: the only K a router supports (None = any); ``weights_sum_to_one``: whether the K weights of a
    token always sum to one (what sparse upcycling needs for an exact start)."""

    fixed_k: int | None = None
    weights_sum_to_one = False

    def __init__(self, d_model: int, n_experts: int, top_k: int, bias: bool = False, jitter: float = 0.0,
                 scale: float = 1.0, n_groups: int = 1, topk_groups: int | None = None):
        super().__init__()
        if self.fixed_k is not None and top_k != self.fixed_k:
            raise ValueError(f"moe.top_k: this router routes to exactly {self.fixed_k} expert(s), got {top_k}")
        self.n_experts, self.top_k, self.jitter = n_experts, top_k, jitter
        self.scale, self.n_groups, self.topk_groups = scale, n_groups, topk_groups
        self.proj = nn.Linear(d_model, n_experts, bias=bias)

    def forward(self, x: torch.Tensor) -> Routing:
        """x [N, D] (any dtype) -> Routing, all in fp32."""
        h = x.float()
        if self.training and self.jitter > 0:
            h = h * torch.empty_like(h).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
        bias = self.proj.bias.float() if self.proj.bias is not None else None
        logits = F.linear(h, self.proj.weight.float(), bias)  # [N, E]
        probs = logits.softmax(dim=-1)
        weights, experts = self.select(logits, self.limit_groups(probs))
        if self.scale != 1.0:
            weights = weights * self.scale
        return Routing(logits, probs, weights, experts)

    def limit_groups(self, probs: torch.Tensor) -> torch.Tensor:
        """Group-limited routing (DeepSeek-V2): probs [N, E] with every expert outside the token's ``topk_groups``
        best groups (ranked by their highest probability) set to 0; unchanged when ``n_groups`` is 1."""
        if self.n_groups == 1:
            return probs
        N, E = probs.shape
        grouped = probs.view(N, self.n_groups, E // self.n_groups)  # [N, groups, E / groups]
        best = grouped.amax(dim=-1).topk(self.topk_groups, dim=-1).indices  # [N, topk_groups]
        keep = torch.zeros(N, self.n_groups, dtype=torch.bool, device=probs.device).scatter_(1, best, True)
        return grouped.masked_fill(~keep[..., None], 0.0).view(N, E)

    def select(self, logits: torch.Tensor, probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


@ROUTERS.register("topk_softmax")
class TopKSoftmaxRouter(Router):
    """Top-K logits, then softmax over those K (Mixtral)."""

    weights_sum_to_one = True

    def select(self, logits, probs):
        top, experts = logits.topk(self.top_k, dim=-1)  # [N, K]
        return top.softmax(dim=-1), experts


@ROUTERS.register("softmax_topk")
class SoftmaxTopKRouter(Router):
    """Softmax over E, then the K largest probabilities unchanged (Qwen2-MoE, DeepSeek-V2)."""

    def select(self, logits, probs):
        return probs.topk(self.top_k, dim=-1)


@ROUTERS.register("softmax_topk_norm")
class SoftmaxTopKNormRouter(Router):
    """Softmax over E, the K largest probabilities, renormalised to sum to one."""

    weights_sum_to_one = True

    def select(self, logits, probs):
        top, experts = probs.topk(self.top_k, dim=-1)
        return top / top.sum(dim=-1, keepdim=True), experts


@ROUTERS.register("switch")
class SwitchRouter(Router):
    """Top-1 of the softmax, weighted by its probability (Switch Transformers, Fedus et al. 2021)."""

    fixed_k = 1

    def select(self, logits, probs):
        return probs.max(dim=-1, keepdim=True)


def balance_loss(probs: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """Switch load-balancing loss E * sum_i f_i * P_i (Fedus et al. 2021, eq. 4).

    probs [N, E] fp32; experts [N, K]. f_i = (tokens that chose expert i among their K) / N, counted before any
    capacity drop, so sum_i f_i = K; P_i = mean router probability of expert i. Uniform routing gives K.
    """
    N, E = probs.shape
    counts = torch.zeros(E, device=probs.device, dtype=probs.dtype)
    counts.index_add_(0, experts.reshape(-1), torch.ones(experts.numel(), device=probs.device, dtype=probs.dtype))
    return E * (counts / N * probs.mean(dim=0)).sum()


def z_loss(logits: torch.Tensor) -> torch.Tensor:
    """Router z-loss mean_n logsumexp(logits_n)^2 (Zoph et al. 2022, ST-MoE eq. 5). logits [N, E] fp32."""
    return logits.logsumexp(dim=-1).square().mean()
