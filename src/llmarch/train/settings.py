"""TrainConfig: everything about a training run that is not the architecture. Validated at construction;
saved with every checkpoint so ``--resume`` can refuse settings that would change the run."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

# settings a resumed run may change without breaking exact continuation of the data, schedule and numerics
RESUMABLE_CHANGES = frozenset({"out", "device", "parallel", "steps", "stop_at", "progress", "eval_every",
                               "eval_batches", "log_every", "save_every", "keep_last", "samples", "sample_tokens",
                               "cache_dir", "resume"})


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

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "seq_len", "eval_every", "eval_batches", "log_every",
                     "save_every"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name}: must be a positive integer, got {v!r}")
        for name in ("warmup", "keep_last", "samples", "sample_tokens", "curriculum_steps", "seed"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be >= 0, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"lr: must be > 0, got {self.lr}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio: must be in [0, 1], got {self.min_lr_ratio}")
        if self.weight_decay < 0 or self.clip < 0 or self.eps <= 0:
            raise ValueError("weight_decay and clip must be >= 0 and eps > 0")
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name}: must be in [0, 1), got {getattr(self, name)}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val_fraction: must be in (0, 1), got {self.val_fraction}")
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

    def changed_for_resume(self, saved: dict[str, Any]) -> list[str]:
        """Fields that differ from a checkpoint's settings and would break exact continuation."""
        return sorted(k for k, v in self.to_dict().items()
                      if k not in RESUMABLE_CHANGES and k in saved and saved[k] != v)


__all__ = ["TrainConfig", "RESUMABLE_CHANGES"]
