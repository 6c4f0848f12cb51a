"""Sharded checkpoints with PyTorch Distributed Checkpoint (DCP), stored as safetensors: every rank writes its own
shards of the model and optimizer state (``get_state_dict``: DTensors of FSDP2 / TP / EP, a pipeline stage's
parameters) and a load reshards them onto whatever mesh the resuming run has (``set_state_dict``), so a run saved
on dp=2 resumes on tp=2, on pp=2 or on one process.

Files: DCP's safetensors storage (``HuggingFaceStorageWriter`` with ``save_distributed``): one
``shard-*.safetensors`` per rank, each tensor with its offsets in the file's metadata; the reader rebuilds the
global layout from those headers, so nothing is unpickled. Keys are ``model.<name>`` and
``optim.<name>.<state>`` (Adam moments, step) with the parameter names of the whole unwrapped model, whatever
pipeline stage, FSDP2 or DDP wrapper holds them.

Tensor-parallel parameters that are re-laid out per rank (fused qkv, gate_up; see :mod:`.tensor`) are stored in
the natural layout (gathered and re-sharded one at a time), so the saved state does not depend on the tp degree.
"""
from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

MODEL, OPTIM = "model.", "optim."


def _relayout_sharded(state: dict, layout, convert: str) -> None:
    """In place: each re-laid-out entry (model weights, or optimizer moments keyed by parameter name) gathered,
    converted with ``layout.to_natural`` / ``to_parallel`` and re-sharded with its placements."""
    from torch.distributed.tensor import distribute_tensor

    def fix(name, t):
        if name not in layout.orders or not hasattr(t, "full_tensor") or t.dim() == 0:
            return t
        return distribute_tensor(getattr(layout, convert)(name, t.full_tensor()), t.device_mesh, t.placements)

    for k in list(state["model"]):
        state["model"][k] = fix(k, state["model"][k])
    for k, st in state["optim"].get("state", {}).items():
        state["optim"]["state"][k] = {n: fix(k, v) for n, v in st.items()}


def _layout(model: nn.Module):
    from llmarch.train.distributed import unwrap

    return getattr(unwrap(model), "tp_layout", None)


def _states(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Model and optimizer state dicts (sharded where the run is), natural layout, keyed by parameter name."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, optimizer)
    state = {"model": msd, "optim": osd}
    layout = _layout(model)
    if layout is not None:
        _relayout_sharded(state, layout, "to_natural")
    return state


def _aliases(model_state: dict) -> dict[str, str]:
    """{alias: source} of entries that are the same tensor (a tied head): stored once."""
    seen, aliases = {}, {}
    for k, v in model_state.items():
        local = v.to_local() if hasattr(v, "to_local") else v
        key = (local.data_ptr(), tuple(v.shape))
        if key in seen and local.numel():
            aliases[k] = seen[key]
        else:
            seen[key] = k
    return aliases


def _flat(state: dict, names: dict[str, str] | None) -> dict[str, torch.Tensor]:
    """``{model.<name>: t, optim.<name>.<key>: t}`` with global names (``names`` maps a stage's own names)."""
    rename = (lambda n: names.get(n, n)) if names else (lambda n: n)
    tied = _aliases(state["model"])
    flat = {MODEL + rename(k): v for k, v in state["model"].items() if k not in tied}
    for k, st in state["optim"].get("state", {}).items():
        flat.update({f"{OPTIM}{rename(k)}.{key}": v for key, v in st.items() if torch.is_tensor(v)})
    return flat


def _unflat(state: dict, flat: dict, names: dict[str, str] | None) -> None:
    """In place: the tensors ``flat`` now holds back into ``state``."""
    rename = (lambda n: names.get(n, n)) if names else (lambda n: n)
    tied = _aliases(state["model"])
    for k in state["model"]:
        state["model"][k] = flat[MODEL + rename(tied.get(k, k))]
    for k, st in state["optim"].get("state", {}).items():
        for key, v in st.items():
            if torch.is_tensor(v):
                st[key] = flat[f"{OPTIM}{rename(k)}.{key}"]


def write(model: nn.Module, optimizer: torch.optim.Optimizer, directory: str | os.PathLike,
          names: dict[str, str] | None = None) -> None:
    """Every rank writes its shards into the existing ``directory`` (collective; no atomicity: see :func:`save`)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    dcp.save(_flat(_states(model, optimizer), names), storage_writer=HuggingFaceStorageWriter(str(directory), save_distributed=True))


def save(model: nn.Module, optimizer: torch.optim.Optimizer, path: str | os.PathLike,
         names: dict[str, str] | None = None) -> Path:
    """Write this run's sharded state to the new directory ``path`` (refused if it exists). Collective; the
    directory appears only when every rank has written (a partial one is never left under ``path``)."""
    path = Path(path)
    if path.exists():
        raise ValueError(f"checkpoint: {path} already exists; choose a new directory (nothing is overwritten)")
    partial = path.with_name(f".{path.name}.partial")
    if dist.get_rank() == 0:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    dist.barrier()
    write(model, optimizer, partial, names)
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


def _reader(path: Path):
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    if not path.is_dir() or not any(path.glob("*.safetensors")):
        raise FileNotFoundError(f"checkpoint: no sharded (DCP safetensors) checkpoint in {path}")
    return HuggingFaceStorageReader(str(path))


def _read(flat: dict, reader, no_dist: bool) -> None:
    """DCP load into ``flat`` in place; ``no_dist``: this process alone (no collectives, and without DCP's warning
    that there is no process group, which is then the intent)."""
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(flat, storage_reader=reader, no_dist=no_dist)


def load(model: nn.Module, optimizer: torch.optim.Optimizer, path: str | os.PathLike,
         names: dict[str, str] | None = None) -> None:
    """Read a sharded checkpoint into ``model`` and ``optimizer`` on this run's mesh (any mesh it was saved on, or
    one process). Collective when a process group is up."""
    from torch.distributed.checkpoint.state_dict import set_state_dict

    reader = _reader(Path(path))
    if not optimizer.state:
        init_optimizer_state(optimizer)
    state = _states(model, optimizer)
    flat = _flat(state, names)
    _read(flat, reader, no_dist=not dist.is_initialized())
    _unflat(state, flat, names)
    layout = _layout(model)
    if layout is not None:
        _relayout_sharded(state, layout, "to_parallel")
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


def read_model_state(path: str | os.PathLike, model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole (consolidated) model state of a sharded checkpoint, read in this process alone into tensors
    shaped like ``model``'s (a plain model); tied aliases are left out."""
    from llmarch.checkpoint import state_for_saving

    state = {k: torch.empty_like(v) for k, v in state_for_saving(model).items()}
    flat = {MODEL + k: v for k, v in state.items()}
    _read(flat, _reader(Path(path)), no_dist=True)
    return {k: flat[MODEL + k] for k in state}


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


__all__ = ["save", "write", "load", "read_model_state", "export", "init_optimizer_state"]
