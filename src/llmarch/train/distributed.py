"""Many processes (launched by ``torchrun``): process group, DDP or FSDP2 wrapping, collectives, full state dicts.

DDP (Li et al. 2020) keeps a full replica per rank and all-reduces gradients; FSDP2 (``fully_shard``, per block
then the root; Zhao et al. 2023) shards parameters, gradients and optimizer state. Backend: gloo on CPU, nccl on
GPU. Single-process runs use the same functions, which then do nothing.
"""
from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from llmarch.nn.device import reuse_host_memory
from llmarch.registry import Registry

log = logging.getLogger(__name__)
WRAPPERS: Registry = Registry("parallel")


@dataclass
class DistEnv:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    dp_rank: int | None = None  # rank among the data-parallel ranks (ranks of one tp group read the same batch)
    dp_world: int | None = None  # data-parallel degree; None = rank / world (no tensor parallel)

    def __post_init__(self) -> None:
        self.dp_rank = self.rank if self.dp_rank is None else self.dp_rank
        self.dp_world = self.world if self.dp_world is None else self.dp_world

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str = "auto") -> DistEnv:
    """Join the process group torchrun describes in the environment (WORLD_SIZE > 1), else one process. A CPU
    process keeps its freed host memory for the next step (``llmarch.nn.device.reuse_host_memory``)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    use_cuda = torch.cuda.is_available() and device in ("auto", "cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: cuda was asked for but torch sees no GPU; use --device cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    else:
        reuse_host_memory()
    if world <= 1:
        return DistEnv(device=dev)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    env = DistEnv(dist.get_rank(), dist.get_world_size(), local_rank, dev)
    log.debug("rank %d/%d on %s", env.rank, env.world, dev)
    return env


def shutdown() -> None:
    """Leave the process group together: without the barrier a rank that exits first can close its gloo
    connections under a peer still tearing down, which then aborts."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    if env.enabled:
        dist.barrier()


def all_reduce_sum(env: DistEnv, values: list[float]) -> list[float]:
    """Elementwise sum of a list of numbers over ranks (fp64)."""
    if not env.enabled:
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=env.device)
    dist.all_reduce(t)
    return t.tolist()


def gather_uint8(env: DistEnv, t: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's copy of an equal-sized uint8 tensor, in rank order (on the CPU)."""
    if not env.enabled:
        return [t.cpu()]
    t = t.to(env.device)
    out = [torch.empty_like(t) for _ in range(env.world)]
    dist.all_gather(out, t)
    return [o.cpu() for o in out]


@WRAPPERS.register("ddp")
def wrap_ddp(model: nn.Module, env: DistEnv) -> nn.Module:
    return nn.parallel.DistributedDataParallel(model, device_ids=[env.device.index] if env.device.type == "cuda"
                                               else None)


@WRAPPERS.register("fsdp")
def wrap_fsdp(model: nn.Module, env: DistEnv) -> nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from llmarch.train.optim import block_lists

    mesh = init_device_mesh(env.device.type, (env.world,))
    for layers in block_lists(model):
        for block in layers:
            fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def wrap(model: nn.Module, env: DistEnv, parallel: str) -> nn.Module:
    """DDP or FSDP2 around ``model`` when there are several ranks; the model itself otherwise."""
    wrapper = WRAPPERS[parallel]
    return wrapper(model, env) if env.enabled else model


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def grad_sync(model: nn.Module, sync: bool):
    """Skip the gradient all-reduce on all but the last micro-batch of an accumulation."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return contextlib.nullcontext() if sync else model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(sync)
    return contextlib.nullcontext()


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Full (unsharded) model and optimizer state dicts on rank 0, CPU, keyed by parameter name. Collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer,
                                              options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    layout = getattr(unwrap(model), "tp_layout", None)  # tensor parallel: back to the natural layout
    if layout is not None:
        layout.state_to_natural(model_state, optim_state)
    return model_state, optim_state


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a full, name-keyed optimizer state (as :func:`full_state` gives) into a plain, DDP or FSDP2 model's
    optimizer; every rank passes the same full state. Collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    layout = getattr(unwrap(model), "tp_layout", None)
    if layout is not None:
        state = layout.state_to_parallel(state)
    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
    for group in optimizer.param_groups:  # hyper-parameter tuples (betas) come back as lists
        group.update({k: tuple(v) for k, v in group.items() if k != "params" and isinstance(v, list)})


__all__ = ["DistEnv", "init_distributed", "wrap", "unwrap", "grad_sync", "full_state", "load_optimizer_state",
           "all_reduce_sum", "barrier", "gather_uint8", "shutdown", "WRAPPERS"]
