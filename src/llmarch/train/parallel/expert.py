"""Expert parallelism (GShard, Lepikhin et al. 2020): the E routed experts of every MoE layer are split over the
``ep`` ranks (rank r holds experts [r*E/ep, (r+1)*E/ep) as a DTensor shard of the stacked bank), and tokens travel
to their experts and back with two ``all_to_all_single`` collectives (autograd-aware, so the backward runs the
mirror exchanges).

Routing and capacity are decided on the token's own rank before dispatch, per sequence, so which assignments are
kept or dropped is exactly what one process decides. Each rank routes its own (data-parallel) tokens; expert
gradients are averaged over the ep ranks like data-parallel gradients are, so every parameter sees the gradient of
the global mean loss.
"""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch import nn

from llmarch.nn.dispatch import _sort_by_expert
from llmarch.nn.moe import moe_layers


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; gradient times ``scale`` backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        return g * ctx.scale, None


@contextlib.contextmanager
def local_bank(bank: nn.Module, scale: float):
    """Within the block, the bank's DTensor parameters read as their local shards [E/ep, ...] (gradients scaled by
    ``scale`` on their way back to the DTensors)."""
    saved = dict(bank._parameters)
    try:
        for name, p in saved.items():
            bank._parameters[name] = _ScaleGrad.apply(p.to_local(), scale)
        yield bank
    finally:
        bank._parameters.update(saved)


class AllToAllDispatch:
    """A dispatcher (the protocol of :mod:`llmarch.nn.dispatch`) whose bank holds only this rank's experts.

    x [N, D], experts [N, K] (global ids), weights [N, K] fp32, keep [N, K] bool or None -> [N, D]."""

    def __init__(self, group, n_experts: int):
        self.group, self.n_experts = group, n_experts
        self.ep = dist.get_world_size(group)

    def __call__(self, x, experts, weights, keep, bank):
        from torch.distributed._functional_collectives import all_to_all_single_autograd as all_to_all

        K, E, ep = experts.shape[1], self.n_experts, self.ep
        El = E // ep
        order, _, counts, _ = _sort_by_expert(experts, keep, E)  # kept assignments sorted by expert = by rank
        token = order // K
        recv_counts = torch.empty_like(counts)
        dist.all_to_all_single(recv_counts, counts, group=self.group)  # [ep * El]: source rank i, local expert e
        send_split = counts.view(ep, El).sum(1).tolist()
        recv_split = recv_counts.view(ep, El).sum(1).tolist()
        recv = all_to_all(x.index_select(0, token), recv_split, send_split, self.group)  # [A_recv, D]
        local = torch.repeat_interleave(torch.arange(El, device=x.device).repeat(ep), recv_counts)  # [A_recv]
        perm = local.argsort(stable=True)  # rows grouped by local expert
        local_counts = recv_counts.view(ep, El).sum(0).tolist()
        with local_bank(bank, 1.0 / ep) as b:
            y = b.sliced(recv[perm], local_counts) if sum(local_counts) else recv * 0
        y = y[perm.argsort()]  # back to arrival order
        back = all_to_all(y, send_split, recv_split, self.group)  # [A, D]
        w = weights.reshape(-1)[order].to(x.dtype)
        return torch.zeros_like(x).index_add(0, token, back * w[:, None])


def apply_expert_parallel(model: nn.Module, ep_mesh) -> int:
    """Shard every MoE layer's routed experts over the 1-D ``ep_mesh`` and dispatch with all-to-all, in place.
    Returns the number of MoE layers."""
    from torch.distributed.tensor import Shard, distribute_tensor

    layers = moe_layers(model)
    for _, moe in layers:
        bank = moe.experts
        for name, p in list(bank.named_parameters(recurse=False)):
            bank.register_parameter(name, nn.Parameter(distribute_tensor(p.data, ep_mesh, [Shard(0)]),
                                                       requires_grad=p.requires_grad))
        moe.dispatch = AllToAllDispatch(ep_mesh.get_group(), moe.moe.n_experts)
    return len(layers)


def expert_parallel_names(model: nn.Module) -> list[str]:
    """Names of the expert-sharded parameters (left out of DDP's gradient all-reduce)."""
    from torch.distributed.tensor import DTensor

    return [n for n, p in model.named_parameters() if isinstance(p, DTensor)]


__all__ = ["apply_expert_parallel", "AllToAllDispatch", "expert_parallel_names", "local_bank"]
