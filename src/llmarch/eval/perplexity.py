"""Perplexity and bits per byte of a causal language model on text, scored document by document with rolling
windows (the ``loglikelihood_rolling`` of lm-evaluation-harness, Gao et al. 2021): each document is preceded by
one prefix token (bos, else eos) and cut into windows of at most ``max_len`` inputs that overlap by one token, so
every token of the document is predicted exactly once, from up to ``max_len`` tokens of left context in its window.

Bits per byte = summed negative log-likelihood in bits / UTF-8 bytes of the text (Gao et al. 2020, The Pile): it
does not depend on the tokenizer, so models with different vocabularies compare.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch


@dataclass
class Window:
    """One forward pass: ``ids`` [n] inputs; the last ``n_scored`` positions predict ``targets`` [n_scored]."""

    doc: int
    ids: list[int]
    targets: list[int]


def rolling_windows(doc: int, tokens: list[int], prefix: int, max_len: int) -> list[Window]:
    """Windows that predict every token of ``tokens`` once, given ``prefix`` before the first. Each window has at
    most ``max_len`` inputs; inputs are the previous tokens, so window k scores tokens [k·max_len, (k+1)·max_len)."""
    if max_len < 1:
        raise ValueError(f"max_len: must be at least 1, got {max_len}")
    stream = [prefix] + tokens
    return [Window(doc, stream[start:min(start + max_len, len(tokens))], stream[start + 1:start + 1 + max_len])
            for start in range(0, len(tokens), max_len)]


@torch.no_grad()
def score_windows(model, windows: list[Window], batch_size: int = 8) -> list[tuple[torch.Tensor, bool]]:
    """For each window: the log-probability of its targets, [n_targets] float64 (log-softmax in fp32), and whether
    every target is the argmax (greedy decoding would produce them). Windows of equal length are batched together,
    so no padding enters any forward pass."""
    out: list[tuple[torch.Tensor, bool] | None] = [None] * len(windows)
    by_len: dict[int, list[int]] = {}
    for i, w in enumerate(windows):
        by_len.setdefault(len(w.ids), []).append(i)
    device = next(model.parameters()).device
    for n, idx in by_len.items():
        for s in range(0, len(idx), batch_size):
            chunk = idx[s:s + batch_size]
            ids = torch.tensor([windows[i].ids for i in chunk], device=device)  # [B, T]
            logp = torch.log_softmax(model(ids).logits.float(), dim=-1)  # [B, T, V]
            for row, i in enumerate(chunk):
                tgt = torch.tensor(windows[i].targets, device=device)
                lp = logp[row, n - len(tgt):]  # [n_targets, V]
                out[i] = (lp.gather(-1, tgt[:, None])[:, 0].double().cpu(), bool((lp.argmax(-1) == tgt).all()))
    return out  # type: ignore[return-value]


@dataclass
class TextScore:
    documents: int
    tokens: int  # tokens predicted
    bytes: int  # UTF-8 bytes of the text
    nll: float  # summed negative log-likelihood, nats
    seconds: float  # wall time of the forward passes
    max_len: int

    @property
    def loss(self) -> float:
        """Mean negative log-likelihood per token, nats."""
        return self.nll / max(self.tokens, 1)

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss)

    @property
    def bits_per_byte(self) -> float:
        return self.nll / math.log(2) / max(self.bytes, 1)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("inf")

    def to_dict(self) -> dict:
        return dict(asdict(self), loss=self.loss, perplexity=self.perplexity, bits_per_byte=self.bits_per_byte,
                    tokens_per_s=self.tokens_per_s)


def prefix_token(tokenizer) -> int:
    """The token placed before each document: bos, else eos (as lm-evaluation-harness does)."""
    for role in ("bos_id", "eos_id"):
        i = getattr(tokenizer, role, None)
        if i is not None:
            return i
    raise ValueError("tokenizer has neither a bos nor an eos token to start each document with; add one to "
                     "tokenizer.json")


def check_causal(model) -> None:
    kind = model.config.kind
    if kind != "decoder":
        raise ValueError(f"kind: perplexity needs a decoder (a causal language model); this model is an {kind} "
                         "(score it with its own objective: llmarch train reports its validation loss)")


def score_texts(model, tokenizer, texts: list[str], max_len: int | None = None, batch_size: int = 8) -> TextScore:
    """Perplexity, bits per byte and tokens/s of ``model`` on ``texts`` (each one a document)."""
    check_causal(model)
    max_len = min(max_len or model.config.max_seq_len, model.config.max_seq_len)
    prefix = prefix_token(tokenizer)
    tokens = n_bytes = 0
    nll = seconds = 0.0
    was_training = model.training
    model.eval()
    windows: list[Window] = []
    for d, text in enumerate(texts):
        ids = tokenizer.encode(text)
        windows += rolling_windows(d, ids, prefix, max_len)
        tokens, n_bytes = tokens + len(ids), n_bytes + len(text.encode("utf-8"))
        if len(windows) >= WINDOWS_PER_ROUND or d == len(texts) - 1:  # score as we go: memory stays bounded
            start = time.perf_counter()
            nll -= float(sum(lp.sum() for lp, _ in score_windows(model, windows, batch_size)))
            seconds += time.perf_counter() - start
            windows = []
    model.train(was_training)
    if not tokens:
        raise ValueError("the text has no tokens to score")
    return TextScore(len(texts), tokens, n_bytes, nll, seconds, max_len)


WINDOWS_PER_ROUND = 256


__all__ = ["rolling_windows", "score_windows", "score_texts", "TextScore", "prefix_token", "check_causal"]
