"""Helpers of the native decode layer tests (test_fused_decode.py, test_fused_moe.py): a spy on the steps the
native path served, and the eager and native runs of the same generation or decode steps."""
from __future__ import annotations

import contextlib

import torch

import llmarch
from llmarch.nn import fused_decode


class Spy:
    """Counts the calls of ``module.name`` (default: llmarch.nn.fused_decode.run, the native decode steps) that
    served, i.e. returned something other than None."""

    def __init__(self, monkeypatch, module=fused_decode, name: str = "run"):
        self.steps = 0
        real = getattr(module, name)

        def counted(*a):
            y = real(*a)
            self.steps += y is not None
            return y

        monkeypatch.setattr(module, name, counted)


def generate_both(model, ids, n, monkeypatch, **kw):
    """generate with the eager layers, then with the native ones: (eager ids, native ids, a Spy of the latter)."""
    monkeypatch.setenv("LLMARCH_FUSED_DECODE", "0")
    want = llmarch.generate(model, ids, n, **kw)
    spy = Spy(monkeypatch)
    monkeypatch.setenv("LLMARCH_FUSED_DECODE", "1")
    return want, llmarch.generate(model, ids, n, **kw), spy


def steps(model, ids, n, fused, monkeypatch):
    """Logits of each of n greedy decode steps after the prompt, and the caches' keys / values at the end."""
    monkeypatch.setenv("LLMARCH_FUSED_DECODE", "1" if fused else "0")
    cache, out, logits = model.new_cache(), [], []
    with torch.no_grad():
        step = model(ids, cache=cache).logits[:, -1:]
        for _ in range(n):
            tok = step.argmax(-1)
            out.append(tok)
            step = model(tok, cache=cache).logits
            logits.append(step)
    return torch.cat(logits, 1), torch.cat(out, 1), cache


def check_steps(model, ids, n, monkeypatch):
    """n native decode steps hold to the eager ones: every step served natively, logits at 1e-5, the same greedy
    tokens, the same caches left behind. Returns the native run's cache."""
    want, want_tokens, want_cache = steps(model, ids, n, False, monkeypatch)
    spy = Spy(monkeypatch)
    got, got_tokens, got_cache = steps(model, ids, n, True, monkeypatch)
    assert spy.steps == n
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(got_tokens, want_tokens)
    for i in want_cache.k:
        assert got_cache.start[i] == want_cache.start[i]
        torch.testing.assert_close(got_cache.k[i], want_cache.k[i], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got_cache.v[i], want_cache.v[i], rtol=1e-5, atol=1e-5)
    return got_cache


@contextlib.contextmanager
def num_threads(n: int):
    """torch's (and so the native kernels' OpenMP) thread count set to n inside, restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
