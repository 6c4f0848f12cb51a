"""Run a study: train every variant on the same data with the same settings, measure it, and keep the result.

Layout of a study directory ``DIR``::

    DIR/study.json                    the study as run
    DIR/variants/<name>/run/          the variant's training run (metrics.jsonl, its one checkpoint)
    DIR/variants/<name>/result.json   status, curves, costs, perplexities (written last, atomically)
    DIR/report.md, DIR/*.png          written by llmarch.ablate.report

All variants read the same cached tokenizer and token arrays (the training package caches them by corpus and
tokenizer), so the corpus is tokenised once. A variant whose ``result.json`` says ``ok`` for the same config and
settings (its fingerprint) is not run again; an interrupted one continues from its checkpoint; one that fails
(an invalid config, an error while training) gets a ``failed`` result with the error, and the others still run.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import statistics
import time
from pathlib import Path

from llmarch.ablate.costs import model_costs
from llmarch.ablate.extrapolate import perplexity_at_lengths
from llmarch.ablate.spec import Study, Variant
from llmarch.train import TrainConfig, Trainer
from llmarch.train.checkpoints import list_checkpoints
from llmarch.train.distributed import unwrap
from llmarch.train.metrics import read_metrics

log = logging.getLogger(__name__)
RESULT_FILE = "result.json"
VARIANTS_DIR = "variants"
TRAIN_FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}


def train_config(study: Study, variant: Variant, run_dir: Path, progress: bool) -> TrainConfig:
    settings = study.train_settings(variant)
    unknown = sorted(set(settings) - TRAIN_FIELDS)
    if unknown:
        raise ValueError(f"unknown train setting(s) {unknown}; known are {sorted(TRAIN_FIELDS)}")
    steps = settings.get("steps", TrainConfig.steps)
    return TrainConfig(out=str(run_dir), **settings, samples=0, save_every=steps, keep_last=1, progress=progress)


def fingerprint(cfg_dict: dict, tc: TrainConfig, eval_lengths: tuple[int, ...]) -> str:
    """What makes two runs of a variant the same: the config, the settings (not where or how shown), lengths."""
    settings = {k: v for k, v in tc.to_dict().items() if k not in ("out", "resume", "progress", "device")}
    text = json.dumps([cfg_dict, settings, list(eval_lengths)], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def read_result(variant_dir: Path) -> dict | None:
    path = variant_dir / RESULT_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def write_result(variant_dir: Path, result: dict) -> dict:
    variant_dir.mkdir(parents=True, exist_ok=True)
    tmp = variant_dir / f".{RESULT_FILE}.tmp"
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    os.replace(tmp, variant_dir / RESULT_FILE)
    return result


def run_study(study: Study, out: str | os.PathLike, progress: bool = False) -> list[dict]:
    """Run (or reuse) every variant of ``study`` under ``out``; the results in variant order."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "study.json").write_text(json.dumps(dataclasses.asdict(study), indent=1, default=str) + "\n")
    results = []
    for i, variant in enumerate(study.variants):
        log.info("[%d/%d] variant %s: %s", i + 1, len(study.variants), variant.name, variant.describe())
        results.append(run_variant(study, variant, out / VARIANTS_DIR / variant.name, progress))
    return results


def _failed(variant: Variant, stage: str, error: str, **extra) -> dict:
    return {"name": variant.name, "settings": variant.describe(), "status": "failed", "stage": stage,
            "error": error, **extra}


def run_variant(study: Study, variant: Variant, variant_dir: Path, progress: bool = False) -> dict:
    """Train and measure one variant, or return its earlier result when it already finished."""
    run_dir = variant_dir / "run"
    try:
        cfg = study.variant_config(variant)
        tc = train_config(study, variant, run_dir, progress)
    except (ValueError, TypeError) as e:
        log.warning("variant %s: invalid config: %s", variant.name, e)
        return write_result(variant_dir, _failed(variant, "config", str(e)))
    fp = fingerprint(cfg.to_dict(), tc, study.eval_lengths)
    previous = read_result(variant_dir)
    if previous is not None and previous.get("status") == "ok" and previous.get("fingerprint") == fp:
        log.info("variant %s: finished earlier, not re-run", variant.name)
        return dict(previous, skipped=True)
    if previous is not None and previous.get("fingerprint") not in (None, fp) and run_dir.exists():
        log.info("variant %s: config or settings changed since the last run; starting it again", variant.name)
        shutil.rmtree(run_dir)
    try:
        return write_result(variant_dir, _train_and_measure(study, variant, cfg, tc, fp))
    except Exception as e:  # noqa: BLE001  a failed variant must not stop the study
        log.warning("variant %s failed: %s: %s", variant.name, type(e).__name__, e)
        log.debug("traceback", exc_info=True)
        return write_result(variant_dir, _failed(variant, "train", f"{type(e).__name__}: {e}", fingerprint=fp))


def _train_and_measure(study: Study, variant: Variant, cfg, tc: TrainConfig, fp: str) -> dict:
    tc = tc.replace(resume=bool(list_checkpoints(tc.out)))
    t0 = time.perf_counter()
    trainer = Trainer(cfg, tc)
    result = trainer.run()
    wall = time.perf_counter() - t0
    records = read_metrics(tc.out)
    val_curve = [[r["step"], r["val_loss"]] for r in records if "val_loss" in r]
    train_curve = [[r["step"], r["loss"]] for r in records]
    speeds = [r["tokens_per_s"] for r in records if "tokens_per_s" in r]
    speeds = speeds[1:] if len(speeds) > 2 else speeds  # the first interval holds start-up work
    final = val_curve[-1][1] if val_curve else float("nan")
    lengths = list(study.eval_lengths)
    budget = max(tc.eval_batches * tc.batch_size * tc.seq_len, max(lengths, default=0))
    ext = perplexity_at_lengths(unwrap(trainer.model), trainer.objective, trainer.prep.splits.val, lengths,
                                budget, tc.batch_size, trainer.env.device) if lengths else {}
    return {"name": variant.name, "settings": variant.describe(), "status": "ok", "fingerprint": fp,
            "steps": result.step, "seq_len": tc.seq_len,
            "train_tokens": result.step * tc.batch_size * tc.grad_accum * tc.seq_len,
            "final_val_loss": final, "final_ppl": math.exp(min(final, 50.0)) if math.isfinite(final) else final,
            "diverged": not math.isfinite(final), "tokens_per_s": statistics.median(speeds) if speeds else None,
            "wall_s": wall, **model_costs(trainer.cfg, tc.seq_len),
            "ppl_at": {str(k): v for k, v in ext.items()}, "val_curve": val_curve, "train_curve": train_curve}


__all__ = ["run_study", "run_variant", "read_result", "fingerprint", "RESULT_FILE", "VARIANTS_DIR"]
