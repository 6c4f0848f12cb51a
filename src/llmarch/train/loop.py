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
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from llmarch.config import ModelConfig
from llmarch.data import PackedSequences
from llmarch.model import build
from llmarch.nn.moe import moe_metrics
from llmarch.train import checkpoints as ckpt
from llmarch.train import distributed as D
from llmarch.train.expert_load import ExpertLoad
from llmarch.train.metrics import Metrics
from llmarch.train.objectives import Batch, objective_for
from llmarch.train.optim import Precision, WarmupCosine, enable_activation_checkpointing, make_optimizer
from llmarch.train.retrieving import with_retrieval
from llmarch.train.settings import TrainConfig
from llmarch.train.setup import fit_model_config, prepare
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
        resume_from = ckpt.find_resume(self.out, tc.resume, self.env.is_main)
        self.prep = prepare(tc, model_cfg, self.env, resume_from)
        self.tokenizer = self.prep.tokenizer
        cfg, notes = fit_model_config(model_cfg, self.tokenizer, tc)
        self.state = None
        if resume_from is not None:
            self.state = ckpt.load_checkpoint(resume_from)
            if self.state["config"] != cfg:
                raise ValueError(f"--resume: the model config differs from the checkpoint's ({resume_from}); "
                                 "resume with the same --preset/--config and --set values")
            changed = tc.changed_for_resume(self.state["state"]["train"])
            if changed:
                raise ValueError(f"--resume: settings {changed} differ from the checkpoint's; they would change "
                                 "the run (see train.json in the checkpoint)")
        self.cfg = cfg
        if self.env.is_main:
            for note in notes:
                log.info("model %s", note)
        objective = with_retrieval(objective_for(tc.objective, cfg, self.tokenizer, nsp=tc.nsp), tc, cfg,
                                   self.tokenizer)  # --index: RETRO neighbours in every batch; --teacher: distil
        self.objective = with_teacher(objective, tc, cfg, self.tokenizer, self.env.device)
        extra = self.objective.extra_tokens
        self.train_seqs = PackedSequences(self.prep.splits.train, tc.seq_len + extra, seed=tc.seed)
        self.val_seqs = PackedSequences(self.prep.splits.val, tc.seq_len + extra, shuffle=False)

        torch.manual_seed(tc.seed)  # every rank builds the same initial weights
        model = build(cfg)
        self.aliases = ckpt.tied_aliases(model)
        if self.state is not None:
            missing, unexpected = model.load_state_dict(self.state["model"], strict=False)
            if set(missing) - self.aliases or unexpected:
                raise ValueError(f"checkpoint weights do not fit the model: missing {missing}, unexpected {unexpected}")
        if tc.qat:  # the forward sees quantized weights; the float weights train (straight-through)
            from llmarch.infer.lowbit import prepare_qat

            prepare_qat(model, tc.qat, tc.qat_group_size)
        if tc.grad_checkpointing:
            enable_activation_checkpointing(model)
        self.model = D.wrap(model.to(self.env.device), self.env, tc.parallel)
        self.expert_load = ExpertLoad(self.model)  # empty (falsy) for dense models
        self.optimizer = make_optimizer(self.model, tc.lr, tc.weight_decay, (tc.beta1, tc.beta2), tc.eps)
        self.schedule = WarmupCosine(self.optimizer, tc.lr, tc.warmup, tc.steps, tc.min_lr_ratio)
        self.precision = Precision(tc.precision, self.env.device.type)
        # masking draws, reseeded per micro-batch from its first sample's index: the same masks whatever the
        # number of processes or micro-batches
        self.generator = torch.Generator().manual_seed(tc.seed * 7919 + self.env.rank)
        torch.manual_seed(tc.seed + 1 + self.env.rank)  # dropout
        self.step, self.consumed = 0, 0
        if self.state is not None:
            self._restore(self.state)
        self.metrics = Metrics(self.out, self.env.is_main, tc.steps, self.step, tc.progress)
        if self.env.is_main:
            (self.out / "train.json").write_text(json.dumps(tc.to_dict(), indent=1) + "\n")
            cfg.to_file(self.out / "model_config.json")

    # --- resume ---------------------------------------------------------------------------------------------
    def _restore(self, loaded: dict) -> None:
        s = loaded["state"]
        D.load_optimizer_state(self.model, self.optimizer, loaded["optimizer"])
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
            start = self.consumed + (m * env.world + env.rank) * tc.batch_size
            chunk = self.train_seqs.batch(start, tc.batch_size)[:, :length]
            out.append(self.objective.make_batch(chunk, self.generator.manual_seed(sample_seed(tc.seed, start))))
        self.consumed += tc.batch_size * tc.grad_accum * env.world
        return out

    def _forward(self, batch: Batch):
        inputs = {k: v.to(self.env.device) for k, v in batch.inputs.items()}
        labels = {k: v.to(self.env.device) for k, v in batch.labels.items()}
        with self.precision.autocast():
            out = self.model(**inputs, **self.objective.model_options)
        return out, self.objective.loss_sums(out, Batch(inputs, labels, batch.counts))

    def train_step(self) -> dict:
        tc, env = self.tc, self.env
        micro = self._micro_batches()
        terms = sorted(micro[0].counts)
        counts = dict(zip(terms, D.all_reduce_sum(env, [sum(b.counts[t] for b in micro) for t in terms])))
        self.model.train()
        sums = {t: 0.0 for t in terms}
        aux_total = 0.0
        for i, batch in enumerate(micro):
            with D.grad_sync(self.model, i == len(micro) - 1):
                out, s = self._forward(batch)
                if self.expert_load:
                    self.expert_load.update()
                loss = sum(s[t] * env.world / counts[t] for t in terms)
                aux = out.aux_loss
                if aux.requires_grad or float(aux) != 0.0:
                    loss = loss + aux.float() / len(micro)
                    aux_total += float(aux.detach()) / len(micro)
                self.precision.backward(loss)
            for t in terms:
                sums[t] += float(s[t].detach())
        D.grad_sync(self.model, True)
        self.precision.unscale(self.optimizer)
        grad_norm = None
        if tc.clip > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), tc.clip)
            grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
        lr = self.schedule.lr
        self.precision.step(self.optimizer)
        self.optimizer.zero_grad(set_to_none=True)
        self.schedule.step()
        self.step += 1
        reduced = D.all_reduce_sum(env, [sums[t] for t in terms] + [aux_total])
        record = {"step": self.step, "loss": sum(reduced[i] / counts[t] for i, t in enumerate(terms)), "lr": lr}
        if len(terms) > 1:
            record.update({f"loss_{t}": reduced[i] / counts[t] for i, t in enumerate(terms)})
        if reduced[-1]:
            record["aux_loss"] = reduced[-1] / env.world
        if grad_norm is not None:
            record["grad_norm"] = grad_norm
        record["tokens"] = sum(b.tokens for b in micro) * env.world
        return record

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
        for i in range(math.ceil(tc.eval_batches / env.world)):
            start = (i * env.world + env.rank) * tc.batch_size
            chunk = self.val_seqs.batch(start, tc.batch_size)
            batch = self.objective.make_batch(chunk, gen.manual_seed(sample_seed(tc.seed + 12345, start)))
            _, s = self._forward(batch)
            total += float(s[self.objective.main_term])
            count += batch.counts[self.objective.main_term]
        total, count = D.all_reduce_sum(env, [total, count])
        self.model.train()
        return total / count

    # --- checkpoints and the run ----------------------------------------------------------------------------
    def save(self) -> Path | None:
        model_state, optim_state = D.full_state(self.model, self.optimizer)  # collective
        local = {"cpu": torch.get_rng_state(), "masking": self.generator.get_state()}
        if torch.cuda.is_available():
            local["cuda"] = torch.cuda.get_rng_state()
        rng = {f"rank{r}.{k}": t for k, v in local.items() for r, t in enumerate(D.gather_uint8(self.env, v))}
        path = None
        if self.env.is_main:
            weights = {k: v for k, v in model_state.items() if k not in self.aliases}
            state = {"step": self.step, "consumed": self.consumed, "schedule": self.schedule.state_dict(),
                     "train": self.tc.to_dict(), "world": self.env.world}
            if self.precision.scaler is not None:
                state["scaler"] = self.precision.scaler.state_dict()
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
                tokens += record.pop("tokens")
                self.metrics.advance()
                result.loss = record["loss"]
                evaluate = self.step % tc.eval_every == 0 or self.step == last
                if evaluate or self.step % tc.log_every == 0:  # throughput of training only, not eval or saving
                    record["tokens_per_s"] = tokens / max(time.perf_counter() - t0, 1e-9)
                    if self.expert_load:  # before evaluation, whose forwards would replace the routing
                        self._log_experts(record)
                    if evaluate:
                        record["val_loss"] = self.evaluate()
                        record["val_ppl"] = math.exp(min(record["val_loss"], 50.0))
                        result.val_losses.append((self.step, record["val_loss"]))
                    self.metrics.log(record)
                if self.step % tc.save_every == 0 or self.step == last:
                    result.checkpoint = self.save()
                if "tokens_per_s" in record:
                    t0, tokens = time.perf_counter(), 0
            result.step = self.step
            if self.env.is_main and result.checkpoint is not None and tc.samples:
                from llmarch.train.samples import sample_texts

                result.samples = sample_texts(result.checkpoint, self.prep.splits.val, self.tokenizer, tc)
        finally:
            self.metrics.close()
        return result


def sample_seed(seed: int, sample: int) -> int:
    """Seed of the masking draws of the batch starting at ``sample`` of the stream."""
    return (seed * 1_000_003 + sample) % 2**63


def train(model_cfg: ModelConfig, tc: TrainConfig) -> TrainResult:
    """Train ``model_cfg`` with settings ``tc`` (one process, or one rank under torchrun)."""
    return Trainer(model_cfg, tc).run()


__all__ = ["train", "Trainer", "TrainResult"]
