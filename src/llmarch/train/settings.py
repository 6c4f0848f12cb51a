"""TrainConfig: everything about a training run that is not the architecture. Validated at construction;
saved with every checkpoint so ``--resume`` can refuse settings that would change the run."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from llmarch.data import check_val_fraction

# settings a resumed run may change without breaking exact continuation of the data, schedule and numerics
RESUMABLE_CHANGES = frozenset({"out", "device", "parallel", "steps", "stop_at", "progress", "eval_every",
                               "eval_batches", "log_every", "save_every", "keep_last", "samples", "sample_tokens",
                               "cache_dir", "resume", "dp", "tp", "ep", "pp",
                               "sequence_parallel", "pp_schedule", "microbatches"})


@dataclass(frozen=True)
class TrainConfig:
    """Defaults follow the GPT-3 / LLaMA recipes: AdamW(0.9, 0.95, eps 1e-5), weight decay 0.1, clip 1.0,
    linear warmup then cosine decay to 10 % of the peak learning rate."""

    out: str
    steps: int = 1000
    batch_size: int = 8  # sequences per micro-batch per process
    grad_accum: int = 1  # micro-batches per optimizer step
    seq_len: int = 256  # tokens the model reads per sequence
    lr: float = 6e-4
    min_lr_ratio: float = 0.1
    warmup: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-5
    clip: float = 1.0  # global grad-norm clip; 0 disables
    precision: str = "fp32"  # fp32 | bf16 | fp16 (autocast; fp16 adds a gradient scaler)
    grad_checkpointing: bool = False  # recompute each block's activations in backward
    curriculum_start: int | None = None  # sequence-length curriculum: length at step 0 ...
    curriculum_steps: int = 0  # ... growing linearly to seq_len over this many steps
    seed: int = 0
    objective: str | None = None  # causal_lm | mlm | span; None = from the head (mlm) or the kind
    nsp: bool | None = None  # next-sentence prediction with mlm; None = when the head has NSP logits
    data: str | None = None  # folder, glob or file of text; None = the Python standard library
    max_data_mb: float | None = None  # use only the first N MB of the corpus (sorted by path)
    val_fraction: float = 0.05
    tokenizer: str | None = None  # an existing tokenizer.json; None = train a byte-level BPE
    vocab_size: int | None = None  # size of the BPE to train; None = the model config's vocab_size
    qat: str | None = None  # quantization-aware training: int8 | int4 | int3 | int2 | ternary (None = off)
    qat_group_size: int = 64  # group size of int4/int3/int2 QAT
    tokenizer_kind: str = "bbpe"  # the BPE to train: bbpe (byte-level) | bpe (character-level, <unk> for unseen)
    cache_dir: str | None = None  # token cache; None = $LLMARCH_CACHE or ~/.cache/llmarch
    eval_every: int = 100
    eval_batches: int = 8
    log_every: int = 10
    save_every: int = 500
    keep_last: int = 3
    parallel: str = "ddp"  # ddp | fsdp (with several processes)
    dp: int | None = None  # data-parallel degree; None = the processes left after tp and pp (train/parallel/)
    tp: int = 1  # tensor-parallel degree (attention heads, FFN width, vocabulary split over tp ranks)
    ep: int = 1  # expert-parallel degree (MoE experts split over the data-parallel ranks; ep = dp)
    pp: int = 1  # pipeline-parallel degree (stages of layers)
    pp_schedule: str = "1f1b"  # with pp: 1f1b | gpipe | interleaved (two stages per rank)
    microbatches: int | None = None  # with pp: micro-batches per step through the stages (None = pp)
    sequence_parallel: bool = False  # with tp: norms, residual and dropout on T/tp tokens per rank
    device: str = "auto"  # auto | cpu | cuda
    samples: int = 3  # texts generated at the end
    sample_tokens: int = 64
    stop_at: int | None = None  # stop (with a checkpoint) after this step, as if the run were cut there
    resume: bool = False
    progress: bool = True
    # --- distillation and retrieval (train/teacher.py, train/retrieving.py) ---
    teacher: str | None = None  # a teacher checkpoint (model or run directory): knowledge distillation
    distill_temperature: float = 2.0  # softening temperature T of the distillation KL
    distill_alpha: float = 0.5  # weight of the KL term; 1 - alpha weighs the hard-label CE
    index: str | None = None  # a chunk index (llmarch index build) for a RETRO config; None = retrieval off
    images: str | None = None  # an image-text source (train/image_text.py: digits | shapes) for a vision config
    # --- starting weights and post-training (train/posttrain.py; llmarch finetune, train --from) ---
    init_from: str | None = None  # start from these weights: an llmarch run / model directory or a HF directory
    lora: str | None = None  # LoRA adapters, "r=16,alpha=32,dropout=0,targets=q,v"; None = full fine-tuning
    packing: bool = True  # sft: several conversations per row (block-diagonal attention)
    dpo_beta: float = 0.1  # dpo: strength of the KL anchor to the reference
    task_mix: str | None = None  # sft: a task mixture file (named tasks, rates, templates, curriculum)
    rs_k: int = 4  # rs: candidates sampled per prompt
    rs_rounds: int = 1  # rs: sample-score-train rounds over the run's steps
    rs_temperature: float = 1.0  # rs: sampling temperature of the candidates
    rs_max_new_tokens: int = 64  # rs: longest candidate
    rs_min_score: float | None = None  # rs: drop prompts whose best candidate scores below this (None: keep all)
    rs_prompts: int | None = None  # rs: prompts sampled per round, a new seeded draw each round (None: all)
    verifier: str | None = None  # rs: a programmatic scorer by name (llmarch.instructions.VERIFIERS)
    reward_model: str | None = None  # rs: a reward-model checkpoint scoring the candidates (instead of a verifier)

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "seq_len", "eval_every", "eval_batches", "log_every",
                     "save_every"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name}: must be a positive integer, got {v!r}")
        for name in ("tp", "ep", "pp") + tuple(n for n in ("dp", "microbatches") if getattr(self, n) is not None):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: must be a positive integer, got {v!r}")
        for name in ("warmup", "keep_last", "samples", "sample_tokens", "curriculum_steps", "seed"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be >= 0, got {getattr(self, name)}")
        for f in dataclasses.fields(self):  # NaN passes every comparison below: refuse it by name first
            v = getattr(self, f.name)
            if isinstance(v, float) and not math.isfinite(v):
                raise ValueError(f"{f.name}: must be a finite number, got {v}")
        if self.lr <= 0:
            raise ValueError(f"lr: must be > 0, got {self.lr}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio: must be in [0, 1], got {self.min_lr_ratio}")
        if self.weight_decay < 0 or self.clip < 0 or self.eps <= 0:
            raise ValueError("weight_decay and clip must be >= 0 and eps > 0")
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name}: must be in [0, 1), got {getattr(self, name)}")
        check_val_fraction(self.val_fraction)  # one message for the setting, wherever it is checked
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"precision: {self.precision!r} is not allowed; choose one of ['bf16', 'fp16', 'fp32']")
        if self.qat is not None and self.qat not in ("int8", "int4", "int3", "int2", "ternary"):
            raise ValueError(f"qat: {self.qat!r} is not allowed; choose int8, int4, int3, int2 or ternary")
        if self.tokenizer_kind not in ("bbpe", "bpe"):
            raise ValueError(f"tokenizer_kind: {self.tokenizer_kind!r} is not allowed; choose bbpe (byte-level) or "
                             "bpe (character-level)")
        if self.parallel not in ("ddp", "fsdp"):
            raise ValueError(f"parallel: {self.parallel!r} is not allowed; choose one of ['ddp', 'fsdp']")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device: {self.device!r} is not allowed; choose one of ['auto', 'cpu', 'cuda']")
        if self.curriculum_start is not None and not 0 < self.curriculum_start <= self.seq_len:
            raise ValueError(f"curriculum_start: must be in [1, seq_len={self.seq_len}], got {self.curriculum_start}")
        if self.stop_at is not None and not 0 < self.stop_at <= self.steps:
            raise ValueError(f"stop_at: must be in [1, steps={self.steps}], got {self.stop_at}")
        if self.distill_temperature <= 0:
            raise ValueError(f"distill_temperature: must be > 0, got {self.distill_temperature}")
        if not 0.0 <= self.distill_alpha <= 1.0:
            raise ValueError(f"distill_alpha: must be in [0, 1], got {self.distill_alpha}")
        if self.images is not None:
            from llmarch.train.image_text import SOURCES

            SOURCES[self.images]  # ValueError naming the choices
        if self.dpo_beta <= 0 or self.rs_temperature < 0:
            raise ValueError(f"dpo_beta must be > 0 and rs_temperature >= 0, got {self.dpo_beta}, "
                             f"{self.rs_temperature}")
        counts = ("rs_k", "rs_rounds", "rs_max_new_tokens") + (("rs_prompts",) if self.rs_prompts is not None else ())
        for name in counts:
            if isinstance(getattr(self, name), bool) or getattr(self, name) < 1:
                raise ValueError(f"{name}: must be a positive integer, got {getattr(self, name)!r}")
        if self.max_data_mb is not None and self.max_data_mb <= 0:
            raise ValueError(f"max_data_mb: must be > 0, got {self.max_data_mb}")

    def seq_len_at(self, step: int) -> int:
        """Sequence length at ``step`` (0-based) under the curriculum, a multiple of 8 where possible."""
        if self.curriculum_start is None or step >= self.curriculum_steps:
            return self.seq_len
        span = self.seq_len - self.curriculum_start
        length = self.curriculum_start + span * step // max(1, self.curriculum_steps)
        return max(self.curriculum_start, min(self.seq_len, length - length % 8 or length))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    def changed_for_resume(self, saved: dict[str, Any], world: int | None = None,
                           saved_world: int | None = None) -> list[str]:
        """Fields that differ from a checkpoint's settings and would break exact continuation. Given the world
        sizes, ``batch_size`` and ``grad_accum`` may change on another mesh as long as the global batch (their
        product times the data-parallel degree) stays the same: the same samples are then read per step."""
        free = set(RESUMABLE_CHANGES)
        if world is not None and saved_world is not None:
            def global_batch(d: dict, w: int) -> int:
                dp = d.get("dp") or w // (d.get("tp", 1) * d.get("pp", 1))
                return d.get("batch_size", 0) * d.get("grad_accum", 1) * dp

            if global_batch(self.to_dict(), world) == global_batch(saved, saved_world):
                free |= {"batch_size", "grad_accum"}
        return sorted(k for k, v in self.to_dict().items() if k not in free and k in saved and saved[k] != v)


__all__ = ["TrainConfig", "RESUMABLE_CHANGES"]
