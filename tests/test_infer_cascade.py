"""Cascades (seed 002): the small model answers unless its confidence is below the threshold; the endpoints equal
each model alone; cost counts the large model only on escalated requests."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import llmarch
from llmarch.analysis import forward_flops
from llmarch.infer.cascade import cascade_generate, cascade_score, confidence

SMALL = llmarch.preset("llama-tiny").replace(vocab_size=97, d_model=32, n_heads=4, n_kv_heads=2, d_ff=64, n_layers=1)
LARGE = SMALL.replace(d_model=64, n_layers=3, d_ff=128)


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    return llmarch.build(SMALL).eval(), llmarch.build(LARGE).eval()


def test_generation_escalates_below_the_threshold(pair):
    small, large = pair
    ids = torch.randint(0, 97, (1, 5))
    low = cascade_generate(small, large, ids, threshold=0.0, max_new_tokens=6)
    assert not low.escalated and torch.equal(low.ids, llmarch.generate(small, ids, max_new_tokens=6))
    high = cascade_generate(small, large, ids, threshold=1.5, max_new_tokens=6)
    assert high.escalated and torch.equal(high.ids, llmarch.generate(large, ids, max_new_tokens=6))
    # the confidence is the small model's mean top-1 probability over what it wrote, computed naively
    probs = small(low.ids).logits[0, 4:-1].softmax(-1)
    assert abs(low.confidence - float(probs.amax(-1).mean())) < 1e-6
    mid = cascade_generate(small, large, ids, threshold=low.confidence + 1e-4, max_new_tokens=6)
    assert mid.escalated
    with pytest.raises(ValueError, match="threshold"):
        cascade_generate(small, large, ids, threshold=float("nan"))


def test_scores_cost_and_quality_over_a_sweep(pair):
    small, large = pair
    windows = torch.randint(0, 97, (6, 9))
    conf = confidence(small, windows[:, :-1], start=0)
    ths = [0.0, float(conf.median()), 2.0]
    s0, mid, s1 = cascade_score(small, large, windows, ths)
    nll = {m: F.cross_entropy(model(windows[:, :-1]).logits.transpose(1, 2), windows[:, 1:], reduction="none").mean(-1)
           for m, model in (("small", small), ("large", large))}
    assert abs(s0.nll - float(nll["small"].mean())) < 1e-5 and s0.escalated == 0.0
    assert abs(s1.nll - float(nll["large"].mean())) < 1e-5 and s1.escalated == 1.0
    up = conf < ths[1]
    assert abs(mid.nll - float(torch.where(up, nll["large"], nll["small"]).mean())) < 1e-5
    per = {k: forward_flops(c, 8, 1).forward / 8 for k, c in (("small", SMALL), ("large", LARGE))}
    assert s0.flops_per_token == per["small"]
    assert abs(mid.flops_per_token - (per["small"] + float(up.float().mean()) * per["large"])) < 1e-6 * per["large"]
    with pytest.raises(ValueError, match="vocabularies"):
        cascade_score(small, llmarch.build(LARGE.replace(vocab_size=98)), windows, [0.5])
