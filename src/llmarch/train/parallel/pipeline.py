"""Pipeline parallelism (GPipe, Huang et al. 2019; 1F1B, Narayanan et al. 2019) with ``torch.distributed.pipelining``:
a decoder's blocks are split by layers into ``pp`` contiguous stages (the first also embeds, the last also applies
the final norm and the LM head), and a schedule runs micro-batches through them, sending activations [b, T, D]
forward and their gradients back between neighbouring stages.

A stage holds the same parameter objects as the full model it was cut from (names ``decoder.layers.i`` ...), so
the optimizer of a rank takes exactly its stage's parameters and a full state is the union over stages.
"""
from __future__ import annotations

import torch
from torch import nn

from llmarch.nn.attention import AttnContext
from llmarch.registry import Registry

SCHEDULES: Registry = Registry("pp_schedule")


class DecoderStage(nn.Module):
    """Layers [lo, hi) of a decoder-only model. First stage: ids [B, T] long -> ...; middle: hidden [B, T, D] ->
    hidden [B, T, D]; last stage: ... -> logits [B, T, V]."""

    def __init__(self, model: nn.Module, lo: int, hi: int, n_layers: int):
        super().__init__()
        self.first, self.last = lo == 0, hi == n_layers
        self.offset = model.config.position_offset
        self.embed = model.embed if self.first else None
        self.layers = nn.ModuleList(model.decoder.layers[lo:hi])
        self.final_norm = model.decoder.final_norm if self.last else None
        self.lm_head = model.lm_head if self.last else None
        # the position scheme's tables (learned positions) belong to the first stage; later stages only rotate
        self.positions = model.decoder.positions if self.first else None
        self._positions = (model.decoder.positions,)  # unregistered: no parameter is held twice

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T = x.shape[:2]
        positions = self._positions[0]
        position_ids = torch.arange(T, device=x.device).expand(B, T) + self.offset
        h = self.embed(x, positions, position_ids) if self.first else x
        ctx = AttnContext(0, T, positions, position_ids, None, causal=True, device=x.device)
        for layer in self.layers:
            h = layer(h, ctx, None)
        if self.last:
            return self.lm_head(self.final_norm(h))
        return h


def stage_layers(n_layers: int, n_stages: int, stage: int) -> tuple[int, int]:
    """The layer range [lo, hi) of ``stage`` when n_layers are cut into n_stages equal stages."""
    per = n_layers // n_stages
    return stage * per, (stage + 1) * per


def build_pipeline(model: nn.Module, pp_mesh, n_microbatches: int, loss_fn, schedule: str = "1f1b",
                   scale_grads: bool = True, wrap=None):
    """This rank's stages of ``model`` (a decoder, unwrapped, on its device; an ``nn.ModuleList`` of
    :class:`DecoderStage` chunks, one per virtual stage) and the schedule that drives them.

    ``loss_fn(logits [b, T, V], labels [b, T])`` is the loss of one micro-batch; with ``scale_grads`` gradients
    are divided by the micro-batch count (a mean loss per micro-batch gives the mean of the whole batch), without
    it ``loss_fn`` must scale itself. Call ``schedule.step(ids, target=labels, losses=[])`` on every rank (ids on
    the rank of stage 0, labels on the rank of the last stage). ``interleaved`` gives each rank two stages, rank
    r holding stages r and r + pp (Narayanan et al. 2021). ``wrap(chunk)``, if given, runs on each chunk before
    its ``PipelineStage`` is made (FSDP2's ``fully_shard``, which the stage then drives)."""
    from torch.distributed.pipelining import PipelineStage

    cfg = model.config
    if cfg.kind != "decoder" or cfg.moe is not None:
        raise ValueError("pp: pipeline stages are cut from dense decoder stacks (kind decoder, no moe); use --pp 1")
    pp, rank = pp_mesh.size(), pp_mesh.get_local_rank()
    virtual = VIRTUAL_STAGES.get(schedule, 1)
    n_stages = pp * virtual
    if cfg.n_layers % n_stages:
        raise ValueError(f"n_layers: {cfg.n_layers} is not divisible by the {n_stages} stages of pp = {pp} with the "
                         f"{schedule!r} schedule; choose --pp or --pp-schedule to fit")
    device = next(model.parameters()).device
    chunks, stages = nn.ModuleList(), []
    for v in range(virtual):
        index = v * pp + rank
        chunk = DecoderStage(model, *stage_layers(cfg.n_layers, n_stages, index), cfg.n_layers)
        if wrap is not None:
            wrap(chunk)
        chunks.append(chunk)
        stages.append(PipelineStage(chunk, index, n_stages, device, group=pp_mesh.get_group()))
    chunks.first, chunks.last = index_holds(rank, 0, pp, virtual), index_holds(rank, n_stages - 1, pp, virtual)
    driver = SCHEDULES[schedule](stages if virtual > 1 else stages[0], n_microbatches, loss_fn=loss_fn,
                                 scale_grads=scale_grads)
    return chunks, driver


def index_holds(rank: int, stage: int, pp: int, virtual: int) -> bool:
    """Whether ``rank`` holds ``stage`` (stages are dealt round-robin over the pp ranks)."""
    return any(v * pp + rank == stage for v in range(virtual))


def stage_names(chunks: nn.Module, model: nn.Module) -> dict[str, str]:
    """The stage chunks' parameter and buffer names -> the whole model's (the names checkpoints use)."""
    full = {id(t): n for n, t in [*model.named_parameters(), *model.named_buffers()]}
    return {n: full[id(t)] for n, t in [*chunks.named_parameters(), *chunks.named_buffers()] if id(t) in full}


def local_optimizer_state(state: dict, names: dict[str, str]) -> dict:
    """A full optimizer state keyed by the whole model's names -> this stage's part, keyed by its own names."""
    back = {full: own for own, full in names.items()}
    return {"state": {back[k]: v for k, v in state["state"].items() if k in back},
            "param_groups": [dict(g, params=[back[n] for n in g["params"] if n in back])
                             for g in state["param_groups"]]}


VIRTUAL_STAGES = {"interleaved": 2}


def _register() -> None:
    from torch.distributed.pipelining import Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B

    SCHEDULES.add("gpipe", ScheduleGPipe)
    SCHEDULES.add("1f1b", Schedule1F1B)
    SCHEDULES.add("interleaved", ScheduleInterleaved1F1B)


_register()

__all__ = ["DecoderStage", "build_pipeline", "stage_layers", "stage_names", "local_optimizer_state", "SCHEDULES"]
