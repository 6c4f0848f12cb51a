"""Output heads, chosen by the ``head`` config value. Each maps the final hidden states [B, T, D] to its logits
and says which of its weights may be tied to the token embedding.

Protocol: ``head(h)`` returns the logits; ``head.outputs(h)`` returns ``{"logits": ..., **extras}`` (the NSP
logits and the pooled [CLS] vector where a head has them); ``tied_name`` is the parameter that
``tie(embedding)`` shares with the token embedding (None: nothing to tie). A head with ``reads_tokens = True``
(the last-token score) is called ``outputs(h, input_ids, attention_mask)`` by the model. A head with
``per_position = False`` reads positions other than the one it scores (the first token's pooled vector, the
last real token), so ``logits_to_keep`` may not cut its input.
"""
from __future__ import annotations

import torch
from torch import nn

from llmarch.nn.activation import make_activation
from llmarch.nn.dense import linear
from llmarch.nn.norm import make_norm
from llmarch.registry import Registry

HEADS: Registry[type[nn.Module]] = Registry("head")


@HEADS.register("lm")
class LMHead(nn.Linear):
    """Next-token logits: [B, T, D] -> [B, T, V], optionally rescaling the hidden states by ``scale`` first
    (T5 multiplies by D**-0.5 when the head is tied to the embedding)."""

    tied_name = "weight"

    def __init__(self, d_model: int, vocab_size: int, bias: bool = False, scale: float = 1.0):
        super().__init__(d_model, vocab_size, bias=bias)
        self.scale = scale

    @classmethod
    def from_config(cls, cfg) -> "LMHead":
        return cls(cfg.d_model, cfg.vocab_size, bias=cfg.head_bias,
                   scale=cfg.d_model ** -0.5 if cfg.scale_head else 1.0)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.scale != 1.0:
            h = h * self.scale
        return linear(h, self.weight, self.bias)

    def outputs(self, h: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": self(h)}

    def tie(self, embedding: nn.Embedding) -> None:
        self.weight = embedding.weight


@HEADS.register("mlm")
class MLMHead(nn.Module):
    """Masked-LM head of BERT (Devlin et al. 2019) and RoBERTa: dense -> activation -> norm, then the vocabulary
    projection ``decoder`` (usually tied to the embedding) with its own bias. [B, T, D] -> [B, T, V]."""

    tied_name = "decoder.weight"

    def __init__(self, d_model: int, vocab_size: int, activation: str, norm: nn.Module):
        super().__init__()
        self.activation = activation
        self.act = make_activation(activation)
        self.dense = nn.Linear(d_model, d_model)
        self.norm = norm
        self.decoder = nn.Linear(d_model, vocab_size)

    @classmethod
    def from_config(cls, cfg) -> "MLMHead":
        return cls(cfg.d_model, cfg.vocab_size, cfg.activation,
                   make_norm(cfg.norm, cfg.d_model, cfg.norm_eps, cfg.norm_bias))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.norm(self.act(self.dense(h))))

    def outputs(self, h: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": self(h)}

    def tie(self, embedding: nn.Embedding) -> None:
        self.decoder.weight = embedding.weight


class Pooler(nn.Module):
    """The first ([CLS]) position through dense + tanh (BERT). [B, T, D] -> [B, D]."""

    def __init__(self, d_model: int):
        super().__init__()
        self.dense = nn.Linear(d_model, d_model)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(h[:, 0]))


@HEADS.register("pretraining")
class PretrainingHead(nn.Module):
    """BERT's pre-training heads: the masked-LM head, and next-sentence prediction on the pooled [CLS] vector.
    logits [B, T, V]; extras ``pooled`` [B, D] and ``nsp_logits`` [B, 2]."""

    tied_name = "mlm.decoder.weight"
    per_position = False

    def __init__(self, mlm: MLMHead, d_model: int):
        super().__init__()
        self.mlm = mlm
        self.pooler = Pooler(d_model)
        self.nsp = nn.Linear(d_model, 2)

    @classmethod
    def from_config(cls, cfg) -> "PretrainingHead":
        return cls(MLMHead.from_config(cfg), cfg.d_model)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.mlm(h)

    def outputs(self, h: torch.Tensor) -> dict[str, torch.Tensor]:
        pooled = self.pooler(h)
        return {"logits": self.mlm(h), "pooled": pooled, "nsp_logits": self.nsp(pooled)}

    def tie(self, embedding: nn.Embedding) -> None:
        self.mlm.tie(embedding)


@HEADS.register("classification")
class ClassificationHead(nn.Module):
    """Sequence classification on the pooled first position: pooler (dense + tanh) -> dropout -> linear.
    logits [B, n_labels]; extra ``pooled`` [B, D]. Nothing to tie."""

    tied_name = None
    per_position = False

    def __init__(self, d_model: int, n_labels: int, dropout: float = 0.0):
        super().__init__()
        self.pooler = Pooler(d_model)
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(d_model, n_labels)

    @classmethod
    def from_config(cls, cfg) -> "ClassificationHead":
        return cls(cfg.d_model, cfg.n_labels, cfg.dropout)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.out(self.dropout(self.pooler(h)))

    def outputs(self, h: torch.Tensor) -> dict[str, torch.Tensor]:
        pooled = self.pooler(h)
        return {"logits": self.out(self.dropout(pooled)), "pooled": pooled}

    def tie(self, embedding: nn.Embedding) -> None:
        pass


@HEADS.register("first_token")
class FirstTokenHead(nn.Module):
    """A sequence embedding: the final hidden state of the first ([CLS]) position, unchanged (DPR's pooled output,
    Karpukhin et al. 2020). logits = pooled = [B, D]. No parameters."""

    tied_name = None
    per_position = False

    @classmethod
    def from_config(cls, cfg) -> "FirstTokenHead":
        return cls()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h[:, 0]

    def outputs(self, h: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": h[:, 0], "pooled": h[:, 0]}

    def tie(self, embedding: nn.Embedding) -> None:
        pass


@HEADS.register("last_token")
class LastTokenHead(nn.Module):
    """A score per sequence from a decoder: a bias-free ``score`` Linear D -> n_labels read at the last real token
    (a reward model with n_labels=1; Ouyang et al. 2022). The last real token is transformers'
    ``*ForSequenceClassification`` rule: the rightmost token that is not ``pad_token_id``; without a pad id, the
    rightmost position the attention mask keeps (else the last). logits [B, n_labels]. Reads the tokens
    (``reads_tokens``: the model passes input_ids and attention_mask to ``outputs``). Nothing to tie."""

    tied_name = None
    per_position = False
    reads_tokens = True

    def __init__(self, d_model: int, n_labels: int, pad_token_id: int | None = None):
        super().__init__()
        self.pad_token_id = pad_token_id
        self.score = nn.Linear(d_model, n_labels, bias=False)

    @classmethod
    def from_config(cls, cfg) -> "LastTokenHead":
        return cls(cfg.d_model, cfg.n_labels, cfg.pad_token_id)

    def last_index(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """[B] position of each row's last real token, from input_ids [B, T] (and the mask [B, S >= T])."""
        T = input_ids.shape[1]
        if self.pad_token_id is not None:
            real = input_ids != self.pad_token_id
        elif attention_mask is not None:
            real = attention_mask[:, -T:].bool()
        else:
            return torch.full((input_ids.shape[0],), T - 1, dtype=torch.long, device=input_ids.device)
        positions = torch.arange(T, device=input_ids.device, dtype=torch.int32)
        return (positions * real.to(torch.int32)).argmax(-1)  # the rightmost real token; 0 when none

    def forward(self, h: torch.Tensor, input_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.outputs(h, input_ids, attention_mask)["logits"]

    def outputs(self, h: torch.Tensor, input_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        scores = self.score(h)  # [B, T, n_labels]
        if input_ids is None:
            last = torch.full((h.shape[0],), h.shape[1] - 1, dtype=torch.long, device=h.device)
        else:
            last = self.last_index(input_ids, attention_mask)
        return {"logits": scores[torch.arange(h.shape[0], device=h.device), last]}

    def tie(self, embedding: nn.Embedding) -> None:
        pass


class SwappedLMHead(nn.Module):
    """The LM head with its D -> V projection replaced by another module of the same function (a quantized or
    re-laid-out copy); keeps the head's input ``scale`` and its ``outputs``. h [B, T, D] -> logits [B, T, V]."""

    def __init__(self, proj: nn.Module, scale: float = 1.0):
        super().__init__()
        self.proj, self.scale = proj, scale

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.proj(h * self.scale if self.scale != 1.0 else h)

    def outputs(self, h: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": self(h)}


def swap_projection(linear: nn.Linear, replacement: nn.Module) -> nn.Module:
    """What to put where ``linear`` was: the replacement itself, or, for the LM head, the replacement inside a
    :class:`SwappedLMHead` so the model still reads ``lm_head.outputs``."""
    return SwappedLMHead(replacement, linear.scale) if isinstance(linear, LMHead) else replacement


def build_head(cfg) -> nn.Module:
    return HEADS[cfg.head].from_config(cfg)


__all__ = ["HEADS", "ClassificationHead", "FirstTokenHead", "LastTokenHead", "LMHead", "MLMHead", "Pooler", "PretrainingHead", "SwappedLMHead", "build_head",
           "swap_projection"]
