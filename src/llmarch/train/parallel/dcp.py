"""Sharded checkpoints in PyTorch Distributed Checkpoint (DCP) format: every rank writes its own shards of the
model and optimizer state (``get_state_dict``: DTensors of FSDP2 / TP / EP), and a load reshards them onto
whatever mesh the resuming run has (``set_state_dict``), so a run saved on dp=2 resumes on tp=2 and vice versa.

Tensor-parallel parameters that are re-laid out per rank (fused qkv, gate_up; see :mod:`.tensor`) are stored in
the natural layout (gathered and re-sharded one at a time), so the saved state does not depend on the tp degree.
:func:`export` writes one consolidated llmarch model directory (config.json + model.safetensors).
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn


def _relayout_sharded(state: dict, layout, convert: str) -> None:
    """In place: each re-laid-out entry (model weights, or optimizer moments keyed by parameter name) gathered,
    converted with ``layout.to_natural`` / ``to_parallel`` and re-sharded with its placements."""
    from torch.distributed.tensor import distribute_tensor

    def fix(name, t):
        if name not in layout.orders or not hasattr(t, "full_tensor") or t.dim() == 0:
            return t
        return distribute_tensor(getattr(layout, convert)(name, t.full_tensor()), t.device_mesh, t.placements)

    for k in list(state.get("model", {})):
        state["model"][k] = fix(k, state["model"][k])
    for k, st in state.get("optim", {}).get("state", {}).items():
        state["optim"]["state"][k] = {n: fix(k, v) for n, v in st.items()}


def _states(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, optimizer)
    return {"model": msd, "optim": osd}


def _layout(model: nn.Module):
    from llmarch.train.distributed import unwrap

    return getattr(unwrap(model), "tp_layout", None)


def save(model: nn.Module, optimizer: torch.optim.Optimizer, path: str | os.PathLike) -> Path:
    """Write this run's sharded state to the new directory ``path`` (refused if it exists). Collective; the
    directory appears only when every rank has written (a partial one is never left under ``path``)."""
    import torch.distributed.checkpoint as dcp

    path = Path(path)
    if path.exists():
        raise ValueError(f"checkpoint: {path} already exists; choose a new directory (nothing is overwritten)")
    partial = path.with_name(f".{path.name}.partial")
    if dist.get_rank() == 0:
        shutil.rmtree(partial, ignore_errors=True)
    dist.barrier()
    state = _states(model, optimizer)
    layout = _layout(model)
    if layout is not None:
        _relayout_sharded(state, layout, "to_natural")
    dcp.save(state, checkpoint_id=str(partial))
    dist.barrier()
    if dist.get_rank() == 0:
        os.replace(partial, path)
    dist.barrier()
    return path


def init_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Create the optimizer's state tensors (a step with zero gradients and lr 0) so a load has shards to fill."""
    saved = [g["lr"] for g in optimizer.param_groups]
    for g in optimizer.param_groups:
        g["lr"] = 0.0
        for p in g["params"]:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    for g, lr in zip(optimizer.param_groups, saved):
        g["lr"] = lr


def load(model: nn.Module, optimizer: torch.optim.Optimizer, path: str | os.PathLike) -> None:
    """Read a DCP checkpoint into ``model`` and ``optimizer`` on this run's mesh (any mesh it was saved on)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    if not Path(path).is_dir():
        raise FileNotFoundError(f"checkpoint: no DCP checkpoint directory at {path}")
    if not optimizer.state:
        init_optimizer_state(optimizer)
    state = _states(model, optimizer)
    layout = _layout(model)
    if layout is not None:
        _relayout_sharded(state, layout, "to_natural")
    dcp.load(state, checkpoint_id=str(path))
    if layout is not None:
        _relayout_sharded(state, layout, "to_parallel")
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


def export(model: nn.Module, optimizer: torch.optim.Optimizer, path: str | os.PathLike) -> Path | None:
    """One consolidated llmarch model directory (config.json + model.safetensors, natural layout) written by rank 0
    from a sharded model; every rank calls it. Returns the path on rank 0, None elsewhere."""
    from llmarch.checkpoint import save_model
    from llmarch.model import build
    from llmarch.train.distributed import full_state, unwrap

    if Path(path).exists():
        raise ValueError(f"export: {path} already exists; choose a new directory (nothing is overwritten)")
    model_state, _ = full_state(model, optimizer)
    if dist.get_rank() != 0:
        return None
    plain = build(unwrap(model).config)
    plain.load_state_dict(model_state)
    return save_model(plain, path)


__all__ = ["save", "load", "export", "init_optimizer_state"]
