"""Supervised fine-tuning (Ouyang et al. 2022; LLaMA-2's SFT stage): next-token loss on the assistant's tokens
only. Decoders read conversations rendered by the tokenizer's chat template, one or several packed per row with a
block-diagonal mask (``document_ids``); encoder-decoders (T5, Marian, Switch) read the prompt with its task prefix
and write the response (text-to-text, Raffel et al. 2020).
"""
from __future__ import annotations

import logging

import torch

from llmarch.config import ModelConfig
from llmarch.tokenizer import Tokenizer
from llmarch.train import chat_data as cd
from llmarch.train.masking import IGNORE
from llmarch.train.objectives import OBJECTIVES, Batch, Objective

log = logging.getLogger(__name__)


def encode_rows(rows, encode, limit: int, source: str, part: str = "") -> list:
    """``encode(row) -> (ids, mask)`` over (line, row) pairs of file ``source``, fitted to ``limit`` tokens; a bad
    row is a ValueError naming the file and line, truncation is reported."""
    cuts, out = cd.Cuts(), []
    name = f"{source} ({part})" if part else source
    for line, row in rows:
        try:
            ids, mask = encode(row)
        except ValueError as e:
            raise ValueError(f"{source}:{line}: {e}") from None
        fitted = cd.fit(ids, mask, limit, cuts, f"line {line}")
        if fitted is not None:
            out.append(fitted)
    cuts.report(name)
    return out


@OBJECTIVES.register("sft")
class SFT(Objective):
    """Loss on masked-in tokens of chat conversations. Rows of ``seq_len + 1`` tokens, packed when ``packing``."""

    name = "sft"
    model_kind = ("decoder", "encoder_decoder")
    extra_tokens = 1
    reads_examples = True

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, nsp: bool = False, packing: bool = True):
        super().__init__(tokenizer, vocab_size, nsp)
        self.packing = packing
        self.pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0

    @classmethod
    def from_config(cls, tokenizer: Tokenizer, cfg: ModelConfig, nsp: bool = False) -> "SFT":
        if cfg.kind == "encoder_decoder":
            return Seq2SeqSFT(tokenizer, cfg.vocab_size, nsp, cfg.decoder_start_token_id)
        return cls(tokenizer, cfg.vocab_size, nsp)

    def encode(self, row: dict) -> tuple[list[int], list[int]]:
        return self.tokenizer.apply_chat_template(cd.conversation(row))

    def sources(self, splits, tc) -> tuple:
        """Rows from ``splits`` ((line, row) lists, or a task mixture's streams) as example streams."""
        if hasattr(splits, "sources"):  # a task mixture renders its own examples
            return splits.sources(self, tc)
        self.packing = tc.packing
        limit = tc.seq_len + self.extra_tokens
        streams = []
        for part, rows in (("train", splits.train), ("validation", splits.val)):
            examples = encode_rows(rows, self.encode, limit, str(tc.data), part)
            streams.append(cd.ExampleSource(self.rows(examples, limit), seed=tc.seed, shuffle=part == "train",
                                            name=f"{tc.data} ({part})"))
        return tuple(streams)

    def rows(self, examples: list, limit: int) -> list:
        return cd.pack(examples, limit, self.packing)

    def make_batch(self, chunk: list, generator: torch.Generator) -> Batch:
        inputs, labels = cd.causal_targets(cd.collate(chunk, self.pad_id))
        return Batch(inputs, {"lm": labels}, {"lm": int((labels != IGNORE).sum())})


class Seq2SeqSFT(SFT):
    """Text-to-text: the encoder reads ``prefix + prompt`` (+ eos), the decoder writes ``response`` + eos behind
    the decoder start token. Rows: ``{"prompt", "response"}`` (optional ``"prefix"``, e.g. ``"summarize: "``) or
    messages (the earlier turns are the input, the last assistant message the target)."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, nsp: bool = False, start_id: int | None = None):
        super().__init__(tokenizer, vocab_size, nsp)
        self.eos_id = tokenizer.require("eos")
        self.start_id = self.pad_id if start_id is None else start_id

    def encode(self, row: dict) -> tuple[list[int], list[int]]:
        messages = cd.conversation(row)
        if messages[-1].get("role") != "assistant":
            raise ValueError("the last message must be the assistant's (the target)")
        source = row.get("prefix", "") + "\n".join(m["content"] for m in messages[:-1])
        src = self.tokenizer.encode(source) + [self.eos_id]
        tgt = self.tokenizer.encode(messages[-1]["content"]) + [self.eos_id]
        return src + tgt, [0] * len(src) + [1] * len(tgt)  # one sequence: the mask tells the two apart

    def rows(self, examples: list, limit: int) -> list:
        return cd.pack(examples, limit, packing=False)

    def make_batch(self, chunk: list, generator: torch.Generator) -> Batch:
        src, source_mask = cd.right_pad([[i for i, m in zip(r.ids, r.mask) if not m] for r in chunk], self.pad_id)
        tgt, target_mask = cd.right_pad([[i for i, m in zip(r.ids, r.mask) if m] for r in chunk], self.pad_id)
        start = torch.full((len(chunk), 1), self.start_id, dtype=torch.long)
        labels = tgt.masked_fill(target_mask == 0, IGNORE)
        return Batch({"input_ids": src, "attention_mask": source_mask,
                      "decoder_input_ids": torch.cat([start, tgt[:, :-1]], dim=1)},
                     {"lm": labels}, {"lm": int(target_mask.sum())})


__all__ = ["SFT", "Seq2SeqSFT", "encode_rows"]
