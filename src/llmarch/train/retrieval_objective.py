"""Training a dense retriever (DPR, Karpukhin et al. 2020) on unlabelled text with the inverse cloze task (ICT,
Lee et al. 2019): a span cut out of a passage is the question, the passage without it is the positive context,
and every other passage of the batch is a negative (in-batch negatives). One encoder embeds both sides (the
shared-encoder DPR variant), so a single forward over [questions; contexts] serves the loop; a separate question
encoder is a copy of it fine-tuned later (``llmarch.retrieval.DPR``)."""
from __future__ import annotations

import torch

from llmarch.retrieval.dpr import in_batch_negatives_loss
from llmarch.tokenizer import Tokenizer
from llmarch.train.objectives import OBJECTIVES, Batch, Objective


def ict_pairs(chunk: torch.Tensor, span: int, cls_id: int, pad_id: int, generator: torch.Generator,
              keep_fraction: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """chunk [B, L] -> (ids [2B, L + 1], attention mask), right-padded: rows 0..B-1 are [cls] + a random span of
    ``span`` tokens, rows B..2B-1 are [cls] + the rest of each chunk. With probability ``keep_fraction`` a passage
    keeps its span (Lee et al. 2019 keep it 10% of the time, so the encoder also learns lexical overlap)."""
    B, L = chunk.shape
    starts = torch.randint(0, L - span + 1, (B,), generator=generator)
    keep = torch.rand(B, generator=generator) < keep_fraction
    ids = torch.full((2 * B, L + 1), pad_id, dtype=chunk.dtype)
    mask = torch.zeros(2 * B, L + 1, dtype=torch.long)
    ids[:, 0] = cls_id
    for b in range(B):
        s = int(starts[b])
        ids[b, 1:span + 1] = chunk[b, s:s + span]
        mask[b, :span + 1] = 1
        rest = chunk[b] if keep[b] else torch.cat([chunk[b, :s], chunk[b, s + span:]])
        ids[B + b, 1:len(rest) + 1] = rest
        mask[B + b, :len(rest) + 1] = 1
    return ids, mask


@OBJECTIVES.register("ict")
class InverseCloze(Objective):
    """Contrastive retrieval pre-training for an encoder with the ``first_token`` head (e.g. preset dpr-tiny):
    the loss is the in-batch softmax NLL of each question's own passage (``retrieval``)."""

    name = "ict"
    model_kind = "encoder"
    main_term = "retrieval"

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, nsp: bool = False, span_fraction: float = 0.25,
                 keep_fraction: float = 0.1):
        super().__init__(tokenizer, vocab_size, nsp)
        self.cls_id, self.pad_id = tokenizer.require("cls"), tokenizer.require("pad")
        self.span_fraction, self.keep_fraction = span_fraction, keep_fraction

    def make_batch(self, chunk: torch.Tensor, generator: torch.Generator) -> Batch:
        span = max(1, int(chunk.shape[1] * self.span_fraction))
        ids, mask = ict_pairs(chunk, span, self.cls_id, self.pad_id, generator, self.keep_fraction)
        B = chunk.shape[0]
        return Batch({"input_ids": ids, "attention_mask": mask}, {"retrieval": torch.arange(B)}, {"retrieval": B})

    def loss_sums(self, out, batch: Batch) -> dict[str, torch.Tensor]:
        pooled = out.pooled
        if pooled is None or pooled.dim() != 2:
            raise ValueError("objective: ict trains a sequence encoder; give the config head='first_token' "
                             "(e.g. --preset dpr-tiny)")
        B = len(batch.labels["retrieval"])
        loss = in_batch_negatives_loss(pooled[:B], pooled[B:], batch.labels["retrieval"])
        return {"retrieval": loss * B}


@torch.no_grad()
def retrieval_accuracy(model, chunks: torch.Tensor, objective: InverseCloze, generator: torch.Generator) -> float:
    """Top-1 accuracy: the share of ICT questions whose own passage scores highest among all passages of
    ``chunks`` [N, L] (chance is 1/N). Spans are always cut out of their passages here, whatever the
    objective's ``keep_fraction``."""
    span = max(1, int(chunks.shape[1] * objective.span_fraction))
    ids, mask = ict_pairs(chunks, span, objective.cls_id, objective.pad_id, generator)
    pooled = model(input_ids=ids, attention_mask=mask).pooled.float()
    N = chunks.shape[0]
    scores = pooled[:N] @ pooled[N:].T
    return float((scores.argmax(-1) == torch.arange(N)).float().mean())
