"""`llmarch finetune`: adapt a checkpoint (llmarch or Hugging Face) on JSONL examples with SFT, a reward model,
DPO or rejection sampling, fully or with LoRA adapters; the same run directory, metrics, checkpoints and
--resume as `llmarch train`. A LoRA run also writes RUN/adapter/ (PEFT's format)."""
from __future__ import annotations

import argparse
import re
import sys

from llmarch.cli.train import OPTIONS, add_options

METHODS = ("sft", "dpo", "reward", "rs")
# pre-training settings that mean nothing here
SKIPPED = {"objective", "nsp", "index", "teacher", "distill_temperature", "distill_alpha", "curriculum_start",
           "curriculum_steps", "vocab_size", "max_data_mb", "init_from", "samples", "sample_tokens"}
FT_OPTIONS = [
    ("--lora", "lora", str, "LoRA adapters instead of full fine-tuning, e.g. r=16,alpha=32,dropout=0,targets=q,v"),
    ("--task-mix", "task_mix", str, "sft: a task mixture file (named tasks, rates, templates, curriculum)"),
    ("--no-packing", "packing", False, "sft: one conversation per row (default: several, block-diagonal)"),
    ("--dpo-beta", "dpo_beta", float, "dpo: KL strength beta (default 0.1)"),
    ("--rs-k", "rs_k", int, "rs: candidates per prompt (default 4)"),
    ("--rs-rounds", "rs_rounds", int, "rs: sample-score-train rounds (default 1)"),
    ("--rs-temperature", "rs_temperature", float, "rs: sampling temperature (default 1.0)"),
    ("--rs-max-new-tokens", "rs_max_new_tokens", int, "rs: longest candidate (default 64)"),
    ("--rs-min-score", "rs_min_score", float, "rs: drop prompts whose best candidate scores below this"),
    ("--rs-prompts", "rs_prompts", int, "rs: prompts sampled per round, a new draw each round (default all)"),
    ("--verifier", "verifier", str, "rs: programmatic scorer by name (stdlib: the instruction-set verifiers)"),
    ("--reward-model", "reward_model", str, "rs: a reward-model checkpoint that scores candidates"),
]
# finetuning defaults where pre-training's differ (a short run at a small learning rate)
DEFAULTS = {"steps": 200, "lr": 1e-4, "warmup": 10, "eval_every": 50, "save_every": 100, "samples": 0,
            "weight_decay": 0.0}


def add(sub) -> None:
    p = sub.add_parser("finetune", help="adapt a checkpoint: sft | dpo | reward | rs, full or LoRA")
    p.add_argument("--from", dest="init_from", required=True, metavar="DIR",
                   help="starting weights: llmarch model/run directory or Hugging Face directory (with tokenizer)")
    p.add_argument("--method", choices=METHODS, default="sft", help="objective (default sft)")
    p.add_argument("--out", required=True, metavar="RUN", help="run directory: metrics.jsonl, checkpoints/")
    p.add_argument("--set", metavar="FIELD=VALUE", action="append", default=[],
                   help="override a model config field (e.g. dropout=0.1)")
    add_options(p, [with_default(o) for o in OPTIONS if o[1] not in SKIPPED] + FT_OPTIONS)
    p.set_defaults(func=run)


def with_default(option: tuple) -> tuple:
    """A training option with finetune's default in its help."""
    flag, dest, kind, help_ = option
    if dest == "data":
        help_ = "JSONL examples: messages, prompt/response or prompt/chosen/rejected rows (a 'split' field is used)"
    if dest == "val_fraction":
        help_ = "share of rows held out when they carry no 'split' field (default 0.05)"
    if dest in DEFAULTS:
        help_ = re.sub(r"\(default [^)]*\)", f"(default {DEFAULTS[dest]:g})", help_)
    return flag, dest, kind, help_


def settings_from_args(args: argparse.Namespace, cfg):
    from llmarch.train import TrainConfig

    given = {dest: getattr(args, dest) for _, dest, _, _ in [o for o in OPTIONS if o[1] not in SKIPPED] + FT_OPTIONS
             if getattr(args, dest) is not None}
    kw = {**DEFAULTS, "seq_len": min(512, cfg.max_seq_len), **given}
    if "lr" not in given and args.lora:
        kw["lr"] = 2e-4  # adapters start at zero: a larger step (Hu et al. 2021)
    return TrainConfig(out=args.out, objective=args.method, init_from=args.init_from, **kw)


def run(args: argparse.Namespace) -> int:
    from tqdm.contrib.logging import logging_redirect_tqdm

    from llmarch.cli.common import apply_sets
    from llmarch.train import train
    from llmarch.train.posttrain import config_from_dir

    cfg = apply_sets(config_from_dir(args.init_from), args.set)
    tc = settings_from_args(args, cfg)
    with logging_redirect_tqdm():
        result = train(cfg, tc)
    print(f"{args.method}: step {result.step}, loss {result.loss:.4f}" +
          (f", val_loss {result.val_losses[-1][1]:.4f}" if result.val_losses else ""))
    print(f"checkpoint: {result.checkpoint}")
    if tc.lora is not None:
        print(f"adapter (PEFT format): {result.checkpoint.parents[1] / 'adapter'}" if result.checkpoint else "",
              file=sys.stdout)
    return 0
