"""The "random" attention pattern: seeded, causal (earlier keys only) or bidirectional, exactly r + 1 keys per
query where that many exist, and the same keys for cached decoding as for a full forward."""
from __future__ import annotations

import torch

import llmarch
from llmarch.attention_config import SparseConfig
from llmarch.nn.patterns import build_pattern


def rand(seed=0, r=3, causal=True):
    return build_pattern("random", window=None, sparse=SparseConfig(random_keys=r, seed=seed), causal=causal)


def test_causal_random_keys_are_seeded_earlier_and_r_plus_one():
    n, r = 40, 3
    m = rand(seed=5, r=r).render(n)
    assert torch.equal(m, rand(seed=5, r=r).render(n)), "same seed, same pattern"
    assert not torch.equal(m, rand(seed=6, r=r).render(n)), "another seed, another pattern"
    assert torch.equal(m, m.tril()) and m.diagonal().all(), "earlier keys and the query itself"
    assert m.sum(-1).tolist() == [min(q, r) + 1 for q in range(n)]
    rule = rand(seed=5, r=r).allowed(torch.arange(n), torch.arange(n))
    assert torch.equal(rule, m), "the draw among earlier keys needs no causal mask on top"
    assert torch.equal(rand(seed=5, r=r).render(2 * n)[:n, :n], m), "a query's keys do not depend on the length"
    counts = m[r + 1:, :].float().sum(0)[: n // 2]
    assert (counts > 0).sum() > n // 4, "keys are spread over the past, not always the first ones"


def test_bidirectional_random_keys():
    n, r = 30, 4
    p = rand(seed=1, r=r, causal=False)
    m = p.render(n, causal=False)
    assert m.diagonal().all() and m.sum(-1).tolist() == [r + 1] * n
    assert m.triu(1).any(), "later keys are drawn too"
    assert rand(seed=1, r=50, causal=False).render(n, causal=False).all(), "fewer keys than r: all of them"


def test_model_with_random_pattern_caches_like_full_recomputation():
    cfg = llmarch.preset("llama-tiny").replace(vocab_size=97, n_layers=2, pattern=("random",),
                                               sparse=dict(random_keys=2, seed=3))
    torch.manual_seed(0)
    m = llmarch.build(cfg).eval()
    ids = torch.randint(0, 97, (2, 12))
    dense = llmarch.build(cfg.replace(pattern=("dense",))).eval()
    dense.load_state_dict(m.state_dict())
    with torch.no_grad():
        full = m(ids).logits
        assert not torch.allclose(full, dense(ids).logits, atol=1e-4), "the pattern changes the output"
        cache = m.new_cache()
        steps = [m(ids[:, :5], cache=cache).logits] + [m(ids[:, t:t + 1], cache=cache).logits for t in range(5, 12)]
    assert torch.allclose(torch.cat(steps, 1), full, atol=1e-5)
