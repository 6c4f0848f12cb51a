"""A native decode step runs every layer in one call (``llmarch_decode_stack``) and leaves the cache's views for
later (``KVCache.defer``): the cache reads the same after any number of steps, read between them or not, copied or
not, with the reserved room running out every step or two, a sliding window and padding; the eager layers pick
up a deferred cache where the native ones left it."""
from __future__ import annotations

import copy

import pytest
import torch

from llmarch import native
from llmarch.infer.layout import pack_weights
from llmarch.nn import fused_decode
from llmarch.nn.cache import KVCache

from tests.decode_util import Spy
from tests.test_fused_decode import BASE, model_for

pytestmark = pytest.mark.skipif(native.library("decode") is None,
                                reason="no x86-64 CPU with AVX2 or no C compiler: the native kernels cannot be built")


def _run(model, ids, mask, n, fused, monkeypatch, read_every=0, eager_from=None):
    """n greedy steps after the prompt: (logits [B, n, V], cache). ``read_every``: read the cache's keys after
    every that many steps; ``eager_from``: the steps from that one on run eagerly."""
    monkeypatch.setenv("LLMARCH_FUSED_DECODE", "1" if fused else "0")
    cache, logits = model.new_cache(), []
    with torch.no_grad():
        step = model(ids, attention_mask=mask, cache=cache).logits[:, -1:]
        for i in range(n):
            if eager_from is not None and i == eager_from:
                monkeypatch.setenv("LLMARCH_FUSED_DECODE", "0")
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
            step = model(step.argmax(-1), attention_mask=mask, cache=cache).logits
            logits.append(step)
            if read_every and (i + 1) % read_every == 0:
                assert isinstance(cache.k[0], torch.Tensor)
    return torch.cat(logits, 1), cache


def _same_cache(got: KVCache, want: KVCache) -> None:
    assert sorted(got.k) == sorted(want.k) and got.length == want.length
    for i in want.k:
        assert got.start[i] == want.start[i]
        torch.testing.assert_close(got.k[i], want.k[i], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got.v[i], want.v[i], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("room", [1, 2, 64])
@pytest.mark.parametrize("read_every", [0, 3])
@pytest.mark.parametrize("case", ["gqa", "sliding"])
def test_stack_steps_hold_to_the_eager_steps(case, read_every, room, monkeypatch):
    """Padded rows (a sliding window trims each layer's cache, moving its first slot and the padding flags it
    reads), room for 1, 2 or 64 steps reserved at a time, the cache read every third step or never."""
    model = model_for(**({"pattern": ("sliding",), "window": 5} if case == "sliding" else {}))
    pack_weights(model)
    monkeypatch.setattr(fused_decode._Slots, "ROOM", room)
    ids = torch.randint(0, BASE["vocab_size"], (3, 6), generator=torch.Generator().manual_seed(1))
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1], [0, 1, 1, 0, 1, 1]])
    want, want_cache = _run(model, ids, mask, 11, False, monkeypatch)
    spy = Spy(monkeypatch)
    got, got_cache = _run(model, ids, mask, 11, True, monkeypatch, read_every)
    assert spy.steps == 11
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    _same_cache(got_cache, want_cache)
    if case == "sliding":
        assert got_cache.k[0].shape[2] == 4


def test_the_cache_defers_its_views_until_read(monkeypatch):
    model = model_for()
    pack_weights(model)
    ids = torch.randint(0, BASE["vocab_size"], (2, 5), generator=torch.Generator().manual_seed(2))
    _, cache = _run(model, ids, torch.ones_like(ids), 4, True, monkeypatch)
    slots = cache.pending
    assert isinstance(slots, fused_decode._Slots)
    assert slots.table[:, 5].tolist() == [9, 9]  # each layer's next slot: 5 prompt + 4 steps
    assert cache.k[1].shape[2] == 9 and cache.pending is None  # the read brought the views up to date
    _, want = _run(model, ids, torch.ones_like(ids), 4, False, monkeypatch)
    _same_cache(cache, want)


def test_eager_layers_continue_a_deferred_cache(monkeypatch):
    """Native steps, then eager ones on the same cache (e.g. a hook was added): the eager layers read the views the
    native steps left (through the deferral) and the run matches an all-eager one."""
    model = model_for()
    pack_weights(model)
    ids = torch.randint(0, BASE["vocab_size"], (2, 5), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    want, want_cache = _run(model, ids, mask, 8, False, monkeypatch)
    got, got_cache = _run(model, ids, mask, 8, True, monkeypatch, eager_from=4)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    _same_cache(got_cache, want_cache)


def test_a_copy_made_between_steps_is_independent(monkeypatch):
    """deepcopy of a cache whose views are deferred: the copy holds the steps so far, the original's next steps
    do not write into it, and both continue alike."""
    model = model_for()
    pack_weights(model)
    ids = torch.randint(0, BASE["vocab_size"], (1, 4), generator=torch.Generator().manual_seed(4))
    monkeypatch.setenv("LLMARCH_FUSED_DECODE", "1")
    cache = model.new_cache()
    tok = torch.tensor([[7]])
    with torch.no_grad():
        model(ids, cache=cache)
        for _ in range(3):
            model(tok, cache=cache)
        assert cache.pending is not None
        twin = copy.deepcopy(cache)
        assert twin.pending is None and cache.pending is None
        keys = twin.k[0].clone()
        a = [model(tok, cache=cache).logits for _ in range(3)]
        assert torch.equal(twin.k[0], keys) and twin.k[0].shape[2] == 7
        b = [model(tok, cache=twin).logits for _ in range(3)]
    torch.testing.assert_close(torch.cat(b), torch.cat(a), rtol=0, atol=0)
    _same_cache(twin, cache)


@pytest.mark.parametrize("window", [None, 5])
def test_the_expected_length_is_reserved_once(window, monkeypatch):
    """generate tells the cache how many slots it will fill (``expected``): the native steps reserve them in one
    go (no re-made buffers), except in a sliding window's layers, whose buffers stay near the window."""
    from llmarch.infer.decode import make_engine

    model = model_for(**({"pattern": ("sliding",), "window": window} if window else {}))
    pack_weights(model)
    engine = make_engine(model, "dynamic", 2, 6 + 300)
    assert engine.cache.expected == 306
    made = []
    real = fused_decode._Slots.make.__func__
    monkeypatch.setattr(fused_decode._Slots, "make", classmethod(lambda cls, *a: made.append(1) or real(cls, *a)))
    ids = torch.randint(0, BASE["vocab_size"], (2, 6), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        step = engine.prefill(ids, torch.ones_like(ids))
        for _ in range(300):
            step = engine.step(step.argmax(-1))
    capacity = engine.cache._buffers[0][0].shape[2]
    if window:
        assert capacity < 200 and len(made) > 1
    else:
        assert capacity >= 306 and len(made) == 1
