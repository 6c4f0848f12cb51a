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


def stage_layers(n_layers: int, pp: int, stage: int) -> tuple[int, int]:
    """The layer range [lo, hi) of ``stage`` when n_layers are cut into pp equal stages."""
    per = n_layers // pp
    return stage * per, (stage + 1) * per


def build_pipeline(model: nn.Module, pp_mesh, n_microbatches: int, loss_fn, schedule: str = "1f1b"):
    """This rank's stage of ``model`` (a decoder, unwrapped, on its device) and the schedule that drives it.

    ``loss_fn(logits [b, T, V], labels [b, T])`` is the mean loss of one micro-batch; gradients are averaged over
    micro-batches (equal sizes give the mean of the whole batch). Call ``schedule.step(ids, target=labels,
    losses=[])`` on every stage (the first passes the ids, the last the labels)."""
    from torch.distributed.pipelining import PipelineStage

    cfg = model.config
    if cfg.kind != "decoder" or cfg.moe is not None:
        raise ValueError("pp: pipeline stages are cut from dense decoder stacks (kind decoder, no moe); use --pp 1")
    pp, stage = pp_mesh.size(), pp_mesh.get_local_rank()
    lo, hi = stage_layers(cfg.n_layers, pp, stage)
    module = DecoderStage(model, lo, hi, cfg.n_layers)
    device = next(model.parameters()).device
    pipe = PipelineStage(module, stage, pp, device, group=pp_mesh.get_group())
    return module, SCHEDULES[schedule](pipe, n_microbatches, loss_fn=loss_fn)


def _register() -> None:
    from torch.distributed.pipelining import Schedule1F1B, ScheduleGPipe

    SCHEDULES.add("gpipe", ScheduleGPipe)
    SCHEDULES.add("1f1b", Schedule1F1B)


_register()

__all__ = ["DecoderStage", "build_pipeline", "stage_layers", "SCHEDULES"]
