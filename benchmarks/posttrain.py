"""Post-training, measured end to end on one CPU core: pre-train `llama-tiny` on the standard library, then SFT on
the stdlib instruction set, rejection sampling against its verifiers, DPO and a reward model on preference pairs,
and LoRA vs full fine-tuning. Held-out metrics (files never seen in pre-training or tuning) before and after each
stage: instruction-following rate, verifier pass rate, preference accuracy, reward-model accuracy.

    PYTHONPATH=src python benchmarks/posttrain.py            # ~10 minutes; writes benchmarks/results/posttrain.json
"""
from __future__ import annotations

import argparse
import json
import logging
import random
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, write_results  # noqa: E402

import llmarch  # noqa: E402
from llmarch import data  # noqa: E402
from llmarch.instructions import build_instructions, follows, verify, write_jsonl  # noqa: E402
from llmarch.model import build  # noqa: E402
from llmarch.tokenizer import load_tokenizer_for  # noqa: E402
from llmarch.train import TrainConfig, Trainer  # noqa: E402
from llmarch.train import chat_data as cd  # noqa: E402
from llmarch.train.checkpoints import resolve_model_dir  # noqa: E402
from llmarch.train.posttrain import config_from_dir, load_into  # noqa: E402
from llmarch.train.preference import sequence_logps  # noqa: E402
from llmarch.train.rejection import sample_candidates  # noqa: E402

TASKS = ["implement", "complete", "returns", "arguments"]
MAX_NEW = 64
log = logging.getLogger("posttrain")


def chat_model(path: Path):
    """A model directory as a chat model: its tokenizer with chat roles, the embedding grown to match."""
    d = resolve_model_dir(path)
    tok = load_tokenizer_for(d).with_chat_roles()
    cfg = config_from_dir(str(d))
    model = build(cfg.replace(vocab_size=max(cfg.vocab_size, tok.vocab_size)))
    load_into(model, str(d))
    return model.eval(), tok


def generation_metrics(path: Path, rows: list[dict]) -> dict:
    """Greedy replies to held-out prompts: instruction-following rate, verifier pass rate, mean score."""
    model, tok = chat_model(path)
    prompts = [[{"role": "user", "content": r["prompt"]}] for r in rows]
    replies = [c[0] for c in sample_candidates(model, tok, prompts, 1, MAX_NEW, 0.0, torch.Generator())]
    follow = [follows(r, a) for r, a in zip(rows, replies)]
    scores = [verify(r, a) for r, a in zip(rows, replies)]
    by_task = {t: sum(s == 1.0 for r, s in zip(rows, scores) if r["task"] == t) /
               max(1, sum(r["task"] == t for r in rows)) for t in TASKS}
    return {"follow_rate": sum(follow) / len(rows), "pass_rate": sum(s == 1.0 for s in scores) / len(rows),
            "mean_score": sum(scores) / len(rows), "pass_rate_by_task": by_task,
            "example": {"prompt": rows[0]["prompt"], "reply": replies[0]}}


def preference_metrics(policy_dir: Path, ref_dir: Path, pairs: list[dict], beta: float = 0.1) -> dict:
    """On held-out pairs: DPO's implicit-reward accuracy against the reference (ties count half) and the policy's
    plain likelihood preference (log p(chosen) > log p(rejected))."""
    (policy, tok), (ref, _) = chat_model(policy_dir), chat_model(ref_dir)
    implicit = plain = 0.0
    with torch.no_grad():
        for row in pairs:
            rows = []
            for conv in cd.preference(row):
                ids, mask = tok.apply_chat_template(conv)
                rows.append(cd.Row(ids, mask, [1] * len(ids)))
            inputs, labels = cd.causal_targets(cd.collate(rows, tok.pad_id or 0))
            lp, lr = sequence_logps(policy(**inputs).logits, labels), sequence_logps(ref(**inputs).logits, labels)
            margin = float(beta * ((lp[0] - lr[0]) - (lp[1] - lr[1])))
            implicit += 1.0 if margin > 1e-6 else 0.5 if abs(margin) <= 1e-6 else 0.0
            plain += float(lp[0] > lp[1])
    return {"dpo_accuracy": implicit / len(pairs), "likelihood_accuracy": plain / len(pairs)}


def run_stage(cfg, tc: TrainConfig) -> tuple[Trainer, float, list[dict]]:
    t0 = time.perf_counter()
    trainer = Trainer(cfg, tc)
    trainer.run()
    records = [json.loads(x) for x in (Path(tc.out) / "metrics.jsonl").read_text().splitlines()]
    return trainer, time.perf_counter() - t0, records


def optimizer_bytes(trainer: Trainer) -> int:
    return sum(t.numel() * t.element_size() for s in trainer.optimizer.state.values() for t in s.values()
               if torch.is_tensor(t))


def preference_rows(rows: list[dict], seed: int) -> list[dict]:
    """(prompt, chosen = the reference answer, rejected = another function's answer to the same task)."""
    rng = random.Random(seed)
    out = []
    for task in TASKS:
        same = [r for r in rows if r["task"] == task]
        others = [r["response"] for r in same]
        rng.shuffle(others)
        for r, other in zip(same, others):
            if other != r["response"]:
                out.append({"prompt": r["prompt"], "chosen": r["response"], "rejected": other})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default="runs/posttrain", help="working directory (replaced)")
    p.add_argument("--pretrain-steps", type=int, default=200)
    p.add_argument("--sft-steps", type=int, default=100)
    p.add_argument("--stage-steps", type=int, default=40, help="steps of the RS, DPO and reward stages")
    p.add_argument("--rs-prompts", type=int, default=128)
    p.add_argument("--rs-k", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--reuse-pretrain", action="store_true", help="keep WORK/pretrain if it has a checkpoint")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    log.setLevel(logging.INFO)
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    for d in (work.iterdir() if work.is_dir() else []):  # start clean (the pre-trained model kept on request)
        if not (args.reuse_pretrain and d.name == "pretrain"):
            shutil.rmtree(d) if d.is_dir() else d.unlink()
    work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    results: dict = {"machine": machine(), "settings": vars(args), "stages": {}}
    S = results["stages"]
    common = dict(progress=False, samples=0, log_every=10, eval_batches=4, seed=0)

    # 0. a small pretrained model: llama-tiny on the first 6 MB of the standard library (10 % of files held out)
    cfg = llmarch.preset("llama-tiny")
    tc = TrainConfig(out=str(work / "pretrain"), steps=args.pretrain_steps, batch_size=16, seq_len=128, lr=3e-3,
                     warmup=30, max_data_mb=6.0, val_fraction=0.1, vocab_size=cfg.vocab_size,
                     eval_every=args.pretrain_steps, save_every=10**6, **common)
    if args.reuse_pretrain and (work / "pretrain" / "checkpoints").is_dir():
        secs = float("nan")
        rec = [json.loads(x) for x in (work / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    else:
        shutil.rmtree(work / "pretrain", ignore_errors=True)
        _, secs, rec = run_stage(cfg, tc)
    S["pretrain"] = {"seconds": secs, "val_loss": rec[-1]["val_loss"], "steps": args.pretrain_steps}
    log.info("pretrain: %.0f s, val_loss %.3f", secs, rec[-1]["val_loss"])

    # the instruction set from the same files; held-out files = pre-training's validation files
    root, files = data.stdlib_files()
    files = data.take_bytes(files, 6_000_000)
    rows = build_instructions(files, root, tasks=TASKS, val_fraction=0.1, max_lines=10)
    write_jsonl(rows, work / "instructions.jsonl")
    test = [r for r in rows if r["split"] == "test"]
    train_rows = [r for r in rows if r["split"] == "train"]
    results["data"] = {"rows": len(rows), "train": len(train_rows), "test": len(test)}
    S["pretrain"]["heldout"] = generation_metrics(work / "pretrain", test)

    # 1. SFT on the instruction set (full fine-tuning)
    ft = dict(batch_size=8, seq_len=256, warmup=10, weight_decay=0.0, save_every=10**6, **common)
    sft = TrainConfig(out=str(work / "sft"), objective="sft", init_from=str(work / "pretrain"),
                      data=str(work / "instructions.jsonl"), steps=args.sft_steps, lr=1e-3,
                      eval_every=args.sft_steps, **ft)
    trainer, secs, rec = run_stage(config_from_dir(str(work / "pretrain")), sft)
    S["sft"] = {"seconds": secs, "val_loss": rec[-1]["val_loss"], "heldout": generation_metrics(work / "sft", test),
                "trainable_params": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
                "optimizer_bytes": optimizer_bytes(trainer),
                "tokens_per_s": sum(r["tokens_per_s"] for r in rec) / len(rec)}
    log.info("sft: %s", S["sft"]["heldout"])

    # 2. rejection sampling from the SFT model, scored by the verifiers; a control continues SFT on references
    prompts = random.Random(0).sample(train_rows, min(args.rs_prompts, len(train_rows)))
    write_jsonl([{**r, "split": "train"} for r in prompts] + [{**r, "split": "test"} for r in test[:8]],
                work / "rs_prompts.jsonl")
    for name, extra in (("rs", dict(objective="rs", verifier="stdlib", rs_k=args.rs_k, rs_rounds=2, rs_min_score=1.0, rs_temperature=1.0,
                                    rs_max_new_tokens=MAX_NEW, data=str(work / "rs_prompts.jsonl"))),
                        ("sft_more", dict(objective="sft", data=str(work / "rs_prompts.jsonl")))):
        tc = TrainConfig(out=str(work / name), init_from=str(work / "sft"), steps=args.stage_steps, lr=3e-4,
                         eval_every=args.stage_steps, **extra, **ft)
        _, secs, rec = run_stage(config_from_dir(str(work / "sft")), tc)
        S[name] = {"seconds": secs, "heldout": generation_metrics(work / name, test)}
        if name == "rs":
            S[name]["rounds_best_score"] = [r["rs_train_best_score"] for r in rec if "rs_train_best_score" in r]
            S[name]["rounds_mean_score"] = [r["rs_train_mean_score"] for r in rec if "rs_train_mean_score" in r]
        log.info("%s: %s", name, S[name]["heldout"])

    # 3. DPO on preference pairs (chosen = the reference, rejected = another function's answer)
    pref = preference_rows(train_rows, 0)
    pref_test = preference_rows(test, 1)
    write_jsonl([{**r, "split": "train"} for r in pref] + [{**r, "split": "test"} for r in pref_test[:16]],
                work / "pairs.jsonl")
    S["dpo"] = {"before": preference_metrics(work / "sft", work / "sft", pref_test)}
    tc = TrainConfig(out=str(work / "dpo"), objective="dpo", init_from=str(work / "sft"),
                     data=str(work / "pairs.jsonl"), steps=args.stage_steps, lr=3e-4, dpo_beta=0.1, eval_every=args.stage_steps, **ft)
    _, secs, rec = run_stage(config_from_dir(str(work / "sft")), tc)
    S["dpo"].update(seconds=secs, after=preference_metrics(work / "dpo", work / "sft", pref_test),
                    train_accuracy=rec[-1].get("accuracy"), heldout=generation_metrics(work / "dpo", test))
    log.info("dpo: %s", S["dpo"])

    # 4. a reward model (scalar head on the last token) on the same pairs
    from llmarch.nn.heads import HEADS

    if "last_token" in HEADS:
        tc = TrainConfig(out=str(work / "reward"), objective="reward", init_from=str(work / "sft"),
                         data=str(work / "pairs.jsonl"), steps=args.stage_steps, lr=1e-3, eval_every=10,
                         eval_batches=8, **{k: v for k, v in ft.items() if k != "eval_batches"})
        _, secs, rec = run_stage(config_from_dir(str(work / "sft")), tc)
        evals = [r for r in rec if "val_accuracy" in r]
        S["reward"] = {"seconds": secs, "heldout_accuracy_first_eval": evals[0]["val_accuracy"],
                       "heldout_accuracy": evals[-1]["val_accuracy"], "train_accuracy": rec[-1].get("accuracy")}
    else:
        S["reward"] = {"skipped": "no 'last_token' head in this build (it comes with the LoRA / reward branch)"}
    log.info("reward: %s", S["reward"])

    # 5. LoRA vs full fine-tuning: trainable parameters, optimizer state, throughput (same SFT settings)
    try:
        from llmarch import lora  # noqa: F401
        tc = TrainConfig(out=str(work / "sft_lora"), objective="sft", init_from=str(work / "pretrain"),
                         data=str(work / "instructions.jsonl"), steps=args.stage_steps, lr=2e-3,
                         lora="r=8,alpha=16,targets=q,v", eval_every=args.stage_steps, **ft)
        trainer, secs, rec = run_stage(config_from_dir(str(work / "pretrain")), tc)
        S["sft_lora"] = {"seconds": secs, "val_loss": rec[-1]["val_loss"],
                         "trainable_params": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
                         "optimizer_bytes": optimizer_bytes(trainer),
                         "tokens_per_s": sum(r["tokens_per_s"] for r in rec) / len(rec)}
        from llmarch.train.merge import merge_run  # a LoRA run's checkpoint holds base + adapters: fold them in

        S["sft_lora"]["heldout"] = generation_metrics(merge_run(work / "sft_lora", work / "sft_lora_merged"), test)
    except ImportError:
        S["sft_lora"] = {"skipped": "llmarch.lora is not in this build"}
    log.info("lora: %s", S["sft_lora"])

    results["seconds"] = time.perf_counter() - start
    path = write_results("posttrain", results)
    print(f"\n{'stage':10s} {'follow':>7s} {'pass':>6s} {'score':>6s}")
    for name in ("pretrain", "sft", "rs", "sft_more", "dpo", "sft_lora"):
        h = S.get(name, {}).get("heldout")
        if h:
            print(f"{name:10s} {h['follow_rate']:7.3f} {h['pass_rate']:6.3f} {h['mean_score']:6.3f}")
    print(f"dpo accuracy {S['dpo']['before']} -> {S['dpo']['after']}; reward {S['reward']}")
    print(f"wrote {path} ({results['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
