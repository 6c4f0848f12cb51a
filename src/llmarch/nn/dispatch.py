"""Dispatch: send each token to its K experts, run them, and combine the outputs with the routing weights.

Every dispatcher computes out[n] = sum_k keep[n, k] * weights[n, k] * expert_{experts[n, k]}(x[n]) and differs
only in how the experts run:

- ``loop``: one slice per chosen expert, in a Python loop (the readable reference; HF's "eager" form).
- ``padded``: assignments sorted by expert, packed into a zero-padded [E, C, D] batch (C = the busiest expert's
  load) and run as two batched matmuls; no loop over experts.
- ``grouped``: assignments sorted by expert and run with ``torch._grouped_mm`` over ragged groups: no padding,
  empty groups skipped (so a decode step reads only the experts it hit), weight gradients written in place.
- ``sliced``: assignments sorted by expert, one plain matmul per expert's contiguous slice.
- ``auto``: ``sliced`` for inference over packed expert banks (``llmarch.infer.layout.pack_weights``), for
  fp32 / bf16 CPU inference, and for any bf16 on a CPU without bf16 products (``llmarch.nn.widened``: its
  products widened to fp32, where ``grouped`` and ``padded`` would run torch's generic bf16 kernel, ~100x
  slower over the bank); for bf16 CPU training where llmarch's bf16 few-row kernels build (AVX-512 BF16) while
  experts average at most ``BF16_SLICED_MAX_ROWS`` rows; for fp32 CPU training: where BLAS is the fp32 route and
  on more than one thread ``padded`` once experts average ``PADDED_MIN_ROWS`` rows and padding costs at most
  ``PADDED_MAX_WASTE``, else, where llmarch's few-row kernels build (``llmarch.native.plain``,
  ``llmarch.nn.banks``), ``sliced``; else on CPU (bf16 aside), ``sliced`` once experts average >=
  ``SLICED_MIN_ROWS`` rows
  (``..._ONEDNN`` in fp32, whose sliced products and their backward run through oneDNN; the E Python iterations
  then cost microseconds against the matmuls), else ``grouped``; off CPU, ``grouped`` where torch has it for the
  dtype (CUDA: bf16), else ``padded``.
  Chosen by ``benchmarks/moe.py``.

Capacity (Switch/GShard, Lepikhin et al. 2020): each expert takes at most C assignments per sequence; choices are
served in routing order -- all first choices in token order, then all second choices, ... -- and the rest are
dropped (their weight is zero, so the token passes through the block's residual unchanged).
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from llmarch.native import plain
from llmarch.nn import banks, dense, widened
from llmarch.nn.device import host_reads_ok
from llmarch.registry import Registry

Dispatcher = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | None", nn.Module], torch.Tensor]
DISPATCHERS: Registry[Dispatcher] = Registry("moe.dispatch")


@DISPATCHERS.register("loop")
def loop_dispatch(x, experts, weights, keep, bank):
    """x [N, D], experts [N, K] long, weights [N, K] fp32, keep [N, K] bool or None -> [N, D]."""
    out = torch.zeros_like(x)
    for e in experts.unique().tolist():  # the experts chosen by at least one token
        chosen = experts == e
        if keep is not None:
            chosen = chosen & keep
        token, k = chosen.nonzero(as_tuple=True)
        if token.numel():
            y = bank.one(e, x.index_select(0, token))
            out.index_add_(0, token, y * weights[token, k, None].to(x.dtype))
    return out


def _sort_by_expert(experts: torch.Tensor, keep: torch.Tensor | None, E: int, host_counts: bool = True):
    """Kept assignments sorted by expert. Returns (order [A] flat assignment ids, expert of each [A],
    counts [E] per expert, the counts as a list of ints); dropped assignments are left out.

    ``host_counts=False`` (accelerators, grouped dispatch): when nothing is dropped, nothing is read back to the
    host (the list is None): the counts come from a comparison sum, not ``bincount``, which sizes its output
    from the data's maximum (a host sync on CUDA)."""
    flat = experts.reshape(-1)
    if keep is not None:
        flat = flat.masked_fill(~keep.reshape(-1), E)  # a sentinel expert, sorted last and cut off
    if keep is None and not host_counts:
        counts = (flat[:, None] == torch.arange(E, device=flat.device)).sum(0)  # [E]
        order = flat.argsort(stable=True)
        return order, flat[order], counts, None
    counts = torch.bincount(flat, minlength=E + 1)[:E]
    counts_list = counts.tolist()
    order = flat.argsort(stable=True)[:sum(counts_list)]
    return order, flat[order], counts, counts_list


@DISPATCHERS.register("padded")
def padded_dispatch(x, experts, weights, keep, bank):
    """Sort assignments by expert, pad every expert's group to C rows, run ``bank.batched`` on [E, C, D]."""
    N, D = x.shape
    K, E = experts.shape[1], bank.n_experts
    order, by_expert, counts, counts_list = _sort_by_expert(experts, keep, E)
    C = max(counts_list)
    if C == 0:
        return torch.zeros_like(x)
    starts = counts.cumsum(0) - counts  # [E] first sorted position of each expert
    slot = torch.arange(order.numel(), device=x.device) - starts[by_expert]  # [A] row within its expert
    row = by_expert * C + slot  # [A] row in the flattened [E * C] batch
    token = order // K
    packed = x.new_zeros(E * C, D).index_copy(0, row, x.index_select(0, token))  # [E*C, D]
    y = bank.batched(packed.view(E, C, D)).view(E * C, D)
    w = weights.reshape(-1)[order].to(x.dtype)
    return torch.zeros_like(x).index_add(0, token, y[row] * w[:, None])


@DISPATCHERS.register("grouped")
def grouped_dispatch(x, experts, weights, keep, bank):
    """Sort assignments by expert and run ragged groups with ``torch._grouped_mm`` (no padding)."""
    K = experts.shape[1]
    order, _, counts, counts_list = _sort_by_expert(experts, keep, bank.n_experts, host_counts=host_reads_ok(x))
    if counts_list is not None and (not counts_list or sum(counts_list) == 0):
        return torch.zeros_like(x)
    token = order // K
    y = bank.grouped(x.index_select(0, token), counts.cumsum(0).to(torch.int32))  # [A, D]
    w = weights.reshape(-1)[order].to(x.dtype)
    return torch.zeros_like(x).index_add(0, token, y * w[:, None])


SLICED_MIN_ROWS = 512
# fp32 on CPU the sliced products run through oneDNN, backward included (llmarch.nn.banks.bank_linear): without
# gradients sliced beat grouped at every size (benchmarks/moe.py layer: 1.2-1.6x at 1-16 tokens); with them from
# ~1 row per expert (top-2 of 8, forward + backward: 4 tokens 1.08x, 8 1.22x, 16 1.34x; 1-2 tokens 0.96x). On an
# AVX2-only host, where the products run on torch's BLAS (dense.ONEDNN_FP32 off), sliced and grouped were level
# (grouped / sliced step time 0.93-1.06 at 1-512 tokens; sliced on oneDNN there: 0.84-0.89 from 4 tokens)
SLICED_MIN_ROWS_ONEDNN = 1


# fp32 CPU training on more than one thread (hosts whose fp32 route is torch's BLAS): padded, whose batched
# products split the experts across threads, once experts average PADDED_MIN_ROWS rows and the padded batch is at
# most PADDED_MAX_WASTE times the assignments. BLAS splits each expert's small product across the threads poorly:
# on an AVX2 EPYC at 2 threads, sliced gained 1.24x over 1 thread at 128 tokens, padded 1.9x; forward + backward
# padded / sliced 1.37-1.76x at 32-128 tokens (8-32 rows per expert, batch 1.2-1.4x the assignments), 1.04-1.35x at
# 256-2048, 0.81-0.94x at 16-24 tokens; at one thread 0.70-0.87x (benchmarks/moe.py --threads 2). Not where
# oneDNN is the fp32 route (an AVX-512 EPYC at 2 threads: padded / sliced 0.4-0.9x at 1-128 tokens)
PADDED_MIN_ROWS = 8
PADDED_MAX_WASTE = 1.5

# bf16 CPU training where llmarch's bf16 few-row kernels build (AVX-512 BF16, llmarch.native.plain): sliced while
# experts average at most this many rows, else grouped. Zen 5 EPYC, one thread, top-2 of 8, forward + backward
# sliced / grouped: 1.31x at 1 token, 1.68x at 16; with the register tiles past a few rows (nineteenth round),
# grouped / sliced 1.38x at 32 tokens (8 rows), 1.21x at 64, 1.12x at 128, 1.05x at 256 (64 rows), 1.01x at 512,
# 0.96x at 1024 (benchmarks/moe.py)
BF16_SLICED_MAX_ROWS = 64


def _padding_pays(experts: torch.Tensor, keep: torch.Tensor | None, E: int) -> bool:
    flat = experts.reshape(-1) if keep is None else experts.reshape(-1)[keep.reshape(-1)]
    if flat.numel() < PADDED_MIN_ROWS * E:
        return False
    return E * int(torch.bincount(flat, minlength=E).max()) <= PADDED_MAX_WASTE * flat.numel()


def grouped_mm_supports(x: torch.Tensor) -> bool:
    """Whether ``torch._grouped_mm`` runs for tensors like ``x`` (CPU kernels take any float dtype; CUDA's bf16)."""
    return hasattr(torch, "_grouped_mm") and (x.device.type == "cpu" or x.dtype == torch.bfloat16)


@DISPATCHERS.register("sliced")
def sliced_dispatch(x, experts, weights, keep, bank):
    """Sort assignments by expert and run each expert's contiguous slice with a plain matmul."""
    K = experts.shape[1]
    order, _, _, counts_list = _sort_by_expert(experts, keep, bank.n_experts)
    if sum(counts_list) == 0:
        return torch.zeros_like(x)
    token = order // K
    # index_select, not x[token]: its backward is index_add (CPU, 256 x 512 bf16 rows: 20 us against the accumulating
    # index_put of x[token]'s, 172 us; forward 5 against 45 us), as in the other dispatchers
    y = bank.sliced(x.index_select(0, token), counts_list)  # [A, D]
    w = weights.reshape(-1)[order].to(x.dtype)
    return torch.zeros_like(x).index_add(0, token, y * w[:, None])


@DISPATCHERS.register("auto")
def auto_dispatch(x, experts, weights, keep, bank):
    """On CPU: ``sliced`` for inference and (fp32) for training from ~1 row per expert, else ``grouped``;
    elsewhere ``grouped`` where supported, else ``padded`` (the module docstring has the measurements)."""
    if bank.packed_ready(x):  # inference over packed experts (llmarch.nn.dense.pack): sliced at every size
        return sliced_dispatch(x, experts, weights, keep, bank)
    host = host_reads_ok(x)  # sliced reads the per-expert counts into Python: free on the CPU, eager only
    onednn = host and x.dtype == torch.float32 and dense.ONEDNN
    training = torch.is_grad_enabled() and x.requires_grad
    if host and widened.takes(x):
        # bf16 on a CPU without bf16 products: sliced over fp32 products (llmarch.nn.widened); grouped and
        # padded run torch's generic bf16 kernel there (~100x slower over the bank's layout)
        return sliced_dispatch(x, experts, weights, keep, bank)
    if host and not training and dense.onednn_dtype(x.dtype):
        # inference over unpacked banks: sliced ahead of grouped at 1-2048 tokens (fp32 1.2-1.6x; bf16 1.1-1.6x)
        return sliced_dispatch(x, experts, weights, keep, bank)
    if host and training and x.dtype == torch.float32:
        if torch.get_num_threads() > 1 and not dense.ONEDNN_FP32 and _padding_pays(experts, keep, bank.n_experts):
            return padded_dispatch(x, experts, weights, keep, bank)
        if plain.available():
            # sliced's products and gradients through llmarch's few-row kernels where experts have few rows
            # (llmarch.nn.banks; forward + backward against grouped: AVX2 EPYC 1.5x at 1 token, 1.7x at 16;
            # AVX-512 EPYC, oneDNN's fp32 route, 1.1-1.3x at 1, 1.4-2.0x at 16: benchmarks/moe.py)
            return sliced_dispatch(x, experts, weights, keep, bank)
    if host and training and banks.bf16_kernels(x) and experts.numel() <= BF16_SLICED_MAX_ROWS * bank.n_experts:
        return sliced_dispatch(x, experts, weights, keep, bank)  # llmarch's bf16 few-row kernels (llmarch.nn.banks)
    rows = SLICED_MIN_ROWS_ONEDNN if onednn else SLICED_MIN_ROWS
    # bf16 training on CPU (without llmarch's bf16 kernels, or more rows): grouped over the column-major bank
    # (llmarch.nn.experts) is ahead of or level with sliced on oneDNN's products at every size measured (2048
    # tokens, forward + backward: 16.3k tokens/s against 11.2k sliced over unbind views; 0.9-1.07x for sliced
    # products straight on oneDNN)
    many = experts.numel() >= rows * bank.n_experts
    if host and x.dtype != torch.bfloat16 and many:
        return sliced_dispatch(x, experts, weights, keep, bank)
    if grouped_mm_supports(x):
        return grouped_dispatch(x, experts, weights, keep, bank)
    return padded_dispatch(x, experts, weights, keep, bank)


def keep_within_capacity(experts: torch.Tensor, n_experts: int, capacity: int) -> torch.Tensor:
    """experts [B, T, K] -> keep [B, T, K] bool: an assignment is kept if fewer than ``capacity`` earlier
    assignments of its sequence went to the same expert, in routing order (rank k = 0 for all tokens, then 1, ...)."""
    B, T, K = experts.shape
    in_order = experts.transpose(1, 2).reshape(B, K * T)  # [B, K*T] routing order
    onehot = F.one_hot(in_order, n_experts)  # [B, K*T, E]
    queue_pos = (onehot.cumsum(dim=1) * onehot).sum(dim=-1)  # [B, K*T] 1-based place in its expert's queue
    return (queue_pos <= capacity).view(B, K, T).transpose(1, 2)


class Dropless(nn.Module):
    """Every assignment is served (the default for decoder LLMs)."""

    def forward(self, experts: torch.Tensor) -> None:
        return None


class CapacityLimit(nn.Module):
    """At most C assignments per expert per sequence: C = ``expert_capacity`` if given, else
    ceil(capacity_factor * T * K / E)."""

    def __init__(self, n_experts: int, capacity_factor: float | None = None, expert_capacity: int | None = None):
        super().__init__()
        if capacity_factor is None and expert_capacity is None:
            raise ValueError("moe.capacity_factor: give a capacity factor or moe.expert_capacity (or use Dropless)")
        self.n_experts, self.capacity_factor, self.expert_capacity = n_experts, capacity_factor, expert_capacity

    def capacity(self, T: int, K: int) -> int:
        if self.expert_capacity is not None:
            return self.expert_capacity
        return math.ceil(self.capacity_factor * T * K / self.n_experts)

    def forward(self, experts: torch.Tensor) -> torch.Tensor:
        """experts [B, T, K] -> keep [B, T, K] bool."""
        B, T, K = experts.shape
        return keep_within_capacity(experts, self.n_experts, self.capacity(T, K))
