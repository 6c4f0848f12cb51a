"""Dense passage retrieval (DPR, Karpukhin et al. 2020): two BERT encoders, one for questions and one for
passages (contexts), each giving the final [CLS] state; relevance is the dot product, and training contrasts each
question's positive passage against the other passages of the batch (in-batch negatives)."""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from llmarch.config import ModelConfig
from llmarch.model import Model, build


class DPR(nn.Module):
    """``question_encoder`` and ``context_encoder``: encoder Models with the ``first_token`` head (their own
    weights, same architecture). Encodings are [B, D]; :meth:`scores` is their dot product [Bq, Bc]."""

    def __init__(self, question_encoder: Model, context_encoder: Model):
        super().__init__()
        for name, m in (("question_encoder", question_encoder), ("context_encoder", context_encoder)):
            if m.config.kind != "encoder" or m.config.head != "first_token":
                raise ValueError(f"{name}: DPR needs an encoder with head='first_token' (kind={m.config.kind!r}, "
                                 f"head={m.config.head!r}); e.g. llmarch.preset('dpr-base')")
        self.question_encoder, self.context_encoder = question_encoder, context_encoder

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> "DPR":
        """Two independently initialised encoders of config ``cfg``."""
        return cls(build(cfg), build(cfg))

    @classmethod
    def from_hf(cls, question_dir: str | os.PathLike, context_dir: str | os.PathLike) -> "DPR":
        """From a DPRQuestionEncoder and a DPRContextEncoder checkpoint directory."""
        from llmarch import hf

        return cls(hf.load(question_dir), hf.load(context_dir))

    def encode_questions(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                         token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """ids [B, T] -> [B, D]."""
        return self.question_encoder(input_ids, attention_mask, token_type_ids=token_type_ids).pooled

    def encode_contexts(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                        token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """ids [B, T] -> [B, D]."""
        return self.context_encoder(input_ids, attention_mask, token_type_ids=token_type_ids).pooled

    @staticmethod
    def scores(questions: torch.Tensor, contexts: torch.Tensor) -> torch.Tensor:
        """Dot-product relevance: [Bq, D] x [Bc, D] -> [Bq, Bc]."""
        return questions @ contexts.transpose(0, 1)


def in_batch_negatives_loss(questions: torch.Tensor, contexts: torch.Tensor,
                            positives: torch.Tensor | None = None) -> torch.Tensor:
    """Karpukhin et al. 2020, sec. 3.2: the negative log-likelihood of each question's positive passage under a
    softmax over all passages of the batch. questions [Bq, D], contexts [Bc, D] (Bc >= Bq: extra rows are hard
    negatives); ``positives`` [Bq] indexes each question's positive (default: row i for question i). Scalar."""
    if questions.shape[-1] != contexts.shape[-1]:
        raise ValueError(f"questions [.., {questions.shape[-1]}] and contexts [.., {contexts.shape[-1]}] must share "
                         "the encoding width")
    if positives is None:
        if contexts.shape[0] < questions.shape[0]:
            raise ValueError(f"contexts: {contexts.shape[0]} rows for {questions.shape[0]} questions; give one "
                             "positive per question (plus any negatives) or pass positives=")
        positives = torch.arange(questions.shape[0], device=questions.device)
    logits = DPR.scores(questions.float(), contexts.float())  # [Bq, Bc]
    return F.cross_entropy(logits, positives)


__all__ = ["DPR", "in_batch_negatives_loss"]
