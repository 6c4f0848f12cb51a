"""Load-balancing losses of a mixture of experts, keyed by the ``moe.balance`` config value. Each maps one
:class:`~llmarch.nn.router.Routing` of N tokens to named terms (before coefficients); the MoE layer adds
``balance_coef * terms["balance"] + importance_coef * terms.get("importance", 0)``.

- ``switch``: E * sum_i f_i * P_i (Fedus et al. 2021, eq. 4), f the fraction of tokens routed to each expert and P
  the mean router probability.
- ``squared`` (the seed's variant): the squared deviation of the expert load from uniform, E * sum_i (l_i - 1/E)^2,
  plus an importance term, the squared coefficient of variation of each expert's summed gate weights (Shazeer et
  al. 2017, eq. 6). l_i is the fraction of the N*K assignments that went to expert i; counting is not
  differentiable, so l carries the gradient of the mean router probability (a straight-through estimate: its
  value is the count, its gradient that of P).
"""
from __future__ import annotations

from typing import Callable

import torch

from llmarch.nn.router import Routing, balance_loss
from llmarch.registry import Registry

BALANCE_LOSSES: Registry[Callable[[Routing], dict[str, torch.Tensor]]] = Registry("moe.balance")


def assignment_fractions(route: Routing) -> torch.Tensor:
    """[E] fraction of the N*K assignments that chose each expert (before any capacity drop); sums to one."""
    E = route.probs.shape[-1]
    ones = torch.ones(route.experts.numel(), device=route.probs.device, dtype=route.probs.dtype)
    counts = torch.zeros(E, device=ones.device, dtype=ones.dtype).index_add_(0, route.experts.reshape(-1), ones)
    return counts / route.experts.numel()


def importance(route: Routing) -> torch.Tensor:
    """[E] each expert's summed gate weights over the N tokens (0 where a token did not choose it)."""
    E = route.probs.shape[-1]
    gates = torch.zeros(route.weights.shape[0], E, device=route.weights.device, dtype=route.weights.dtype)
    return gates.scatter_add(1, route.experts, route.weights).sum(0)


@BALANCE_LOSSES.register("switch")
def switch_balance(route: Routing) -> dict[str, torch.Tensor]:
    return {"balance": balance_loss(route.probs, route.experts)}


@BALANCE_LOSSES.register("squared")
def squared_balance(route: Routing) -> dict[str, torch.Tensor]:
    E = route.probs.shape[-1]
    mean_prob = route.probs.mean(0)
    load = assignment_fractions(route) + mean_prob - mean_prob.detach()
    imp = importance(route)
    cv2 = imp.var(correction=0) / imp.mean().square().clamp(min=1e-20)
    return {"balance": E * (load - 1.0 / E).square().sum(), "importance": cv2}
