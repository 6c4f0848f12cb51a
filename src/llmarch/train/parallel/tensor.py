"""Tensor parallelism (Megatron-LM, Shoeybi et al. 2019) through ``torch.distributed.tensor.parallel``: each
component declares a plan in ``TP_PLANS`` (keyed by its class name) and ``parallelize_module`` turns its weights
into DTensors on the ``tp`` mesh dim.

- attention: the fused ``qkv`` column-wise, ``out`` row-wise. ``qkv`` is one Linear laid out [q (H*Dh) | k (G*Dh) |
  v (G*Dh)]; a plain column split would give rank 0 all of q. So its rows are first re-laid out per rank
  [q_0 k_0 v_0 | q_1 k_1 v_1 | ...] (rank r: query heads r*H/T.., kv heads r*G/T..) and the module then sees H/T
  query and G/T kv heads. GQA keeps each query head with its kv head because heads are split in order.
- GLU: ``gate_up`` [gate (F) | up (F)] re-laid out [gate_0 up_0 | gate_1 up_1 | ...] column-wise, ``down`` row-wise.
  MLP: ``up`` column-wise, ``down`` row-wise.
- embedding: vocabulary-parallel (rows of the table split, outputs summed); LM head: column-wise over the
  vocabulary, its logits left sharded ([B, T, V/T] per rank as a DTensor) for a parallel cross-entropy
  (``loss_parallel``) that never gathers [B, T, V].
- sequence parallel (Korthikanti et al. 2022), optional: between the column/row pairs the residual stream stays
  split over the sequence ([B, T/tp, D] per rank), so norms, residual adds and dropout run on 1/tp of the
  tokens; the column-wise projections all-gather the sequence and the row-wise ones reduce-scatter it.

Re-laid-out parameters are recorded in a :class:`Relayout` kept on the model (``model.tp_layout``): full state
dicts are converted back to the natural layout when saved and forward again when loaded, so checkpoints and
exports never see the parallel layout.
"""
from __future__ import annotations

import contextlib
import logging

import torch
from torch import nn

from llmarch.registry import Registry

log = logging.getLogger(__name__)
TP_PLANS: Registry = Registry("tp_plan")


def kv_heads_of(rank: int, G: int, tp: int) -> range:
    """The kv heads tp rank ``rank`` holds: G/tp of its own, or (G < tp) the one its query heads read, which
    tp/G ranks then hold as copies."""
    return range(rank * G // tp, rank * G // tp + 1) if G < tp else range(rank * (G // tp), (rank + 1) * (G // tp))


def heads_layout(H: int, G: int, Dh: int, tp: int) -> torch.Tensor:
    """Row order [q_r k_r v_r for r] of a fused [q | k | v] projection: rank r's query and kv heads together
    (a kv head's rows repeated on each rank that holds a copy when G < tp)."""
    rows = torch.arange((H + 2 * G) * Dh).view(H + 2 * G, Dh)
    q, k, v = rows[:H], rows[H:H + G], rows[H + G:]
    h = H // tp
    parts = []
    for r in range(tp):
        g = kv_heads_of(r, G, tp)
        parts.append(torch.cat([q[r * h:(r + 1) * h], k[g.start:g.stop], v[g.start:g.stop]]))
    return torch.cat(parts).reshape(-1)


def halves_layout(F: int, tp: int) -> torch.Tensor:
    """Row order [gate_r up_r for r] of a fused [gate (F) | up (F)] projection."""
    f = F // tp
    return torch.cat([torch.cat([torch.arange(r * f, (r + 1) * f), torch.arange(F + r * f, F + (r + 1) * f)])
                      for r in range(tp)])


@TP_PLANS.register("Attention")
def attention_plan(m: nn.Module, tp: int, sp: bool):
    """(plan, {param: row order}); the module is told its local head counts."""
    order = heads_layout(m.n_heads, m.n_kv_heads, m.head_dim, tp)
    layout = {"qkv.weight": order} | ({"qkv.bias": order} if m.qkv.bias is not None else {})
    if m.n_kv_heads < tp:  # each rank holds a copy of its kv head: the local rows [q (H/T) | k (1) | v (1)]
        m.qkv.out_features = len(order)
    m.n_heads, m.n_kv_heads = m.n_heads // tp, max(m.n_kv_heads // tp, 1)
    return {"qkv": column(sp), "out": row(sp)}, layout


@TP_PLANS.register("GLU")
def glu_plan(m: nn.Module, tp: int, sp: bool):
    order = halves_layout(m.d_ff, tp)
    layout = {"gate_up.weight": order} | ({"gate_up.bias": order} if m.gate_up.bias is not None else {})
    m.d_ff //= tp
    return {"gate_up": column(sp), "down": row(sp)}, layout


@TP_PLANS.register("MLP")
def mlp_plan(m: nn.Module, tp: int, sp: bool):
    return {"up": column(sp), "down": row(sp)}, {}


@TP_PLANS.register("Embeddings")
def embedding_plan(m: nn.Module, tp: int, sp: bool):
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import RowwiseParallel

    return {"tokens": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1) if sp else Replicate())}, {}


@TP_PLANS.register("LMHead")
def lm_head_plan(m: nn.Module, tp: int, sp: bool):
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import ColwiseParallel

    return ColwiseParallel(input_layouts=Shard(1) if sp else Replicate(), output_layouts=Shard(-1),
                           use_local_output=False), {}


def norm_plan(m: nn.Module, tp: int, sp: bool):
    """Sequence parallel only: the norm runs on this rank's tokens, its weights replicated."""
    from torch.distributed.tensor.parallel import SequenceParallel

    return (SequenceParallel(use_local_output=True) if sp else None), {}


TP_PLANS.add("RMSNorm", norm_plan)
TP_PLANS.add("LayerNorm", norm_plan)


def column(sp: bool):
    """Column-wise: input replicated, or gathered from sequence shards under sequence parallel."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import ColwiseParallel

    return ColwiseParallel(input_layouts=Shard(1) if sp else Replicate())


def row(sp: bool):
    """Row-wise: partial sums all-reduced, or reduce-scattered into sequence shards under sequence parallel."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import RowwiseParallel

    return RowwiseParallel(output_layouts=Shard(1) if sp else Replicate())


class Relayout:
    """Row orders of re-laid-out parameters, keyed by their names in the unwrapped model."""

    def __init__(self, orders: dict[str, torch.Tensor]):
        self.orders = orders

    def to_natural(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """Rows back in the natural order (of repeated kv rows, one copy: the copies are kept equal)."""
        order = self.orders.get(name)
        if order is None or not torch.is_tensor(t) or t.dim() == 0 or t.shape[0] != len(order):
            return t
        out = t.new_empty((int(order.max()) + 1, *t.shape[1:]))
        out[order.to(t.device)] = t
        return out

    def to_parallel(self, name: str, t: torch.Tensor) -> torch.Tensor:
        order = self.orders.get(name)
        if order is None or not torch.is_tensor(t) or t.dim() == 0 or t.shape[0] != int(order.max()) + 1:
            return t
        return t[order.to(t.device)]

    def state_to_natural(self, model_state: dict, optim_state: dict | None = None) -> None:
        """In place: full (gathered) model and name-keyed optimizer state dicts back to the natural layout."""
        for k in list(model_state):
            model_state[k] = self.to_natural(k, model_state[k])
        for k, st in (optim_state or {}).get("state", {}).items():
            optim_state["state"][k] = {n: self.to_natural(k, v) for n, v in st.items()}

    def state_to_parallel(self, optim_state: dict) -> dict:
        """A copy of a full, name-keyed optimizer state in the parallel layout."""
        state = {k: {n: self.to_parallel(k, v) for n, v in st.items()} for k, st in optim_state["state"].items()}
        return dict(optim_state, state=state)


def apply_tensor_parallel(model: nn.Module, tp_mesh, sequence_parallel: bool = False) -> Relayout:
    """Shard ``model`` (unwrapped, on its device) over the 1-D ``tp_mesh`` by the components' plans, in place;
    ``sequence_parallel`` keeps the residual stream split over the sequence between them."""
    from torch.distributed.tensor.parallel import parallelize_module

    tp = tp_mesh.size()
    orders: dict[str, torch.Tensor] = {}
    replicated = set()
    tied = tied_pairs(model)
    for name, m in list(model.named_modules()):
        key = type(m).__name__
        if key not in TP_PLANS:
            if any(True for _ in m.parameters(recurse=False)):
                replicated.add(key)
            continue
        plan, layout = TP_PLANS[key](m, tp, sequence_parallel)
        if plan is None:
            continue
        params = dict(m.named_parameters())
        for pname, order in layout.items():
            with torch.no_grad():
                params[pname].data = params[pname].data[order.to(params[pname].device)].contiguous()
            orders[f"{name}.{pname}" if name else pname] = order
        parallelize_module(m, tp_mesh, plan)
    for (alias, attr), (source, source_attr) in tied.items():  # a tied head shares the embedding's vocab shards
        setattr(model.get_submodule(alias), attr, getattr(model.get_submodule(source), source_attr))
    if replicated:
        log.info("tensor parallel: %s stay replicated on every tp rank", sorted(replicated))
    layout = Relayout(orders)
    model.tp_layout = layout
    return layout


def tied_pairs(model: nn.Module) -> dict[tuple[str, str], tuple[str, str]]:
    """{(module, attribute) of an alias: (module, attribute) of the parameter it shares} (a tied LM head). Both
    sides are split the same way (vocabulary rows, ``Shard(0)``), so the alias is pointed at the sharded source."""
    seen: dict[int, tuple[str, str]] = {}
    pairs = {}
    for name, m in model.named_modules(remove_duplicate=False):
        for attr, p in m.named_parameters(recurse=False):
            if id(p) in seen and seen[id(p)][0] != name:
                pairs[(name, attr)] = seen[id(p)]
            seen.setdefault(id(p), (name, attr))
    return pairs


def loss_context(model: nn.Module):
    """The context the loss and its backward must run in: ``loss_parallel`` when the logits are vocab-sharded."""
    if getattr(model, "tp_layout", None) is None:
        return contextlib.nullcontext()
    from torch.distributed.tensor.parallel import loss_parallel

    return loss_parallel()


__all__ = ["TP_PLANS", "apply_tensor_parallel", "tied_pairs", "Relayout", "heads_layout", "halves_layout", "loss_context"]
