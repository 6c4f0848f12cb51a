"""Model cascades (seed 002): a small model answers; when it is not confident enough, the request goes to a larger
model. Confidence of an answer is the small model's mean top-1 probability over the tokens it wrote (or, when
scoring given text, over the text's positions). A threshold of 0 never escalates (the small model alone), above 1
always does (the large model alone); in between, cost and quality trade off. Cost is counted in forward FLOPs
from :mod:`llmarch.analysis` (the small model always runs; the large one only on escalated requests).

The two models must share the tokenizer (same vocabulary ids)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from llmarch.infer.generate import generate


def _check_pair(small, large) -> None:
    if small.config.vocab_size != large.config.vocab_size:
        raise ValueError(f"cascade: the models' vocabularies differ ({small.config.vocab_size} vs "
                         f"{large.config.vocab_size}); both must use the same tokenizer")


def _check_threshold(threshold: float) -> None:
    if not threshold >= 0.0:  # NaN fails too
        raise ValueError(f"threshold: must be >= 0 (0 = never escalate, above 1 = always), got {threshold}")


@torch.no_grad()
def confidence(model, ids: torch.Tensor, start: int = 0) -> torch.Tensor:
    """Mean top-1 probability of ``model``'s next-token predictions at positions [start, T-1) of ids [B, T] -> [B]."""
    probs = model(ids).logits[:, start:-1].float().softmax(-1)  # [B, T - 1 - start, V]
    return probs.amax(-1).mean(-1)


@dataclass
class CascadeResult:
    ids: torch.Tensor  # [1, T + n]
    escalated: bool  # the large model wrote the answer
    confidence: float  # the small model's confidence in its own answer


@torch.no_grad()
def cascade_generate(small, large, input_ids: torch.Tensor, threshold: float, max_new_tokens: int = 32,
                     **sampling) -> CascadeResult:
    """Generate with ``small``; if its confidence in what it wrote is below ``threshold``, answer with ``large``
    instead. input_ids [1, T]."""
    _check_pair(small, large)
    _check_threshold(threshold)
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"input_ids: a cascade answers one prompt [1, T], got shape {tuple(input_ids.shape)}")
    T = input_ids.shape[1]
    out = generate(small, input_ids, max_new_tokens=max_new_tokens, **sampling)
    conf = float(confidence(small, out, start=T - 1)) if out.shape[1] > T else 1.0
    if conf >= threshold:
        return CascadeResult(out, False, conf)
    return CascadeResult(generate(large, input_ids, max_new_tokens=max_new_tokens, **sampling), True, conf)


@dataclass
class CascadeScore:
    nll: float  # mean next-token NLL of the chosen model's predictions
    escalated: float  # share of sequences sent to the large model
    flops_per_token: float  # forward FLOPs per token: small always + large when escalated


@torch.no_grad()
def cascade_score(small, large, windows: torch.Tensor, thresholds: list[float]) -> list[CascadeScore]:
    """Score text windows [N, T] under the cascade at each threshold: a window whose small-model confidence is
    below the threshold is scored (and paid for) by the large model too."""
    from llmarch.analysis import forward_flops

    _check_pair(small, large)
    T = windows.shape[1] - 1

    def per_window(model) -> tuple[torch.Tensor, torch.Tensor]:
        logits = model(windows[:, :-1]).logits.float()
        nll = F.cross_entropy(logits.transpose(1, 2), windows[:, 1:], reduction="none").mean(-1)  # [N]
        return nll, logits.softmax(-1).amax(-1).mean(-1)

    nll_small, conf = per_window(small)
    nll_large, _ = per_window(large)
    cost_small = forward_flops(small.config, T, 1).forward / T
    cost_large = forward_flops(large.config, T, 1).forward / T
    scores = []
    for th in thresholds:
        _check_threshold(th)
        up = conf < th  # [N] escalated windows
        nll = torch.where(up, nll_large, nll_small).mean()
        share = float(up.float().mean())
        scores.append(CascadeScore(float(nll), share, cost_small + share * cost_large))
    return scores
