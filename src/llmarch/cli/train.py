"""`llmarch train`: train a preset or config file on a corpus; ``--nproc N`` relaunches itself under torchrun.
``python -m llmarch.train`` takes the same arguments (that is what torchrun runs on every rank)."""
from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys

from llmarch.cli.common import add_model_args

# (flag, TrainConfig field, type, help); type None = a switch
OPTIONS = [
    ("--steps", "steps", int, "optimizer steps (default 1000)"),
    ("--data", "data", str, "folder, glob or file of text (default: the Python standard library sources)"),
    ("--max-data-mb", "max_data_mb", float, "use only the first N MB of the corpus"),
    ("--val-fraction", "val_fraction", float, "share of files held out for validation (default 0.05)"),
    ("--batch-size", "batch_size", int, "sequences per micro-batch per process (default 8)"),
    ("--grad-accum", "grad_accum", int, "micro-batches per optimizer step (default 1)"),
    ("--seq-len", "seq_len", int, "tokens per sequence (default 256, or the model's context when shorter)"),
    ("--lr", "lr", float, "peak learning rate (default 6e-4)"),
    ("--min-lr-ratio", "min_lr_ratio", float, "final lr as a fraction of the peak (default 0.1)"),
    ("--warmup", "warmup", int, "linear warmup steps (default 100)"),
    ("--weight-decay", "weight_decay", float, "AdamW weight decay on matrices (default 0.1)"),
    ("--clip", "clip", float, "gradient-norm clip, 0 = off (default 1.0)"),
    ("--precision", "precision", str, "fp32 | bf16 | fp16 autocast (default fp32)"),
    ("--grad-checkpointing", "grad_checkpointing", None, "recompute block activations in backward"),
    ("--curriculum-start", "curriculum_start", int, "sequence-length curriculum: length at step 0"),
    ("--curriculum-steps", "curriculum_steps", int, "steps to grow from --curriculum-start to --seq-len"),
    ("--seed", "seed", int, "seed of initialisation, data order and masking (default 0)"),
    ("--objective", "objective", str, "causal_lm | mlm | span (default: head mlm -> mlm, pretraining -> mlm + "
     "nsp; kind encoder_decoder -> span, decoder -> causal_lm)"),
    ("--nsp", "nsp", None, "add next-sentence prediction to mlm (default: on for the pretraining head)"),
    ("--no-nsp", "nsp", False, "mlm without next-sentence prediction"),
    ("--tokenizer", "tokenizer", str, "an existing tokenizer.json instead of training a BPE"),
    ("--vocab-size", "vocab_size", int, "size of the BPE to train (default: the config's vocab_size)"),
    ("--qat", "qat", str, "quantization-aware training: int8 | int4 | int3 | int2 | ternary (weights; STE)"),
    ("--qat-group-size", "qat_group_size", int, "group size of int4/int3/int2 QAT (default 64)"),
    ("--tokenizer-kind", "tokenizer_kind", str, "bbpe (byte-level, default) | bpe (character-level)"),
    ("--cache-dir", "cache_dir", str, "token/tokenizer cache (default $LLMARCH_CACHE or ~/.cache/llmarch)"),
    ("--eval-every", "eval_every", int, "validate every N steps (default 100)"),
    ("--eval-batches", "eval_batches", int, "validation batches per evaluation (default 8)"),
    ("--log-every", "log_every", int, "write metrics every N steps (default 10)"),
    ("--save-every", "save_every", int, "checkpoint every N steps (default 500; always at the end)"),
    ("--keep-last", "keep_last", int, "checkpoints kept (default 3)"),
    ("--parallel", "parallel", str, "ddp | fsdp with several processes (default ddp)"),
    ("--dp", "dp", int, "data-parallel degree (default: processes / (tp * pp))"),
    ("--tp", "tp", int, "tensor-parallel degree: heads, FFN width and vocabulary split over T ranks (default 1)"),
    ("--ep", "ep", int, "expert-parallel degree: MoE experts split over the data-parallel ranks (default 1)"),
    ("--pp", "pp", int, "pipeline-parallel degree: the decoder's layers cut into P stages (default 1)"),
    ("--pp-schedule", "pp_schedule", str, "with --pp: 1f1b | gpipe | interleaved (2 stages per rank; default 1f1b)"),
    ("--microbatches", "microbatches", int, "with --pp: micro-batches per step, dividing --batch-size (default P)"),
    ("--sp", "sequence_parallel", None, "sequence parallel with --tp: norms and residual on T/tp tokens per rank"),
    ("--device", "device", str, "auto | cpu | cuda (default auto)"),
    ("--samples", "samples", int, "texts generated at the end (default 3)"),
    ("--sample-tokens", "sample_tokens", int, "tokens per sample (default 64)"),
    ("--stop-at", "stop_at", int, "stop after this step with a checkpoint, keeping the schedule of --steps"),
    ("--resume", "resume", None, "continue from the newest good checkpoint in --out, with the run's saved model "
     "and settings (flags given override them; changes that alter the run are refused)"),
    ("--no-progress", "progress", False, "no progress bar"),
    ("--teacher", "teacher", str, "distil from this checkpoint (model or run directory; causal_lm, same tokenizer)"),
    ("--distill-temperature", "distill_temperature", float, "softening temperature of the distillation KL (default 2)"),
    ("--distill-alpha", "distill_alpha", float, "weight of the KL term, 1 - alpha on the hard CE (default 0.5)"),
    ("--index", "index", str, "chunk index (llmarch index build, same tokenizer) for a RETRO config"),
    ("--images", "images", str, "train a vision config on image-text pairs: digits (sklearn 8x8) | shapes "
     "(Pillow-rendered counts); one process"),
    ("--from", "init_from", str, "start from these weights (llmarch model/run directory or Hugging Face "
     "directory): its config, tokenizer and weights; continued pre-training"),
]


def add_options(p: argparse.ArgumentParser, options) -> None:
    """Training-setting flags from (flag, dest, type, help) rows: type None = on-switch, False = off-switch.
    Defaults are None so only what the user gave overrides the settings."""
    for flag, dest, kind, help_ in options:
        if kind is None:
            p.add_argument(flag, dest=dest, action="store_true", default=None, help=help_)
        elif kind is False:
            p.add_argument(flag, dest=dest, action="store_false", default=None, help=help_)
        else:
            p.add_argument(flag, dest=dest, type=kind, default=None, help=help_)


def add_train_args(p: argparse.ArgumentParser) -> None:
    add_model_args(p, required=False)  # or --from DIR, or --resume (the run's own config)
    p.add_argument("--out", required=True, metavar="DIR", help="run directory: metrics.jsonl, checkpoints/")
    add_options(p, OPTIONS)
    p.add_argument("--recipe", choices=["paper"], help="paper: the preset's published optimiser settings (lr, AdamW "
                   "betas/eps, weight decay, clipping, warmup, final lr); explicit flags still win")
    p.add_argument("--nproc", type=int, default=1, help="processes (relaunches under torchrun when > 1)")


def add(sub) -> None:
    p = sub.add_parser("train", help="train a model (preset or config) on a text corpus")
    add_train_args(p)
    p.set_defaults(func=run)


def train_config_from_args(args: argparse.Namespace):
    from llmarch.train import TrainConfig
    from llmarch.train.resume import resume_settings

    given = {dest: getattr(args, dest) for _, dest, _, _ in OPTIONS if getattr(args, dest) is not None}
    if getattr(args, "recipe", None) == "paper":
        from llmarch.presets.recipes import recipe_for

        given = {**recipe_for(args.preset).settings(), **given}
    if args.resume:  # the run's saved settings, overridden by what was given
        return resume_settings(args.out, given)
    return TrainConfig(out=args.out, **given)


def model_config_from_args(args: argparse.Namespace):
    """--preset / --config (+ --set); --from DIR: that directory's config (+ --set); with --resume and none of
    them, the run's own model_config.json (+ --set)."""
    from llmarch.cli.common import apply_sets, config_from_args
    from llmarch.train.resume import resume_model_config_file

    init_from = getattr(args, "init_from", None)
    if init_from is not None:
        if args.preset or args.config:
            raise ValueError("--from takes the model from DIR; drop --preset/--config (use --set to change fields)")
        from llmarch.train.posttrain import config_from_dir

        return apply_sets(config_from_dir(init_from), args.set)
    if args.preset or args.config:
        return config_from_args(args)
    if not args.resume:
        raise ValueError("give a model: --preset NAME, --config FILE or --from DIR (existing weights), or --resume "
                         "to continue the run in --out")
    return config_from_args(argparse.Namespace(**{**vars(args), "config": str(resume_model_config_file(args.out))}))


def argv_from_args(args: argparse.Namespace) -> list[str]:
    """The command line of these arguments without --nproc (what each torchrun rank receives)."""
    argv = ["--preset", args.preset] if args.preset else ["--config", args.config] if args.config else []
    for item in args.set:
        argv += ["--set", item]
    if getattr(args, "recipe", None):
        argv += ["--recipe", args.recipe]
    argv += ["--out", args.out]
    for flag, dest, kind, _ in OPTIONS:
        v = getattr(args, dest)
        if v is None or (kind is None and v is not True) or (kind is False and v is not False):
            continue  # unset, or the other switch of a pair (--nsp / --no-nsp)
        argv += [flag] if kind in (None, False) else [flag, str(v)]
    return argv


def run(args: argparse.Namespace) -> int:
    if args.nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {args.nproc}")
    from llmarch.train.parallel.mesh import MeshSpec

    world = args.nproc if args.nproc > 1 else int(os.environ.get("WORLD_SIZE", "1"))  # a torchrun rank: its job
    MeshSpec(args.dp, args.tp or 1, args.ep or 1, args.pp or 1).resolve(world)  # before launching anything
    if args.nproc > 1:
        from llmarch.train.parallel.apply import mesh_spec

        # the whole mesh against the model and the settings, here: one message instead of one per rank
        mesh_spec(model_config_from_args(args), args.nproc, train_config_from_args(args))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.nproc),
               "-m", "llmarch.train", *argv_from_args(args)]
        print("launching: " + " ".join(cmd), file=sys.stderr)
        return subprocess.call(cmd)
    return run_local(args)


def run_local(args: argparse.Namespace) -> int:
    from tqdm.contrib.logging import logging_redirect_tqdm

    from llmarch.train import train
    from llmarch.train.distributed import shutdown

    from llmarch.train.setup import default_seq_len

    cfg, tc = model_config_from_args(args), train_config_from_args(args)
    if args.seq_len is None and not args.resume:  # the default fits the model; a chosen length is checked
        tc = default_seq_len(cfg, tc)
    if tc.images is not None:  # image-text pairs: their own small loop (train/image_loop.py)
        from llmarch.train.image_loop import train_image_text as train
    try:
        with logging_redirect_tqdm():
            result = train(cfg, tc)
    finally:
        shutdown()
    if result.checkpoint is None:  # another rank, or nothing left to do
        return 0
    print(f"trained to step {result.step}: loss {result.loss:.4f}" +
          (f", val_loss {result.val_losses[-1][1]:.4f}" if result.val_losses else ""))
    print(f"checkpoint: {result.checkpoint}")
    for prompt, text in result.samples:
        print(f"--- sample ---\n{prompt}\033[1m{text}\033[0m" if sys.stdout.isatty() else
              f"--- sample ---\n{prompt}{text}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m llmarch.train`` (one rank under torchrun, or a single process)."""
    p = argparse.ArgumentParser(prog="python -m llmarch.train", description="train (one rank of a torchrun job)")
    p.add_argument("-v", "--verbose", action="store_true")
    add_train_args(p)
    args = p.parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.INFO
    if int(os.environ.get("RANK", "0")) != 0:  # rank-0 logging: other ranks report only problems
        level = logging.WARNING
    logging.basicConfig(level=level, format="%(message)s")
    try:
        return run(args)
    except (ValueError, OSError) as e:
        if args.verbose:
            raise
        print(f"llmarch train: error: {e}", file=sys.stderr)
        return 2
