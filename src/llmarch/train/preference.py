"""Preference objectives on (prompt, chosen, rejected) rows: a reward model with the Bradley-Terry loss
(Ouyang et al. 2022; LLaMA-2's reward models) and Direct Preference Optimization (Rafailov et al. 2023).

A batch of B pairs is one forward over 2B right-padded rows: the B chosen conversations, then the B rejected ones.
Both log what the literature reports: accuracy (chosen scored above rejected), the mean chosen / rejected reward
and their margin.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from llmarch.config import ModelConfig
from llmarch.tokenizer import Tokenizer
from llmarch.train import chat_data as cd
from llmarch.train.masking import IGNORE
from llmarch.train.objectives import OBJECTIVES, Batch, Objective
from llmarch.train.sft import encode_rows


class Preference(Objective):
    """Shared: rows -> pairs of fitted (ids, mask) conversations; metrics accumulated between logs."""

    model_kind = "decoder"
    reads_examples = True

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, nsp: bool = False):
        super().__init__(tokenizer, vocab_size, nsp)
        self.pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0
        self._metrics: dict[str, list[float]] = {}

    def encode_pair(self, row: dict):
        chosen, rejected = cd.preference(row)
        return self.tokenizer.apply_chat_template(chosen), self.tokenizer.apply_chat_template(rejected)

    def sources(self, splits, tc) -> tuple:
        limit = tc.seq_len + self.extra_tokens
        streams = []
        for part, rows in (("train", splits.train), ("validation", splits.val)):
            name = f"{tc.data} ({part})"
            chosen = encode_rows(rows, lambda r: self.encode_pair(r)[0], limit, str(tc.data), part + ", chosen")
            rejected = encode_rows(rows, lambda r: self.encode_pair(r)[1], limit, str(tc.data), part + ", rejected")
            if len(chosen) != len(rejected):
                raise ValueError(f"{name}: truncation left an answer of some pairs empty; raise --seq-len")
            pairs = [(cd.Row(c[0], c[1], [1] * len(c[0])), cd.Row(r[0], r[1], [1] * len(r[0])))
                     for c, r in zip(chosen, rejected)]
            streams.append(cd.ExampleSource(pairs, seed=tc.seed, shuffle=part == "train", name=name))
        return tuple(streams)

    def collated(self, chunk: list) -> dict[str, torch.Tensor]:
        return cd.collate([c for c, _ in chunk] + [r for _, r in chunk], self.pad_id)

    def record(self, chosen: torch.Tensor, rejected: torch.Tensor) -> None:
        """Accumulate metrics of rewards chosen [B], rejected [B]."""
        c, r = chosen.detach().float(), rejected.detach().float()
        for name, v in (("accuracy", (c > r).float()), ("reward_chosen", c), ("reward_rejected", r),
                        ("reward_margin", c - r)):
            s = self._metrics.setdefault(name, [0.0, 0.0])
            s[0] += float(v.sum())
            s[1] += len(v)

    def pop_metrics(self) -> dict[str, tuple[float, float]]:
        out = {k: (v[0], v[1]) for k, v in self._metrics.items()}
        self._metrics = {}
        return out


@OBJECTIVES.register("reward")
class Reward(Preference):
    """Bradley-Terry: loss = -log sigmoid(r(chosen) - r(rejected)), r the scalar head on the last real token
    (``head="last_token"``, ``n_labels=1``: logits [B, 1])."""

    name = "reward"
    main_term = "reward"

    @classmethod
    def fit_config(cls, cfg: ModelConfig) -> ModelConfig:
        return cfg if (cfg.head, getattr(cfg, "n_labels", None)) == ("last_token", 1) else \
            cfg.replace(head="last_token", n_labels=1)

    def make_batch(self, chunk: list, generator: torch.Generator) -> Batch:
        t = self.collated(chunk)
        real = (t["docs"] > 0).long()
        return Batch({"input_ids": t["ids"], "attention_mask": real}, {}, {"reward": len(chunk)})

    def loss_sums(self, out, batch: Batch) -> dict[str, torch.Tensor]:
        scores = out.logits.float().reshape(len(out.logits), -1)[:, 0]  # [2B]
        chosen, rejected = scores.chunk(2)
        self.record(chosen, rejected)
        return {"reward": -F.logsigmoid(chosen - rejected).sum()}


def lora_settings(model) -> dict | None:
    """The model's LoRA settings, or None (also when llmarch.lora is not installed in this build)."""
    try:
        from llmarch import lora
    except ImportError:
        return None
    return lora.settings(model)


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of log p(label) over the positions that carry one. logits [B, T, V], labels [B, T] -> [B] (fp32)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    keep = labels != IGNORE
    picked = logp.gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    return (picked * keep).sum(-1)


@OBJECTIVES.register("dpo")
class DPO(Preference):
    """loss = -log sigmoid(beta * [(log pi(y_c) - log ref(y_c)) - (log pi(y_r) - log ref(y_r))]) over the
    response tokens; the implicit rewards beta * (log pi - log ref) are logged. The reference is the starting
    model, frozen: with LoRA the same model with its adapters off (no second copy), else a copy."""

    name = "dpo"
    main_term = "dpo"
    extra_tokens = 1
    beta = 0.1

    def sources(self, splits, tc) -> tuple:
        self.beta = tc.dpo_beta
        return super().sources(splits, tc)

    def attach(self, model) -> None:
        if lora_settings(model) is not None:
            from llmarch import lora

            def reference(**inputs):  # the base: adapters off, no dropout
                was_training = model.training
                model.eval()
                try:
                    with lora.disabled(model):
                        return model(**inputs)
                finally:
                    model.train(was_training)
            self.reference = reference
        else:
            frozen = copy.deepcopy(model).eval()
            frozen.requires_grad_(False)
            self.reference = frozen

    def make_batch(self, chunk: list, generator: torch.Generator) -> Batch:
        inputs, labels = cd.causal_targets(self.collated(chunk))
        return Batch(inputs, {"response": labels}, {"dpo": len(chunk)})

    def loss_sums(self, out, batch: Batch) -> dict[str, torch.Tensor]:
        labels = batch.labels["response"]
        with torch.no_grad():
            ref_logps = sequence_logps(self.reference(**batch.inputs).logits, labels)
        logps = sequence_logps(out.logits, labels)
        chosen, rejected = (self.beta * (logps - ref_logps)).chunk(2)
        self.record(chosen, rejected)
        return {"dpo": -F.logsigmoid(chosen - rejected).sum()}


__all__ = ["Reward", "DPO", "Preference", "sequence_logps"]
