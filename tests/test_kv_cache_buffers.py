"""The dynamic KV cache appends into buffers with spare slots; held to the torch.cat reference it replaced."""
import pytest
import torch

from llmarch.nn.cache import KVCache


def _reference(chunks, lookback):
    """Naive cache: concatenate everything, keep the last ``lookback`` keys after each call."""
    k, out, start, length = None, [], 0, 0
    for c in chunks:
        full = c if k is None else torch.cat([k, c], 2)
        s = start if k is not None else length
        out.append((full, s))
        keep = 0 if lookback is None else max(0, full.shape[2] - lookback)
        k, start, length = full[:, :, keep:], s + keep, length + c.shape[2]
    return out, k


@pytest.mark.parametrize("lookback", [None, 4])
def test_buffered_appends_equal_concatenation(monkeypatch, lookback):
    monkeypatch.setattr(KVCache, "GROW", 3)  # regrow (and compact a window) several times
    g = torch.Generator().manual_seed(0)
    chunks = [torch.randn(2, 2, t, 5, generator=g) for t in (5, 1, 1, 3, 1, 1, 1, 2, 1, 1, 1)]
    ref, ref_last = _reference(chunks, lookback)
    cache = KVCache()
    with torch.inference_mode():
        for c, (want, want_start) in zip(chunks, ref):
            k, v, start = cache.update(0, c, -c, lookback)
            cache.advance(c.shape[2])
            assert start == want_start and torch.equal(k, want) and torch.equal(v, -want)
    assert torch.equal(cache.k[0], ref_last) and torch.equal(cache.v[0], -ref_last)
    assert cache._buffers[0][0].shape[2] <= ref_last.shape[2] + 3 + 3  # a window's buffer stays bounded
    cache.reorder(torch.tensor([1, 0]))  # rows swapped: buffers dropped, later appends still right
    nxt = torch.randn(2, 2, 1, 5, generator=g)
    k, _, _ = cache.update(0, nxt, nxt, None)
    assert torch.equal(k, torch.cat([ref_last[[1, 0]], nxt], 2))


def test_autograd_keeps_concatenation_and_gradients():
    cache = KVCache()
    a = torch.randn(1, 1, 3, 4, requires_grad=True)
    b = torch.randn(1, 1, 1, 4, requires_grad=True)
    cache.update(0, a, a, None)
    k, v, _ = cache.update(0, b, b, None)
    (k.sum() + 2 * v.sum()).backward()
    assert not cache._buffers and torch.equal(a.grad, torch.full_like(a, 3.0))


def test_a_cache_grown_under_autograd_is_not_written_through():
    cache = KVCache()
    with torch.no_grad():
        cache.update(0, torch.zeros(1, 1, 2, 3), torch.zeros(1, 1, 2, 3), None)
        cache.update(0, torch.ones(1, 1, 1, 3), torch.ones(1, 1, 1, 3), None)  # buffers now
    grad_step = torch.full((1, 1, 1, 3), 2.0, requires_grad=True)
    cache.update(0, grad_step, grad_step, None)  # concatenated: the buffers no longer hold k[0]
    with torch.no_grad():
        k, _, _ = cache.update(0, torch.full((1, 1, 1, 3), 3.0), torch.full((1, 1, 1, 3), 3.0), None)
    assert k[0, 0, :, 0].tolist() == [0, 0, 1, 2, 3]
