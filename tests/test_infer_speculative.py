"""Speculative decoding: greedy output equals the target's greedy output; sampled output follows the target's
distribution (chi-square against the exact marginals, tiny vocabulary, many seeds)."""
from __future__ import annotations

import pytest
import torch

import llmarch
from llmarch.infer.speculative import speculative_generate, verify

CFG = llmarch.preset("llama-tiny").replace(vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                                           max_seq_len=128)


def build(cfg, seed):
    torch.manual_seed(seed)
    return llmarch.build(cfg).eval()


@pytest.mark.parametrize("k", [1, 4])
def test_greedy_speculative_equals_target_greedy(k):
    target, draft = build(CFG, 0), build(CFG.replace(n_layers=1), 1)
    ids = torch.randint(0, 97, (1, 6), generator=torch.Generator().manual_seed(0))
    want = llmarch.generate(target, ids, 40)
    got, stats = speculative_generate(target, draft, ids, 40, k=k)
    assert torch.equal(got, want)
    assert stats.new_tokens == 40 and stats.proposed > 0
    same, stats = speculative_generate(target, target, ids, 40, k=k)  # a perfect draft is always accepted
    assert torch.equal(same, want) and stats.acceptance_rate == 1.0


def exact_marginals(model, prompt: list[int], n: int, V: int) -> list[torch.Tensor]:
    """Marginal target distribution of each of the next n tokens, by enumerating every prefix."""
    out, joint, prefixes = [], torch.ones(1), [[]]
    for _ in range(n):
        ids = torch.tensor([prompt + p for p in prefixes])
        with torch.no_grad():
            p = model(ids).logits[:, -1].float().softmax(-1)  # [P, V]
        joint = (joint[:, None] * p).reshape(-1)  # over prefixes extended by one token
        out.append(joint.view(-1, V).sum(0))
        prefixes = [q + [t] for q in prefixes for t in range(V)]
    return out


def chi2_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs.double() * counts.sum()
    stat = ((counts.double() - expected) ** 2 / expected).sum()
    df = counts.numel() - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), stat / 2))


def test_sampled_speculative_follows_target_distribution():
    V, n, N = 5, 3, 1200
    cfg = CFG.replace(vocab_size=V, init_std=1.0)  # peaked, very different target and draft distributions
    target, draft = build(cfg, 0), build(cfg.replace(n_layers=1), 1)
    prompt = [1, 3]
    want = exact_marginals(target, prompt, n, V)
    draft_m = exact_marginals(draft, prompt, n, V)
    assert max((w - d).abs().max() for w, d in zip(want, draft_m)) > 0.2, "the draft must differ to test anything"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # thousands of tiny forwards: threads only add overhead
    try:
        samples = torch.stack([speculative_generate(target, draft, torch.tensor([prompt]), n, k=2,
                                                    temperature=1.0, seed=s)[0][0, 2:] for s in range(N)])
    finally:
        torch.set_num_threads(threads)
    for j in range(n):
        counts = torch.bincount(samples[:, j], minlength=V)
        assert chi2_pvalue(counts, want[j]) > 1e-3, f"token {j}: {counts.tolist()} vs {want[j].tolist()}"


def test_verify_resamples_from_residual():
    """One proposal that the target never makes: always rejected, and the replacement never equals it."""
    p = torch.tensor([[0.0, 0.5, 0.5], [1 / 3, 1 / 3, 1 / 3]])
    q = torch.tensor([[1.0, 0.0, 0.0]])
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        n, nxt = verify(p, q, torch.tensor([0]), g)
        assert n == 0 and nxt in (1, 2)


def test_speculative_errors():
    target = build(CFG, 0)
    with pytest.raises(ValueError, match="batch 1"):
        speculative_generate(target, target, torch.zeros(2, 3, dtype=torch.long), 4)
    with pytest.raises(ValueError, match="vocab_size"):
        speculative_generate(target, build(CFG.replace(vocab_size=50), 0), torch.zeros(1, 3, dtype=torch.long), 4)
