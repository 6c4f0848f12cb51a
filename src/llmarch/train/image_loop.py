"""Training a vision-language model on image-text pairs (``llmarch train --images digits|shapes``): a BPE over
the pairs' text, the model's image token appended to it, then AdamW + warmup-cosine steps on the answer tokens,
with held-out loss and answer accuracy (greedy, KV-cached, image features computed once) at each evaluation,
under the main trainer's guards (run-directory lock, non-finite stop, checkpoints every ``save_every``, resume).
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
from llmarch.tokenizer import TOKENIZER_FILE, load_tokenizer, train_tokenizer
from llmarch.train import checkpoints as ckpt
from llmarch.train.finite import check_record, check_weights
from llmarch.train.image_text import SOURCES, encode_pairs, split
from llmarch.train.loop import TrainResult
from llmarch.train.metrics import Metrics
from llmarch.train.optim import WarmupCosine, keep_implementation, make_optimizer
from llmarch.train.rundir import RunDirectory
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


class ImageRun:
    """The state of one image-text run: data, tokenizer, model, optimizer, schedule and the sampling generator,
    fresh or restored from the run's newest good checkpoint (``--resume``)."""

    def __init__(self, model_cfg: ModelConfig, tc: TrainConfig):
        self.tc, self.out = tc, Path(tc.out)
        found, loaded = ckpt.find_resume(self.out, tc.resume)
        torch.manual_seed(tc.seed)
        pairs = SOURCES[tc.images](tc.seed)
        self.train, self.test = split(pairs, HELD_OUT, tc.seed)
        self.chance = 1 / len({p.answer for p in pairs if p.question == self.test[0].question})
        if found is None:
            texts = [f"{p.question} {p.answer}" for p in self.train] * 4
            self.tok = train_tokenizer(iter(texts), tc.vocab_size or 320)
        else:  # the run's own tokenizer, and its model config (refused when the flags asked for another)
            self.tok = load_tokenizer(found / TOKENIZER_FILE)
        self.cfg = fit_vision_config(model_cfg, self.tok)
        if loaded is not None and loaded["config"] != self.cfg:
            raise ValueError(f"--resume: the model config differs from the checkpoint's ({found}); resume with the "
                             "run's own config (omit --preset/--config/--set) or choose a new --out")
        processor = ImageProcessor.for_size(self.cfg.vision.image_size)
        self.px_train, self.px_test = processor([p.image for p in self.train]), processor([p.image for p in self.test])
        self.model = build(self.cfg)
        self.optimizer = make_optimizer(self.model, tc.lr, tc.weight_decay, (tc.beta1, tc.beta2), tc.eps)
        self.schedule = WarmupCosine(self.optimizer, tc.lr, tc.warmup, tc.steps, tc.min_lr_ratio)
        self.sampler = torch.Generator().manual_seed(tc.seed)  # which pairs each step trains on
        self.step = 0
        if loaded is not None:
            s = loaded["state"]
            self.model.load_state_dict(loaded["model"])
            self.optimizer.load_state_dict(loaded["optimizer"])
            keep_implementation(self.optimizer)
            self.schedule.load_state_dict(s["schedule"])
            self.step = s["step"]
            torch.set_rng_state(loaded["rng"]["rank0.cpu"])
            self.sampler.set_state(loaded["rng"]["rank0.sampling"])

    def train_step(self) -> dict:
        """One optimizer step on a random batch of pairs: the record to log (host floats)."""
        tc, cfg = self.tc, self.cfg
        idx = torch.randint(0, len(self.train), (tc.batch_size,), generator=self.sampler)
        ids, mask, loss_mask = encode_pairs([self.train[i] for i in idx.tolist()], self.tok, cfg.vision)
        logits = self.model(ids, attention_mask=mask, pixel_values=self.px_train[idx]).logits[:, :-1]
        keep = loss_mask[:, 1:].bool()
        loss = torch.nn.functional.cross_entropy(logits[keep].float(), ids[:, 1:][keep])
        loss.backward()
        record = {"step": self.step + 1, "loss": float(loss.detach()), "lr": self.schedule.lr}
        if tc.clip > 0:
            record["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), tc.clip))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.schedule.step()
        self.step += 1
        record["tokens"], record["images"] = int(mask.sum()), len(idx)
        return record

    def save(self) -> Path:
        weights = self.model.state_dict()
        check_weights(weights, self.step)  # never a NaN checkpoint
        state = {"step": self.step, "consumed": self.step * self.tc.batch_size, "world": 1,
                 "schedule": self.schedule.state_dict(), "train": self.tc.to_dict()}
        rng = {"rank0.cpu": torch.get_rng_state(), "rank0.sampling": self.sampler.get_state()}
        return ckpt.save_checkpoint(self.out, self.step, self.cfg, weights, self.optimizer.state_dict(), rng, state,
                                    self.tok, self.tc.keep_last)

    def run(self) -> TrainResult:
        tc, out = self.tc, self.out
        last = tc.stop_at or tc.steps
        metrics = Metrics(out, True, tc.steps, self.step, tc.progress)
        (out / "train.json").write_text(json.dumps(tc.to_dict(), indent=1) + "\n")
        self.cfg.to_file(out / "model_config.json")
        result = TrainResult(self.step, float("nan"), config=self.cfg)
        t0, tokens, images, busy = time.perf_counter(), 0, 0, 0.0
        try:
            while self.step < last:
                record = self.train_step()
                check_record(record, out)  # a NaN loss or gradient norm stops the run, naming the step
                tokens, images = tokens + record.pop("tokens"), images + record.pop("images")
                metrics.advance()
                step, result.step, result.loss = self.step, self.step, record["loss"]
                final = step == tc.steps
                if step % tc.log_every == 0 or step % tc.eval_every == 0 or step == last:
                    busy += time.perf_counter() - t0
                    record.update(tokens_per_s=tokens / busy, images_per_s=images / busy)
                    if step % tc.eval_every == 0 or step == last:
                        n = len(self.test) if final else min(len(self.test), tc.eval_batches * tc.batch_size)
                        record["val_loss"], record["accuracy"], _ = evaluate(
                            self.model, self.tok, self.test[:n], self.px_test[:n], tc.batch_size * 4)
                        record["val_ppl"] = float(torch.tensor(record["val_loss"]).exp())
                        result.val_losses.append((step, record["val_loss"]))
                    metrics.log(record)
                if step % tc.save_every == 0 or step == last:
                    result.checkpoint = self.save()
                if "tokens_per_s" in record:
                    t0 = time.perf_counter()
                if final:
                    self.summarise(record)
        finally:
            metrics.close()
        return result

    def summarise(self, record: dict) -> None:
        """RUN/eval.json: the final held-out accuracy beside chance, and the throughput of the last interval."""
        summary = {"images": self.tc.images, "fusion": self.cfg.vision.fusion, "steps": self.tc.steps,
                   "held_out": len(self.test), "accuracy": record["accuracy"], "chance": self.chance,
                   "val_loss": record["val_loss"], "tokens_per_s": record["tokens_per_s"],
                   "images_per_s": record["images_per_s"]}
        (self.out / "eval.json").write_text(json.dumps(summary, indent=1) + "\n")
        log.info("held-out accuracy %.3f (chance %.3f) on %d pairs", summary["accuracy"], self.chance,
                 len(self.test))


def train_image_text(model_cfg: ModelConfig, tc: TrainConfig) -> TrainResult:
    """Train ``model_cfg`` (with ``vision``) on the image-text source ``tc.images``, under the main trainer's
    guards: the run directory locked (and removed if the run fails before its first checkpoint), a non-finite
    loss or gradient norm stops it, checkpoints every ``save_every`` steps (never with NaN weights), ``--resume``
    continues from the newest good one (same batches, same weights as an uninterrupted run)."""
    if model_cfg.vision is not None and model_cfg.vision.positions != "learned":
        raise ValueError(f"vision.positions: --images trains towers that read one image ('learned'); "
                         f"{model_cfg.vision.positions!r} (tiles, Llama 3.2 Vision) is not wired into this loop; "
                         "train llava-tiny, llava-tiny-xattn or llava-tiny-joint")
    with RunDirectory(tc.out):
        return ImageRun(model_cfg, tc).run()


__all__ = ["ImageRun", "evaluate", "fit_vision_config", "train_image_text"]
