"""Starting from existing weights and preparing example data: what ``llmarch train --from DIR`` (continued
pre-training) and ``llmarch finetune`` (SFT, reward, DPO, rejection sampling) share with the pre-training loop.

``--from`` takes an llmarch model directory, a training run (its newest good checkpoint) or a Hugging Face
directory; the run uses that model's config, tokenizer and weights. When the tokenizer grows (chat role tokens),
the embedding and an untied head get new rows set to the mean of the old ones; a head the objective swaps (a
reward model's scalar head) starts fresh.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from llmarch.config import ModelConfig
from llmarch.model import Model, build
from llmarch.tokenizer import TOKENIZER_FILE, Tokenizer, load_tokenizer, load_tokenizer_for
from llmarch.train.distributed import DistEnv
from llmarch.train.objectives import OBJECTIVES
from llmarch.train.settings import TrainConfig

log = logging.getLogger(__name__)


def model_dir(path: str) -> Path:
    """The model directory behind ``--from``: itself, or a run's newest good checkpoint."""
    from llmarch.train.checkpoints import resolve_model_dir

    return resolve_model_dir(path)


def config_from_dir(path: str) -> ModelConfig:
    """The ModelConfig of an llmarch or Hugging Face model directory (or a run's newest checkpoint)."""
    from llmarch.checkpoint import is_llmarch_dir

    d = model_dir(path)
    if is_llmarch_dir(d):
        return ModelConfig.from_file(d / "config.json")
    from llmarch.hf import config_from_hf

    return config_from_hf(d)


def parse_lora(spec: str) -> dict:
    """``"r=16,alpha=32,dropout=0.05,targets=q,v"`` -> {"r": 16, "alpha": 32.0, "dropout": 0.05,
    "targets": ("q", "v")}; a bare word after ``targets=`` is one more target."""
    out: dict = {}
    key = None
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        name, sep, value = part.partition("=")
        if not sep:
            if key != "targets":
                raise ValueError(f"lora: {part!r} is not KEY=VALUE; write e.g. r=16,alpha=32,targets=q,v")
            out["targets"] += (name,)
            continue
        key = name.strip()
        try:
            if key == "r":
                out["r"] = int(value)
            elif key in ("alpha", "dropout"):
                out[key] = float(value)
            elif key == "targets":
                out["targets"] = (value.strip(),)
            else:
                raise ValueError(f"lora: unknown setting {key!r}; use r, alpha, dropout, targets")
        except ValueError as e:
            if "lora:" in str(e):
                raise
            raise ValueError(f"lora: {key}={value!r} is not a number") from None
    if out.get("r", 1) < 1:
        raise ValueError(f"lora: r must be >= 1, got {out['r']}")
    return out


@dataclass
class RowSplits:
    """Example rows ((line, row) pairs) of the two splits."""

    train: list
    val: list


def example_tokenizer(tc: TrainConfig, cfg: ModelConfig, resume_from: Path | None) -> Tokenizer:
    """The run's tokenizer: the checkpoint's when resuming, else --tokenizer, else the --from model's; decoders
    get chat role tokens and llmarch's template when theirs has none."""
    if resume_from is not None:
        return load_tokenizer_for(resume_from)
    if tc.tokenizer is not None:
        tok = load_tokenizer(tc.tokenizer)
    elif tc.init_from is not None:
        tok = load_tokenizer_for(model_dir(tc.init_from))
    else:
        raise ValueError("post-training needs a tokenizer: start from a model with --from DIR (it has its "
                         "tokenizer.json) or give --tokenizer FILE")
    return tok.with_chat_roles() if cfg.kind == "decoder" else tok


def prepare_examples(tc: TrainConfig, model_cfg: ModelConfig, env: DistEnv, resume_from: Path | None):
    """JSONL rows split by line (or a task mixture) and the tokenizer, for example-based objectives."""
    from llmarch.train.chat_data import read_jsonl, split_rows
    from llmarch.train.setup import Prepared

    tok = example_tokenizer(tc, model_cfg, resume_from)
    if env.is_main:
        tok.save(Path(tc.out) / TOKENIZER_FILE)
    if tc.task_mix is not None:
        from llmarch.train.taskmix import TaskMixture

        mixture = TaskMixture.from_file(tc.task_mix)
        return Prepared(tok, mixture, len(mixture.tasks), len(mixture.tasks))
    if tc.data is None:
        raise ValueError("--data: post-training reads a JSONL file of examples (messages, prompt/response or "
                         "prompt/chosen/rejected rows); `llmarch data instructions --out FILE` writes one")
    train, val = split_rows(read_jsonl(tc.data), tc.val_fraction)
    if env.is_main:
        log.info("examples: %s, %d train / %d validation rows", tc.data, len(train), len(val))
    return Prepared(tok, RowSplits(train, val), len(train), len(val))


def prepare_for(tc: TrainConfig, model_cfg: ModelConfig, env: DistEnv, resume_from: Path | None):
    """(settings, prepared data): example rows for post-training objectives, else the text corpus (with the
    --from model's tokenizer for continued pre-training)."""
    from llmarch.train.setup import prepare

    if tc.objective is not None and OBJECTIVES[tc.objective].reads_examples:
        return tc, prepare_examples(tc, model_cfg, env, resume_from)
    if tc.init_from is not None and tc.tokenizer is None:
        tc = tc.replace(tokenizer=str(model_dir(tc.init_from) / TOKENIZER_FILE))
    return tc, prepare(tc, model_cfg, env, resume_from)


def grow_rows(t: torch.Tensor, n: int) -> torch.Tensor:
    """``t`` [V, ...] with rows appended up to [n, ...], each the mean of the existing rows."""
    extra = t.float().mean(0, keepdim=True).to(t.dtype).expand(n - t.shape[0], *t.shape[1:])
    return torch.cat([t, extra], dim=0)


def load_into(model: Model, src: str) -> None:
    """Copy the weights of the model at ``src`` into ``model`` (same architecture): rows added to vocabulary
    tables, a head of a different kind left as initialised; anything else that does not fit is an error."""
    from llmarch.checkpoint import load_model

    base = load_model(model_dir(src))
    old_v, new_v = base.config.vocab_size, model.config.vocab_size
    target = model.state_dict()
    state, fresh = {}, []
    for name, t in base.state_dict().items():
        if name not in target:
            if name.startswith("lm_head."):
                continue  # the objective's head replaces the base one
            raise ValueError(f"--from {src}: weight {name} has no place in the model being trained")
        if t.shape != target[name].shape and new_v > old_v and t.shape[0] == old_v and \
                target[name].shape == (new_v, *t.shape[1:]):
            t = grow_rows(t, new_v)
        if t.shape != target[name].shape:
            if name.startswith("lm_head."):
                fresh.append(name)
                continue
            raise ValueError(f"--from {src}: {name} has shape {tuple(t.shape)}, the model expects "
                             f"{tuple(target[name].shape)}")
        state[name] = t
    missing, _ = model.load_state_dict(state, strict=False)
    tied = set(model.tied_names())
    missing = [m for m in missing if m not in tied]
    if any(not m.startswith("lm_head.") for m in missing):
        raise ValueError(f"--from {src}: the model lacks weights for {missing[:5]}")
    if missing or fresh:
        log.info("--from %s: new head weights %s", src, sorted(set(missing) | set(fresh)))
    if new_v > old_v:
        log.info("--from %s: vocabulary %d -> %d (new rows = mean embedding)", src, old_v, new_v)


def initial_model(cfg: ModelConfig, tc: TrainConfig, builder=build) -> Model:
    """The model a run starts from: built from ``cfg`` (random init), with ``--from`` weights, with LoRA."""
    model = builder(cfg)
    if tc.init_from is not None:
        load_into(model, tc.init_from)
    if tc.lora is not None:
        from llmarch import lora

        lora.apply(model, **parse_lora(tc.lora))
    return model


def write_adapter(model, out: Path) -> Path | None:
    """RUN/adapter/ in PEFT's format for a LoRA run (None otherwise)."""
    from llmarch.train.preference import lora_settings

    if lora_settings(model) is None:
        return None
    from llmarch import hf

    path = out / "adapter"
    hf.save_adapter(model, path)
    (path / "llmarch_lora.json").write_text(json.dumps(lora_settings(model), default=list) + "\n")
    return path


__all__ = ["config_from_dir", "parse_lora", "prepare_for", "prepare_examples", "initial_model", "load_into",
           "grow_rows", "model_dir", "RowSplits", "write_adapter"]
