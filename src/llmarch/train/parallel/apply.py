"""Wrap a training model for a mesh: tensor parallel on ``tp``, expert parallel over ``dp``, then data parallel
(FSDP2 per block and root on the ``dp`` dim, composing with TP into a 2-D mesh; or DDP). Only data parallelism
(``tp = ep = pp = 1``) takes the plain DDP / FSDP2 path of :mod:`llmarch.train.distributed`."""
from __future__ import annotations

import logging

import torch
import torch.distributed as dist
from torch import nn

from llmarch.config import ModelConfig
from llmarch.train.parallel.mesh import MeshSpec, build_mesh, spec_for

log = logging.getLogger(__name__)


def mesh_spec(cfg: ModelConfig, world: int, tc) -> MeshSpec:
    """The validated mesh of a run's settings (``tc``: a TrainConfig)."""
    spec = spec_for(cfg, world, dp=tc.dp, tp=tc.tp, ep=tc.ep, pp=tc.pp)
    if spec.pp > 1:
        check_pipeline(cfg, spec, tc)
    if spec.tp > 1 and spec.dp > 1 and tc.parallel != "fsdp":
        raise ValueError("parallel: tensor parallel with several data-parallel ranks composes with FSDP2 on a 2-D "
                         "mesh; add --parallel fsdp")
    if getattr(tc, "sequence_parallel", False) and (spec.tp == 1 or tc.seq_len % spec.tp):
        raise ValueError(f"sequence_parallel: splits the sequence over the tp ranks; it needs --tp > 1 and --seq-len "
                         f"divisible by tp (tp {spec.tp}, seq_len {tc.seq_len})")
    if spec.ep > 1 and tc.parallel != "ddp":
        raise ValueError("parallel: expert parallel shards experts over the data-parallel ranks and keeps the other "
                         "weights replicated; use --parallel ddp with --ep")
    return spec


def check_pipeline(cfg: ModelConfig, spec: MeshSpec, tc) -> None:
    """What the loop's pipeline step supports: causal-LM pre-training of a dense decoder, composed with data
    parallel (DDP-style gradient sums); micro-batches come from one batch per data-parallel rank."""
    from llmarch.train.parallel.pipeline import SCHEDULES, VIRTUAL_STAGES

    if spec.tp > 1 or spec.ep > 1:
        raise ValueError("pp: pipeline stages compose with data parallel (--parallel ddp or fsdp) in the training "
                         "loop; use --tp 1 --ep 1 with --pp")
    if tc.pp_schedule not in SCHEDULES:
        raise ValueError(f"pp_schedule: {tc.pp_schedule!r} is not one of {sorted(SCHEDULES)}; set --pp-schedule")
    stages = spec.pp * VIRTUAL_STAGES.get(tc.pp_schedule, 1)
    if cfg.n_layers % stages:
        raise ValueError(f"n_layers: {cfg.n_layers} is not divisible by the {stages} stages of pp = {spec.pp} with "
                         f"the {tc.pp_schedule!r} schedule; choose --pp or --pp-schedule to fit")
    m = microbatches(tc)
    if tc.batch_size % m or (tc.pp_schedule == "1f1b" and m < spec.pp):
        raise ValueError(f"microbatches: {m} must divide --batch-size {tc.batch_size} (and be >= pp = {spec.pp} "
                         "for 1f1b); set --microbatches")
    unsupported = [f for f in ("teacher", "index", "lora", "qat", "curriculum_start", "init_from")
                   if getattr(tc, f, None) is not None]
    if tc.grad_accum != 1 or tc.precision == "fp16" or tc.objective not in (None, "causal_lm") or unsupported:
        raise ValueError("pp: the pipeline step trains causal_lm with --grad-accum 1 (use --microbatches), fp32 or "
                         f"bf16, without {unsupported or 'teacher, index, lora, qat, curriculum, --from'}; use --pp 1")


def microbatches(tc) -> int:
    return tc.microbatches or tc.pp


def parallelize(model: nn.Module, cfg: ModelConfig, env, tc) -> nn.Module:
    """``model`` (plain, on ``env.device``) wrapped for the mesh of ``tc``; sets ``env.dp_rank`` / ``env.dp_world``
    (ranks of one tp group read the same batch)."""
    from llmarch.train import distributed as D

    spec = mesh_spec(cfg, env.world, tc)
    if spec.trivial:
        return D.wrap(model, env, tc.parallel)
    mesh = build_mesh(spec, env.device.type)
    env.dp_rank, env.dp_world = mesh["dp"].get_local_rank(), spec.dp
    if spec.pp > 1:  # the trainer holds this rank's stages (with their schedule as .pipeline)
        from llmarch.train.parallel.pipeline_run import PipelineRun

        log.info("mesh: pp %d x dp %d, %s schedule", spec.pp, spec.dp, tc.pp_schedule)
        return PipelineRun(model, mesh, tc.pp_schedule, microbatches(tc), tc.parallel == "fsdp").chunks
    model.parallel_mesh = mesh
    if spec.tp > 1:
        from llmarch.train.parallel.tensor import apply_tensor_parallel

        from llmarch.train.parallel.kv_copies import attach_kv_copies

        apply_tensor_parallel(model, mesh["tp"], getattr(tc, "sequence_parallel", False))
        attach_kv_copies(model, mesh, cfg.kv_heads, cfg.dh)  # G < T: copies of kv heads, gradients summed
    if spec.ep > 1:
        from llmarch.train.parallel.expert import apply_expert_parallel, expert_parallel_names

        apply_expert_parallel(model, mesh["dp"])
        nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
            model, expert_parallel_names(model))
    if spec.dp > 1:
        if tc.parallel == "fsdp":
            from torch.distributed.fsdp import fully_shard

            from llmarch.train.optim import block_lists

            for layers in block_lists(model):
                for block in layers:
                    fully_shard(block, mesh=mesh["dp"])
            fully_shard(model, mesh=mesh["dp"])
        else:
            model = nn.parallel.DistributedDataParallel(
                model, process_group=mesh["dp"].get_group(),
                device_ids=[env.device.index] if env.device.type == "cuda" else None)
    log.info("mesh %s: dp %d x tp %d (ep %d)", dict(zip(mesh.mesh_dim_names, mesh.shape)), spec.dp, spec.tp, spec.ep)
    return model


def clip_grad_norm(params, max_norm: float, row_weights: dict | None = None) -> torch.Tensor:
    """Global gradient-norm clip over plain and DTensor gradients on any meshes (torch's own clip refuses to mix
    them): each gradient's norm is reduced over its mesh, then combined. ``row_weights`` (id(param) -> weight of
    each local row, e.g. 1/copies on copied kv rows) weights a sharded gradient's squares. Returns the total norm
    (before clip)."""
    params = [p for p in params if p.grad is not None]
    grads = [p.grad for p in params]
    squares = []
    for p, g in zip(params, grads):
        w = (row_weights or {}).get(id(p))
        if w is not None:  # a Shard(0) DTensor gradient: weighted local squares, summed over its whole mesh
            local = g.to_local().float()
            sq = (local.pow(2).reshape(local.shape[0], -1).sum(1) * w).sum()
            for dim in range(g.device_mesh.ndim):
                dist.all_reduce(sq, group=g.device_mesh.get_group(dim))
            squares.append(sq)
            continue
        n = torch.linalg.vector_norm(g, dtype=torch.float32)
        squares.append((n.full_tensor() if hasattr(n, "full_tensor") else n) ** 2)
    total = torch.stack(squares).sum().sqrt() if squares else torch.zeros(())
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(coef.to(g.device))
    return total


def sharded(model: nn.Module, env) -> bool:
    """Whether a run's state lives in shards (FSDP2, tensor / expert / pipeline parallel on several processes):
    its checkpoints are then written by every rank with DCP."""
    from llmarch.train.distributed import unwrap

    inner = unwrap(model)
    return env.world > 1 and (hasattr(inner, "parallel_mesh") or hasattr(inner, "set_requires_gradient_sync"))


def stage_names(model: nn.Module) -> dict[str, str] | None:
    """A pipeline stage's parameter names -> the whole model's (None for a whole model)."""
    from llmarch.train.distributed import unwrap

    return getattr(unwrap(model), "global_names", None)


__all__ = ["parallelize", "mesh_spec", "clip_grad_norm", "sharded", "stage_names"]
