"""Training objectives: how a packed chunk of tokens becomes model inputs and labels, and the loss terms.

An objective returns per-term *sums* and the number of positions each term counts, so the loop can divide by the
token count of the whole global batch (all micro-batches, all ranks): the loss is then the same whatever the split
into micro-batches and processes. MoE auxiliary losses are added by the loop from ``out.aux_loss``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from llmarch.config import ModelConfig
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
    model_options: dict = {}  # extra keyword arguments of the model's forward (flags, not tensors)

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, nsp: bool = False):
        self.tokenizer, self.vocab_size = tokenizer, vocab_size
        if nsp:
            raise ValueError(f"nsp: next-sentence prediction belongs to the mlm objective, not {type(self).name}")

    @classmethod
    def from_config(cls, tokenizer: Tokenizer, cfg: ModelConfig, nsp: bool = False) -> "Objective":
        return cls(tokenizer, cfg.vocab_size, nsp=nsp)

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


@OBJECTIVES.register("causal_lm_exits")
class CausalLMWithExits(CausalLM):
    """Next-token prediction with intermediate losses for learned early exits (exit_heads models): the final LM loss,
    the same loss on every exit layer's prediction through the shared head (``exit_lm``), and a binary
    cross-entropy teaching each exit gate whether its layer already predicts what the full model predicts
    (``exit_gate``: the target is agreement of the arg-maxes, so exits aim to keep the full model's output)."""

    name = "causal_lm_exits"
    model_options = {"output_exits": True}

    def make_batch(self, chunk: torch.Tensor, generator: torch.Generator) -> Batch:
        batch = super().make_batch(chunk, generator)
        n = batch.counts["lm"]
        batch.counts.update(exit_lm=n, exit_gate=n)  # both are means over the exit layers of per-token sums
        return batch

    def loss_sums(self, out, batch: Batch) -> dict[str, torch.Tensor]:
        if out.exit_logits is None:
            raise ValueError("objective: causal_lm_exits needs a model with exit_heads=True (--set exit_heads=true)")
        labels = batch.labels["lm"]
        final = out.logits.argmax(-1)
        exit_lm = sum(ce_sum(lg, labels) for lg in out.exit_logits)
        gate = sum(F.binary_cross_entropy(c, (lg.argmax(-1) == final).float(), reduction="sum")
                   for lg, c in zip(out.exit_logits, out.exit_confidence))
        return {"lm": ce_sum(out.logits, labels), "exit_lm": exit_lm / len(out.exit_logits),
                "exit_gate": gate / len(out.exit_logits)}


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
                 mean_span: float = 3.0, decoder_start_token_id: int | None = None):
        super().__init__(tokenizer, vocab_size, nsp)
        self.density, self.mean_span = density, mean_span
        self.eos_id = tokenizer.require("eos")
        # the decoder reads the targets shifted right behind the start token (default: pad, T5's convention)
        self.start_id = tokenizer.require("pad") if decoder_start_token_id is None else decoder_start_token_id
        if not tokenizer.sentinel_ids:
            raise ValueError("span corruption needs sentinel tokens <extra_id_0>, <extra_id_1>, ... in the tokenizer")

    @classmethod
    def from_config(cls, tokenizer: Tokenizer, cfg: ModelConfig, nsp: bool = False) -> "SpanCorruption":
        return cls(tokenizer, cfg.vocab_size, nsp=nsp, decoder_start_token_id=cfg.decoder_start_token_id)

    def make_batch(self, chunk: torch.Tensor, generator: torch.Generator) -> Batch:
        inputs, targets = span_corrupt(chunk, self.tokenizer.sentinel_ids, self.eos_id, generator, self.density,
                                       self.mean_span)
        start = torch.full((len(targets), 1), self.start_id, dtype=targets.dtype)
        decoder_inputs = torch.cat([start, targets[:, :-1]], dim=1)
        return Batch({"input_ids": inputs, "decoder_input_ids": decoder_inputs}, {"lm": targets},
                     {"lm": targets.numel()})


# what pre-trains a model when no objective is named: its head's objective (with NSP for the head that has an NSP
# output), else its kind's
HEAD_OBJECTIVES = {"mlm": ("mlm", False), "pretraining": ("mlm", True)}
KIND_OBJECTIVES = {"decoder": "causal_lm", "encoder_decoder": "span"}


def default_objective(cfg: ModelConfig) -> tuple[str, bool]:
    """(objective name, nsp) that pre-trains ``cfg``: head mlm -> mlm, pretraining -> mlm + NSP, else by kind."""
    if cfg.head in HEAD_OBJECTIVES:
        return HEAD_OBJECTIVES[cfg.head]
    if cfg.kind in KIND_OBJECTIVES:
        return KIND_OBJECTIVES[cfg.kind], False
    raise ValueError(f"objective: nothing pre-trains kind {cfg.kind!r} with head {cfg.head!r}; use head "
                     f"{sorted(HEAD_OBJECTIVES)} (--set head=mlm) or name one with --objective {OBJECTIVES.names()}")


def objective_for(name: str | None, cfg: ModelConfig, tokenizer: Tokenizer, nsp: bool | None = None) -> Objective:
    """The named objective (default: :func:`default_objective`), checked against the model's kind and head.
    ``nsp`` None = on when the head has an NSP output and the objective is mlm."""
    if name is None:
        name, default_nsp = default_objective(cfg)
    else:
        default_nsp = HEAD_OBJECTIVES.get(cfg.head) == (name, True)
    cls = OBJECTIVES[name]
    if cls.model_kind != cfg.kind:
        raise ValueError(f"objective: {name!r} trains {cls.model_kind} models but the config's kind is "
                         f"{cfg.kind!r}; pick --objective for that kind or change the config")
    nsp = default_nsp if nsp is None else nsp
    objective = cls.from_config(tokenizer, cfg, nsp=nsp)
    if nsp and not HEAD_OBJECTIVES.get(cfg.head, (None, False))[1]:
        raise ValueError(f"nsp: next-sentence prediction needs a head with NSP logits (head 'pretraining'), "
                         f"not {cfg.head!r}; --set head=pretraining or drop --nsp")
    return objective


__all__ = ["OBJECTIVES", "Objective", "Batch", "objective_for", "default_objective", "ce_sum"]
