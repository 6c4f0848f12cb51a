"""Knowledge distillation in the training loop (Hinton et al. 2015): a frozen teacher checkpoint reads the same
batch and the causal-LM loss becomes :func:`llmarch.infer.distill.distillation_loss` (KL on temperature-softened
logits blended with the hard-label CE). ``llmarch train --teacher CKPT``."""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from llmarch.config import ModelConfig
from llmarch.infer.distill import distillation_loss
from llmarch.tokenizer import TOKENIZER_FILE, Tokenizer, load_tokenizer
from llmarch.train.masking import IGNORE
from llmarch.train.objectives import Batch, Objective
from llmarch.train.optim import Precision

log = logging.getLogger(__name__)


class Distilled:
    """Wraps the causal-LM objective: same batches, loss term ``lm`` = distillation loss (as a sum over the target
    positions, like every objective). Forwards run without gradients (validation) keep the plain CE, so
    ``val_loss`` stays comparable with runs that have no teacher."""

    def __init__(self, inner: Objective, teacher: torch.nn.Module, temperature: float, alpha: float,
                 precision: Precision):
        self.inner, self.teacher = inner, teacher
        self.temperature, self.alpha, self.precision = temperature, alpha, precision

    def __getattr__(self, name: str):  # extra_tokens, model_kind, main_term, name, ...
        return getattr(self.inner, name)

    def make_batch(self, chunk: torch.Tensor, generator: torch.Generator) -> Batch:
        return self.inner.make_batch(chunk, generator)

    def loss_sums(self, out, batch: Batch) -> dict[str, torch.Tensor]:
        if not torch.is_grad_enabled():  # validation: plain CE
            return self.inner.loss_sums(out, batch)
        with torch.no_grad(), self.precision.autocast():
            teacher_logits = self.teacher(batch.inputs["input_ids"]).logits  # [B, T, V]
        labels = batch.labels["lm"]  # [B, T]
        n = (labels != IGNORE).sum()
        loss = distillation_loss(out.logits, teacher_logits, labels, self.temperature, self.alpha, IGNORE)
        return {"lm": loss * n}


def load_teacher(path: str, student: ModelConfig, tokenizer: Tokenizer, seq_len: int,
                 device: torch.device) -> torch.nn.Module:
    """The frozen teacher (eval mode, no gradients) on ``device``, checked against the student: same vocabulary
    size, same tokenizer when the teacher directory carries one, long enough for ``seq_len``."""
    from llmarch.checkpoint import load_model
    from llmarch.train.checkpoints import resolve_model_dir

    model_dir = resolve_model_dir(path)  # a model directory or a run's newest good checkpoint
    teacher = load_model(model_dir).eval().requires_grad_(False).to(device)
    tv, sv = teacher.config.vocab_size, student.vocab_size
    if tv != sv:
        raise ValueError(f"teacher: {model_dir} has vocab_size {tv} but the student has {sv} (from the run's "
                         "tokenizer); distil from a teacher trained with the same tokenizer (--tokenizer "
                         "TEACHER/tokenizer.json)")
    tok_file = Path(model_dir) / TOKENIZER_FILE
    if tok_file.is_file() and load_tokenizer(tok_file).content_hash() != tokenizer.content_hash():
        raise ValueError(f"teacher: {tok_file} differs from the run's tokenizer (same size {tv}, other tokens); "
                         f"train the student with --tokenizer {tok_file}")
    if teacher.config.max_seq_len < seq_len:
        raise ValueError(f"teacher: max_seq_len {teacher.config.max_seq_len} is shorter than --seq-len {seq_len}")
    log.info("distilling from %s (%.2fM parameters)", model_dir, sum(p.numel() for p in teacher.parameters()) / 1e6)
    return teacher


def with_teacher(objective: Objective, tc, cfg: ModelConfig, tokenizer: Tokenizer, device: torch.device):
    """``objective`` unchanged without ``tc.teacher``; else wrapped in :class:`Distilled` (causal_lm only)."""
    if tc.teacher is None:
        return objective
    if objective.name != "causal_lm":
        raise ValueError(f"teacher: distillation trains the causal_lm objective, not {objective.name!r}; drop "
                         "--teacher or train a decoder with --objective causal_lm")
    teacher = load_teacher(tc.teacher, cfg, tokenizer, tc.seq_len, device)
    return Distilled(objective, teacher, tc.distill_temperature, tc.distill_alpha, Precision(tc.precision,
                                                                                             device.type))


__all__ = ["Distilled", "load_teacher", "with_teacher"]
