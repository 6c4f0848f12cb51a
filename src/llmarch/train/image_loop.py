"""Training a vision-language model on image-text pairs (``llmarch train --images digits|shapes``): a BPE over
the pairs' text, the model's image token appended to it, then AdamW + warmup-cosine steps on the answer tokens,
with held-out loss and answer accuracy (greedy, KV-cached, image features computed once) at each evaluation.
Writes RUN/metrics.jsonl (``loss``, ``lr``, ``tokens_per_s``, ``images_per_s``, ``val_loss``, ``accuracy``),
checkpoints and RUN/eval.json (final held-out accuracy, chance level, throughput)."""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch

from llmarch.config import ModelConfig
from llmarch.image_processing import ImageProcessor
from llmarch.infer.generate import generate
from llmarch.model import build
from llmarch.tokenizer import train_tokenizer
from llmarch.train import checkpoints as ckpt
from llmarch.train.image_text import SOURCES, encode_pairs, split
from llmarch.train.loop import TrainResult
from llmarch.train.metrics import Metrics
from llmarch.train.optim import WarmupCosine, make_optimizer
from llmarch.train.settings import TrainConfig

log = logging.getLogger(__name__)
HELD_OUT = 0.2  # share of the pairs kept for evaluation


def fit_vision_config(cfg: ModelConfig, tok) -> ModelConfig:
    """The vocabulary of ``tok`` plus one image token (projector fusion) and the tokenizer's special ids."""
    if cfg.vision is None:
        raise ValueError("--images: the model has no vision tower; use a vision preset (llava-tiny, "
                         "llava-tiny-xattn) or set vision=...")
    image_token = tok.vocab_size if cfg.vision.fusion == "projector" else None
    vocab = tok.vocab_size + (image_token is not None)
    return cfg.replace(vocab_size=vocab, pad_token_id=tok.pad_id, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
                       vision=cfg.vision.replace(image_token_id=image_token))


@torch.no_grad()
def evaluate(model, tok, pairs, pixels: torch.Tensor, batch: int) -> tuple[float, float, list]:
    """(held-out loss on the answers, answer accuracy, the answers) over ``pairs`` with their pixel values.
    Greedy answers get room for the longest true answer and one more token."""
    model.eval()
    new_tokens = max(len(tok.encode(" " + p.answer)) for p in pairs) + 1
    total = count = correct = 0.0
    answers = []
    for s in range(0, len(pairs), batch):
        part, px = pairs[s:s + batch], pixels[s:s + batch]
        ids, mask, loss_mask = encode_pairs(part, tok, model.config.vision)
        logits = model(ids, attention_mask=mask, pixel_values=px).logits[:, :-1]
        keep = loss_mask[:, 1:].bool()
        total += float(torch.nn.functional.cross_entropy(logits[keep].float(), ids[:, 1:][keep], reduction="sum"))
        count += int(keep.sum())
        prompts, pmask, _ = encode_pairs(part, tok, model.config.vision, with_answer=False)
        out = generate(model, prompts, attention_mask=pmask, pixel_values=px, max_new_tokens=new_tokens,
                       eos_token_id=tok.eos_id, pad_token_id=tok.eos_id)
        for p, row in zip(part, out[:, prompts.shape[1]:].tolist()):
            row = row[:row.index(tok.eos_id)] if tok.eos_id in row else row
            said = tok.decode(row).strip()
            answers.append(said)
            correct += said == p.answer
    model.train()
    return total / max(count, 1), correct / len(pairs), answers


def train_image_text(model_cfg: ModelConfig, tc: TrainConfig) -> TrainResult:
    """Train ``model_cfg`` (with ``vision``) on the image-text source ``tc.images``."""
    if model_cfg.vision.positions != "learned":
        raise ValueError(f"vision.positions: --images trains towers that read one image ('learned'); "
                         f"{model_cfg.vision.positions!r} (tiles, Llama 3.2 Vision) is not wired into this loop; "
                         "train llava-tiny or llava-tiny-xattn")
    out = Path(tc.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(tc.seed)
    pairs = SOURCES[tc.images](tc.seed)
    train, test = split(pairs, HELD_OUT, tc.seed)
    texts = [f"{p.question} {p.answer}" for p in train] * 4
    tok = train_tokenizer(iter(texts), tc.vocab_size or 320)
    cfg = fit_vision_config(model_cfg, tok)
    processor = ImageProcessor.for_size(cfg.vision.image_size)
    px_train, px_test = processor([p.image for p in train]), processor([p.image for p in test])
    model = build(cfg)
    optimizer = make_optimizer(model, tc.lr, tc.weight_decay, (tc.beta1, tc.beta2), tc.eps)
    schedule = WarmupCosine(optimizer, tc.lr, tc.warmup, tc.steps, tc.min_lr_ratio)
    metrics = Metrics(out, True, tc.steps, 0, tc.progress)
    (out / "train.json").write_text(json.dumps(tc.to_dict(), indent=1) + "\n")
    cfg.to_file(out / "model_config.json")
    g = torch.Generator().manual_seed(tc.seed)
    result = TrainResult(0, float("nan"), config=cfg)
    t0, tokens, images, busy = time.perf_counter(), 0, 0, 0.0
    try:
        for step in range(1, tc.steps + 1):
            idx = torch.randint(0, len(train), (tc.batch_size,), generator=g)
            ids, mask, loss_mask = encode_pairs([train[i] for i in idx.tolist()], tok, cfg.vision)
            logits = model(ids, attention_mask=mask, pixel_values=px_train[idx]).logits[:, :-1]
            keep = loss_mask[:, 1:].bool()
            loss = torch.nn.functional.cross_entropy(logits[keep].float(), ids[:, 1:][keep])
            loss.backward()
            if tc.clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), tc.clip)
            lr = schedule.lr
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            schedule.step()
            tokens, images = tokens + int(mask.sum()), images + len(idx)
            metrics.advance()
            result.step, result.loss = step, float(loss.detach())
            if step % tc.log_every == 0 or step % tc.eval_every == 0 or step == tc.steps:
                busy += time.perf_counter() - t0
                record = {"step": step, "loss": result.loss, "lr": lr, "tokens_per_s": tokens / busy,
                          "images_per_s": images / busy}
                if step % tc.eval_every == 0 or step == tc.steps:
                    n = min(len(test), tc.eval_batches * tc.batch_size) if step < tc.steps else len(test)
                    record["val_loss"], record["accuracy"], _ = evaluate(model, tok, test[:n], px_test[:n],
                                                                         tc.batch_size * 4)
                    record["val_ppl"] = float(torch.tensor(record["val_loss"]).exp())
                    result.val_losses.append((step, record["val_loss"]))
                metrics.log(record)
                t0 = time.perf_counter()
        state = {"step": tc.steps, "train": tc.to_dict(), "world": 1}
        result.checkpoint = ckpt.save_checkpoint(out, tc.steps, cfg, model.state_dict(), optimizer.state_dict(),
                                                 {"rank0.cpu": torch.get_rng_state()}, state, tok, tc.keep_last)
        chance = 1 / len({p.answer for p in pairs if p.question == test[0].question})
        summary = {"images": tc.images, "fusion": cfg.vision.fusion, "steps": tc.steps, "held_out": len(test),
                   "accuracy": record["accuracy"], "chance": chance, "val_loss": record["val_loss"],
                   "tokens_per_s": record["tokens_per_s"], "images_per_s": record["images_per_s"]}
        (out / "eval.json").write_text(json.dumps(summary, indent=1) + "\n")
        log.info("held-out accuracy %.3f (chance %.3f) on %d pairs", summary["accuracy"], chance, len(test))
    finally:
        metrics.close()
    return result


__all__ = ["evaluate", "fit_vision_config", "train_image_text"]
