"""Pipeline parallel inside the training loop: this rank's stages of the decoder (:mod:`.pipeline`), driven by a
``torch.distributed.pipelining`` schedule, composed with data parallel over the ``dp`` dim of the mesh: replicas
whose gradients are summed (DDP-style), or FSDP2 shards of each stage (the schedule drives their reduce-scatter).

Loss: each micro-batch's summed cross-entropy times 1 / (target count of the whole global batch), gradients not
rescaled by the schedule, so the gradients of the stages are those of the global mean loss once the data-parallel
replicas of a stage have summed theirs (one all-reduce of the flattened gradients, as DDP does; under FSDP2, whose
reduce-scatter averages, the loss is scaled by dp instead). The gradient
norm for clipping sums the squares over the stages (the pp ranks); the loss is reported by the last stage.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from llmarch.train.objectives import ce_sum
from llmarch.train.parallel.pipeline import build_pipeline, stage_names


class PipelineRun:
    """Builds the stage chunks of ``model`` for ``mesh`` (dims pp, dp) and runs one step or one evaluation.
    ``chunks`` is what the trainer holds as its model: the optimizer takes its parameters, checkpoints its state
    under the whole model's names (``chunks.global_names``)."""

    def __init__(self, model: nn.Module, mesh, schedule: str, microbatches: int, fsdp: bool = False):
        self.dp = dp = mesh["dp"].size()
        self.fsdp = fsdp and dp > 1  # FSDP2 shards each stage over dp and reduce-scatters (a mean) itself
        self.dp_group = mesh["dp"].get_group() if dp > 1 else None
        self.pp_group = mesh["pp"].get_group()
        self.scale = 1.0

        def shard(chunk: nn.Module) -> None:
            from torch.distributed.fsdp import fully_shard

            for layer in chunk.layers:
                fully_shard(layer, mesh=mesh["dp"])
            fully_shard(chunk, mesh=mesh["dp"])

        self.chunks, self.schedule = build_pipeline(model, mesh["pp"], microbatches, self._loss, schedule,
                                                    scale_grads=False, wrap=shard if self.fsdp else None)
        self.chunks.global_names = stage_names(self.chunks, model)
        self.chunks.parallel_mesh = mesh
        self.chunks.pipeline = self

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return ce_sum(logits, labels) * self.scale

    def _run(self, batch, train: bool) -> float:
        """Micro-batches of ``batch`` through the stages; the scaled loss summed on the last stage, 0 elsewhere."""
        ids, labels = batch.inputs["input_ids"], batch.labels["lm"]
        losses: list[torch.Tensor] = []
        run = self.schedule.step if train else self.schedule.eval
        run(ids if self.chunks.first else None, target=labels if self.chunks.last else None, losses=losses)
        return float(sum(float(x.detach()) for x in losses)) if self.chunks.last else 0.0

    def train_step(self, micro: list, optimizer: torch.optim.Optimizer, clip: float, autocast) -> tuple:
        """Forward, backward, data-parallel gradient sum, clip and optimizer step of one global batch (one
        micro-batch list entry per data-parallel rank). Returns (this rank's share of the mean loss, grad norm)."""
        (batch,) = micro
        count = torch.tensor(float(batch.counts["lm"]), dtype=torch.float64)
        if self.dp_group is not None:
            dist.all_reduce(count, group=self.dp_group)
        boost = self.dp if self.fsdp else 1  # FSDP2's mean over dp, undone: the sum of the ranks' shares
        self.scale = boost / count.item()
        with autocast():
            loss = self._run(batch, train=True) / boost
        params = [p for p in self.chunks.parameters() if p.grad is not None]
        if self.dp_group is not None and not self.fsdp and params:
            grads = [p.grad for p in params]
            flat = torch._utils._flatten_dense_tensors(grads)
            dist.all_reduce(flat, group=self.dp_group)
            for g, synced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
                g.copy_(synced)
        norm = None
        if clip > 0:
            sq = sum((full(torch.linalg.vector_norm(p.grad, dtype=torch.float32)) ** 2 for p in params),
                     torch.zeros(()))
            dist.all_reduce(sq, group=self.pp_group)
            norm = sq.sqrt()
            coef = (clip / (norm + 1e-6)).clamp(max=1.0)
            for p in params:
                p.grad.mul_(coef.to(p.grad.device))
            norm = float(norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss, norm

    @torch.no_grad()
    def eval_sums(self, batch, autocast) -> tuple[float, float]:
        """(summed loss, target count) of ``batch`` on the last stage; (0, 0) on the others."""
        self.scale = 1.0
        with autocast():
            total = self._run(batch, train=False)
        return total, float(batch.counts["lm"]) if self.chunks.last else 0.0


def full(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's value reduced over its mesh (a sharded gradient's norm); a plain tensor as it is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


__all__ = ["PipelineRun"]
