"""The training loop: setup (data, tokenizer, model, optimizer, resume), optimizer steps with gradient
accumulation, periodic validation, metrics, checkpoints and samples at the end.

The global batch of step ``s`` is samples ``[s * N, (s + 1) * N)`` of the seeded data stream, N = batch_size *
grad_accum * world, whatever the number of processes; the loss is normalised by the target count of the whole
global batch. So 1 process with 2 micro-batches and 2 processes with 1 each train the same model.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from llmarch.config import ModelConfig
from llmarch.model import build
from llmarch.nn.device import host_reads_ok, read_back, to_device
from llmarch.nn.moe import moe_metrics
from llmarch.train import checkpoints as ckpt
from llmarch.train import distributed as D
from llmarch.train.expert_load import ExpertLoad
from llmarch.train.finite import check_record, check_shards, check_weights
from llmarch.train.metrics import Metrics
from llmarch.train.objectives import Batch, objective_for
from llmarch.train.parallel.apply import clip_grad_norm, parallelize, sharded, stage_names
from llmarch.train.parallel.tensor import loss_context
from llmarch.train.optim import (Precision, WarmupCosine, enable_activation_checkpointing, keep_implementation,
                                 make_optimizer)
from llmarch.train.posttrain import initial_model, prepare_for, write_adapter
from llmarch.train.resume import check_resumable
from llmarch.train.retrieving import with_retrieval
from llmarch.train.rundir import RunDirectory
from llmarch.train.settings import TrainConfig
from llmarch.train.setup import fit_model_config
from llmarch.train.teacher import with_teacher

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    step: int
    loss: float
    val_losses: list[tuple[int, float]] = field(default_factory=list)
    checkpoint: Path | None = None
    samples: list[tuple[str, str]] = field(default_factory=list)  # (prompt, continuation)
    config: ModelConfig | None = None


class Trainer:
    def __init__(self, model_cfg: ModelConfig, tc: TrainConfig):
        self.tc = tc
        self.env = D.init_distributed(tc.device)
        self.out = Path(tc.out)
        self.out.mkdir(parents=True, exist_ok=True)
        resume_from, self.state = ckpt.find_resume(self.out, tc.resume, self.env.is_main)
        if resume_from is not None:  # refuse a changed run before tokenising the corpus
            check_resumable(self.state, model_cfg, tc, resume_from, self.env.world)
        tc, self.prep = prepare_for(tc, model_cfg, self.env, resume_from)  # a text corpus, or example rows
        self.tc = tc
        self.tokenizer = self.prep.tokenizer
        cfg, notes = fit_model_config(model_cfg, self.tokenizer, tc)
        objective = with_retrieval(objective_for(tc.objective, cfg, self.tokenizer, nsp=tc.nsp), tc, cfg,
                                   self.tokenizer)  # --index: RETRO neighbours in every batch; --teacher: distil
        self.objective = with_teacher(objective, tc, cfg, self.tokenizer, self.env.device)
        cfg = self.objective.fit_config(cfg)  # a reward model's scalar head
        self.cfg = cfg
        if self.env.is_main:
            for note in notes:
                log.info("model %s", note)

        torch.manual_seed(tc.seed)  # every rank builds the same initial weights
        model = initial_model(cfg, tc, build)  # random, or --from weights; --lora adapters
        self.objective.attach(model)  # before resumed weights: a DPO reference is the starting model
        self.train_seqs, self.val_seqs = self.objective.sources(self.prep.splits, tc)
        self.aliases = ckpt.tied_aliases(model)
        if self.state is not None and self.state["model"] is not None:  # a sharded one loads after parallelize
            missing, unexpected = model.load_state_dict(self.state["model"], strict=False)
            if set(missing) - self.aliases or unexpected:
                raise ckpt.CheckpointError(f"{resume_from}: checkpoint weights do not fit the model: missing "
                                           f"{missing}, unexpected {unexpected}")
        if tc.qat:  # the forward sees quantized weights; the float weights train (straight-through)
            from llmarch.infer.lowbit import prepare_qat

            prepare_qat(model, tc.qat, tc.qat_group_size)
        if tc.grad_checkpointing:
            enable_activation_checkpointing(model)
        self.model = parallelize(model.to(self.env.device), cfg, self.env, tc)  # mesh: DDP/FSDP2 (+ TP, EP)
        self.expert_load = ExpertLoad(self.model)  # empty (falsy) for dense models
        self.optimizer = make_optimizer(self.model, tc.lr, tc.weight_decay, (tc.beta1, tc.beta2), tc.eps)
        self.schedule = WarmupCosine(self.optimizer, tc.lr, tc.warmup, tc.steps, tc.min_lr_ratio)
        self.precision = Precision(tc.precision, self.env.device.type)
        # masking draws, reseeded per micro-batch from its first sample's index: the same masks whatever the
        # number of processes or micro-batches
        self.generator = torch.Generator().manual_seed(tc.seed * 7919 + self.env.rank)
        torch.manual_seed(tc.seed + 1 + self.env.dp_rank)  # dropout: the same masks on the ranks of a tp group
        self.step, self.consumed = 0, 0
        if self.state is not None:
            try:
                self._restore(self.state)
            except (KeyError, TypeError, RuntimeError, ValueError) as e:
                raise ckpt.CheckpointError(f"{resume_from}: cannot restore the training state: "
                                           f"{type(e).__name__}: {e}") from None
        self.metrics = Metrics(self.out, self.env.is_main, tc.steps, self.step, tc.progress)
        if self.env.is_main:
            (self.out / "train.json").write_text(json.dumps(tc.to_dict(), indent=1) + "\n")
            cfg.to_file(self.out / "model_config.json")

    # --- resume ---------------------------------------------------------------------------------------------
    def _restore(self, loaded: dict) -> None:
        s = loaded["state"]
        if loaded["sharded"] is not None:  # weights and optimizer state resharded onto this run's mesh
            from llmarch.train.parallel import dcp

            dcp.load(self.model, self.optimizer, loaded["sharded"], stage_names(self.model))
        elif stage_names(self.model) is not None:  # a full checkpoint resumed on pipeline stages
            from llmarch.train.parallel.pipeline import local_optimizer_state

            D.load_optimizer_state(self.model, self.optimizer,
                                   local_optimizer_state(loaded["optimizer"], stage_names(self.model)))
        else:
            D.load_optimizer_state(self.model, self.optimizer, loaded["optimizer"])
        keep_implementation(self.optimizer)
        self.schedule.load_state_dict(s["schedule"])
        self.step, self.consumed = s["step"], s["consumed"]
        if self.precision.scaler is not None and "scaler" in s:
            self.precision.scaler.load_state_dict(s["scaler"])
        rng = loaded["rng"]
        r = self.env.rank if f"rank{self.env.rank}.cpu" in rng else 0
        if r != self.env.rank:
            log.warning("the checkpoint has no RNG state for rank %d (world size changed); using rank 0's",
                        self.env.rank)
        torch.set_rng_state(rng[f"rank{r}.cpu"])
        self.generator.set_state(rng[f"rank{r}.masking"])
        if torch.cuda.is_available() and f"rank{r}.cuda" in rng:
            torch.cuda.set_rng_state(rng[f"rank{r}.cuda"])

    # --- one optimizer step ---------------------------------------------------------------------------------
    def _micro_batches(self) -> list[Batch]:
        tc, env = self.tc, self.env
        length = tc.seq_len_at(self.step) + self.objective.extra_tokens
        out = []
        for m in range(tc.grad_accum):
            start = self.consumed + (m * env.dp_world + env.dp_rank) * tc.batch_size
            chunk = self.train_seqs.take(start, tc.batch_size, length)
            out.append(self.objective.make_batch(chunk, self.generator.manual_seed(sample_seed(tc.seed, start))))
        self.consumed += tc.batch_size * tc.grad_accum * env.dp_world
        return out

    def _forward(self, batch: Batch):
        inputs = {k: to_device(v, self.env.device) for k, v in batch.inputs.items()}  # pinned + async on CUDA
        labels = {k: to_device(v, self.env.device) for k, v in batch.labels.items()}
        with self.precision.autocast():
            out = self.model(**inputs, **self.objective.model_options)
        return out, self.objective.loss_sums(out, Batch(inputs, labels, batch.counts))

    def _pipeline_step(self, pipe) -> dict:
        """One optimizer step through the pipeline stages (train/parallel/pipeline_run.py)."""
        micro = self._micro_batches()
        lr = self.schedule.lr
        self.model.train()
        loss, grad_norm = pipe.train_step(micro, self.optimizer, self.tc.clip, self.precision.autocast)
        self.schedule.step()
        self.step += 1
        record = {"step": self.step, "loss": D.all_reduce_sum(self.env, [loss])[0], "lr": lr}
        if grad_norm is not None:
            record["grad_norm"] = grad_norm
        record["tokens"] = sum(b.tokens for b in micro) * self.env.dp_world
        return record

    def train_step(self) -> dict:
        pipe = getattr(self.model, "pipeline", None)
        if pipe is not None:
            return self._pipeline_step(pipe)
        tc, env = self.tc, self.env
        micro = self._micro_batches()
        terms = sorted(micro[0].counts)
        counts = dict(zip(terms, D.all_reduce_sum(env, [sum(b.counts[t] for b in micro) for t in terms])))
        self.model.train()
        sums = {t: 0.0 for t in terms}
        aux_total = 0.0
        per_micro = []  # loss terms (+ aux) of each micro-batch as device scalars: read back once, after the step
        for i, batch in enumerate(micro):
            with D.grad_sync(self.model, i == len(micro) - 1), loss_context(D.unwrap(self.model)):
                out, s = self._forward(batch)
                if self.expert_load:
                    self.expert_load.update()
                loss = sum(s[t] * env.world / counts[t] for t in terms)
                aux = out.aux_loss
                with_aux = aux.requires_grad or not host_reads_ok(aux) or float(aux) != 0.0  # adding 0: same grads
                if with_aux:
                    loss = loss + aux.float() / len(micro)
                self.precision.backward(loss)
            per_micro.append([s[t].detach() for t in terms] + ([aux.detach()] if with_aux else []))
        D.grad_sync(self.model, True)
        copies = getattr(D.unwrap(self.model), "kv_copies", None)  # tp > kv heads: sum the copies' gradients
        if copies is not None:
            copies.sync(D.unwrap(self.model))
        self.precision.unscale(self.optimizer)
        grad_norm = None
        if tc.clip > 0:
            if hasattr(D.unwrap(self.model), "parallel_mesh"):
                grad_norm = clip_grad_norm(self.model.parameters(), tc.clip, copies and copies.row_weights())
            else:
                grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), tc.clip)
            grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        lr = self.schedule.lr
        self.precision.step(self.optimizer)
        self.optimizer.zero_grad(set_to_none=True)
        self.schedule.step()
        scalars = [v for row in per_micro for v in row] + ([grad_norm] if grad_norm is not None else [])
        values = iter(read_back(scalars))  # the step's one host read, once the whole step is queued
        for row in per_micro:
            for t in terms:
                sums[t] += next(values)
            if len(row) > len(terms):
                aux_total += next(values) / len(micro)
        if grad_norm is not None:
            grad_norm = next(values)
        self.step += 1
        reduced = D.all_reduce_sum(env, [sums[t] for t in terms] + [aux_total])
        record = {"step": self.step, "loss": sum(reduced[i] / counts[t] for i, t in enumerate(terms)), "lr": lr}
        if len(terms) > 1:
            record.update({f"loss_{t}": reduced[i] / counts[t] for i, t in enumerate(terms)})
        if reduced[-1]:
            record["aux_loss"] = reduced[-1] / env.world
        if grad_norm is not None:
            record["grad_norm"] = grad_norm
        record["tokens"] = sum(b.tokens for b in micro) * env.dp_world
        return record

    def _objective_metrics(self, prefix: str = "") -> dict:
        """The objective's own metrics (accuracy, rewards, ...) as means over all ranks."""
        sums = self.objective.pop_metrics()
        names = sorted(sums)
        totals = D.all_reduce_sum(self.env, [sums[n][0] for n in names] + [sums[n][1] for n in names])
        return {prefix + n: totals[i] / max(totals[len(names) + i], 1e-9) for i, n in enumerate(names)}

    def _log_experts(self, record: dict) -> None:
        """MoE load of the last training forward into the record (means over layers); the summed load since the
        last log into RUN/expert_load.json (read by ``llmarch plot experts``)."""
        record.update(moe_metrics(self.model))
        if self.env.is_main:
            self.expert_load.write(self.out, self.step)
        else:
            self.expert_load.reset()

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean loss of the main term over ``eval_batches`` fixed validation batches (same masks every time)."""
        tc, env = self.tc, self.env
        self.model.eval()
        gen = torch.Generator()
        total = count = 0.0
        for i in range(math.ceil(tc.eval_batches / env.dp_world)):
            start = (i * env.dp_world + env.dp_rank) * tc.batch_size
            chunk = self.val_seqs.batch(start, tc.batch_size)
            batch = self.objective.make_batch(chunk, gen.manual_seed(sample_seed(tc.seed + 12345, start)))
            pipe = getattr(self.model, "pipeline", None)
            if pipe is not None:  # the loss of the batch on the last stage
                loss, n = pipe.eval_sums(batch, self.precision.autocast)
            else:
                with loss_context(D.unwrap(self.model)):
                    _, s = self._forward(batch)
                loss, n = float(s[self.objective.main_term]), batch.counts[self.objective.main_term]
            total += loss
            count += n
        total, count = D.all_reduce_sum(env, [total, count])
        self.val_metrics = self._objective_metrics("val_")
        self.model.train()
        return total / count

    # --- checkpoints and the run ----------------------------------------------------------------------------
    def save(self) -> Path | None:
        local = {"cpu": torch.get_rng_state(), "masking": self.generator.get_state()}
        if torch.cuda.is_available():
            local["cuda"] = torch.cuda.get_rng_state()
        rng = {f"rank{r}.{k}": t for k, v in local.items() for r, t in enumerate(D.gather_uint8(self.env, v))}
        state = {"step": self.step, "consumed": self.consumed, "schedule": self.schedule.state_dict(),
                 "train": self.tc.to_dict(), "world": self.env.world}
        if self.precision.scaler is not None:
            state["scaler"] = self.precision.scaler.state_dict()
        if sharded(self.model, self.env):  # every rank writes its shards: nothing is gathered
            from llmarch.train.parallel import dcp

            shards_here = {n: p.to_local() if hasattr(p, "to_local") else p for n, p in self.model.named_parameters()}
            check_shards(shards_here, self.step, lambda n: D.all_reduce_sum(self.env, [n])[0])

            def shards(d):
                dcp.write(self.model, self.optimizer, d, stage_names(self.model))
            path = ckpt.save_sharded_checkpoint(self.out, self.step, self.cfg, shards, rng, state, self.tokenizer,
                                                self.tc.keep_last, self.env.is_main)
            D.barrier(self.env)
            return path
        model_state, optim_state = D.full_state(self.model, self.optimizer)  # collective
        path = None
        if self.env.is_main:
            weights = {k: v for k, v in model_state.items() if k not in self.aliases}
            check_weights(weights, self.step)  # never a NaN checkpoint (which keep_last would keep instead)
            path = ckpt.save_checkpoint(self.out, self.step, self.cfg, weights, optim_state, rng, state,
                                        self.tokenizer, self.tc.keep_last)
        D.barrier(self.env)
        return path

    def run(self) -> TrainResult:
        tc = self.tc
        last = tc.stop_at or tc.steps
        result = TrainResult(self.step, float("nan"), config=self.cfg)
        t0, tokens = time.perf_counter(), 0
        try:
            while self.step < last:
                record = self.train_step()
                check_record(record, self.out, self.precision.scaler is not None)  # NaN -> stop, say why
                tokens += record.pop("tokens")
                self.metrics.advance()
                result.loss = record["loss"]
                evaluate = self.step % tc.eval_every == 0 or self.step == last
                if evaluate or self.step % tc.log_every == 0:  # throughput of training only, not eval or saving
                    record["tokens_per_s"] = tokens / max(time.perf_counter() - t0, 1e-9)
                    if self.expert_load:  # before evaluation, whose forwards would replace the routing
                        self._log_experts(record)
                    record.update(self._objective_metrics())  # accuracy, rewards, ... since the last log
                    if evaluate:
                        record["val_loss"] = self.evaluate()
                        record["val_ppl"] = math.exp(min(record["val_loss"], 50.0))
                        record.update(self.val_metrics)
                        result.val_losses.append((self.step, record["val_loss"]))
                    self.metrics.log(record)
                if self.step % tc.save_every == 0 or self.step == last:
                    result.checkpoint = self.save()
                if "tokens_per_s" in record:
                    t0, tokens = time.perf_counter(), 0
            result.step = self.step
            if self.env.is_main:  # a LoRA run: RUN/adapter/ in PEFT's format
                write_adapter(getattr(self.model, "module", self.model), self.out)
            text_run = not self.objective.reads_examples  # samples continue corpus text
            if self.env.is_main and result.checkpoint is not None and tc.samples and text_run:
                from llmarch.train.samples import sample_texts

                result.samples = sample_texts(result.checkpoint, self.prep.splits.val, self.tokenizer, tc)
        finally:
            self.metrics.close()
        return result


def sample_seed(seed: int, sample: int) -> int:
    """Seed of the masking draws of the batch starting at ``sample`` of the stream."""
    return (seed * 1_000_003 + sample) % 2**63


def train(model_cfg: ModelConfig, tc: TrainConfig) -> TrainResult:
    """Train ``model_cfg`` with settings ``tc`` (one process, or one rank under torchrun). The run directory is
    locked for the run and removed again if the run fails before its first checkpoint (train/rundir.py)."""
    with RunDirectory(tc.out, main=int(os.environ.get("RANK", "0")) == 0):
        return Trainer(model_cfg, tc).run()


__all__ = ["train", "Trainer", "TrainResult"]
