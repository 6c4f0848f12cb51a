"""Training objectives: how a packed chunk of tokens becomes model inputs and labels, and the loss terms.

An objective returns per-term *sums* and the number of positions each term counts, so the loop can divide by the
token count of the whole global batch (all micro-batches, all ranks): the loss is then the same whatever the split
into micro-batches and processes. MoE auxiliary losses are added by the loop from ``out.aux_loss``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from llmarch.registry import Registry
from llmarch.tokenizer import Tokenizer
from llmarch.train.masking import IGNORE, mlm_mask, nsp_pairs, span_corrupt

OBJECTIVES: Registry[type["Objective"]] = Registry("objective")


@dataclass
class Batch:
    inputs: dict[str, torch.Tensor]  # keyword arguments of the model's forward
    labels: dict[str, torch.Tensor]  # loss term -> labels (IGNORE = no loss)
    counts: dict[str, int]  # loss term -> positions that carry loss

    @property
    def tokens(self) -> int:
        """Tokens the model reads (for throughput)."""
        return sum(v.numel() for k, v in self.inputs.items() if k.endswith("input_ids"))


def ce_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy in fp32. logits [B, T, V], labels [B, T] -> scalar."""
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE, reduction="sum")


class Objective:
    """Base: ``extra_tokens`` more tokens per chunk than the model reads; ``model_kind`` the model it trains."""

    extra_tokens = 0
    model_kind = "decoder"
    main_term = "lm"

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, nsp: bool = False):
        self.tokenizer, self.vocab_size = tokenizer, vocab_size
        if nsp:
            raise ValueError(f"nsp: next-sentence prediction belongs to the mlm objective, not {type(self).name}")

    def make_batch(self, chunk: torch.Tensor, generator: torch.Generator) -> Batch:
        raise NotImplementedError

    def loss_sums(self, out, batch: Batch) -> dict[str, torch.Tensor]:
        return {"lm": ce_sum(out.logits, batch.labels["lm"])}


@OBJECTIVES.register("causal_lm")
class CausalLM(Objective):
    """Next-token prediction: inputs are the chunk minus its last token, labels the chunk shifted by one."""

    name = "causal_lm"
    extra_tokens = 1
    model_kind = "decoder"

    def make_batch(self, chunk: torch.Tensor, generator: torch.Generator) -> Batch:
        labels = chunk[:, 1:]
        return Batch({"input_ids": chunk[:, :-1]}, {"lm": labels}, {"lm": labels.numel()})


@OBJECTIVES.register("mlm")
class MaskedLM(Objective):
    """Masked LM with dynamic masking (RoBERTa), optionally with next-sentence prediction (BERT)."""

    name = "mlm"
    model_kind = "encoder"

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, nsp: bool = False, prob: float = 0.15):
        self.tokenizer, self.vocab_size, self.nsp, self.prob = tokenizer, vocab_size, nsp, prob
        self.mask_id = tokenizer.require("mask")
        if nsp:
            self.cls_id, self.sep_id = tokenizer.require("cls"), tokenizer.require("sep")
        self.special = torch.tensor(sorted(tokenizer.special_ids), dtype=torch.long)

    def make_batch(self, chunk: torch.Tensor, generator: torch.Generator) -> Batch:
        inputs, labels, counts = {}, {}, {}
        ids = chunk
        if self.nsp:
            ids, inputs["token_type_ids"], labels["nsp"] = nsp_pairs(chunk[:, 3:], self.cls_id, self.sep_id,
                                                                      generator)
            counts["nsp"] = len(labels["nsp"])
        inputs["input_ids"], labels["lm"] = mlm_mask(ids, self.mask_id, self.special, self.vocab_size, generator,
                                                     self.prob)
        counts["lm"] = int((labels["lm"] != IGNORE).sum())
        return Batch(inputs, labels, counts)

    def loss_sums(self, out, batch: Batch) -> dict[str, torch.Tensor]:
        sums = {"lm": ce_sum(out.logits, batch.labels["lm"])}
        if self.nsp:
            nsp_logits = getattr(out, "nsp_logits", None)  # [B, 2]
            if nsp_logits is None:
                raise ValueError("nsp: the model returns no nsp_logits; give the config an NSP head or drop --nsp")
            sums["nsp"] = F.cross_entropy(nsp_logits.float(), batch.labels["nsp"], reduction="sum")
        return sums


@OBJECTIVES.register("span")
class SpanCorruption(Objective):
    """T5 span corruption: the encoder reads the corrupted text, the decoder writes the dropped spans."""

    name = "span"
    model_kind = "encoder_decoder"

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, nsp: bool = False, density: float = 0.15,
                 mean_span: float = 3.0):
        super().__init__(tokenizer, vocab_size, nsp)
        self.density, self.mean_span = density, mean_span
        self.eos_id = tokenizer.require("eos")
        self.start_id = tokenizer.require("pad")  # the decoder starts from the pad token (T5's convention)
        if not tokenizer.sentinel_ids:
            raise ValueError("span corruption needs sentinel tokens <extra_id_0>, <extra_id_1>, ... in the tokenizer")

    def make_batch(self, chunk: torch.Tensor, generator: torch.Generator) -> Batch:
        inputs, targets = span_corrupt(chunk, self.tokenizer.sentinel_ids, self.eos_id, generator, self.density,
                                       self.mean_span)
        start = torch.full((len(targets), 1), self.start_id, dtype=targets.dtype)
        decoder_inputs = torch.cat([start, targets[:, :-1]], dim=1)
        return Batch({"input_ids": inputs, "decoder_input_ids": decoder_inputs}, {"lm": targets},
                     {"lm": targets.numel()})


def objective_for(name: str | None, model_kind: str, tokenizer: Tokenizer, vocab_size: int,
                  nsp: bool = False) -> Objective:
    """The named objective (default: the one that trains ``model_kind``), checked against the model kind."""
    if name is None:
        name = next((n for n in OBJECTIVES if OBJECTIVES[n].model_kind == model_kind), None)
        if name is None:
            raise ValueError(f"objective: no objective trains model kind {model_kind!r}; choose one of "
                             f"{OBJECTIVES.names()}")
    cls = OBJECTIVES[name]
    if cls.model_kind != model_kind:
        raise ValueError(f"objective: {name!r} trains {cls.model_kind} models but the config's kind is "
                         f"{model_kind!r}; pick --objective for that kind or change the config")
    return cls(tokenizer, vocab_size, nsp=nsp)


__all__ = ["OBJECTIVES", "Objective", "Batch", "objective_for", "ce_sum"]
