"""Fast decode: static cache (eager and compiled) against full recomputation, batched against one-by-one,
per-row stop conditions, sampling options and streaming."""
from __future__ import annotations

import pytest
import torch

import llmarch
from llmarch.infer.sampling import Sampling, apply_repetition_penalty, filter_logits
from llmarch.infer.static_cache import StaticKVCache

SMALL = dict(vocab_size=97, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_seq_len=128)
FAMILIES = {
    "gpt2": llmarch.preset("gpt2-tiny").replace(**SMALL),
    "llama-gqa": llmarch.preset("llama-tiny").replace(**SMALL, n_kv_heads=2),
    "mistral-window": llmarch.preset("mistral-tiny").replace(**SMALL, n_kv_heads=2, window=5),
    "bloom-alibi": llmarch.preset("bloom-tiny").replace(**SMALL),
}


def model_for(name: str, seed: int = 0):
    torch.manual_seed(seed)
    return llmarch.build(FAMILIES[name]).eval()


def greedy_by_recomputation(model, ids: torch.Tensor, n: int) -> torch.Tensor:
    """The naive reference: the whole sequence through the model, no cache, at every step."""
    for _ in range(n):
        with torch.no_grad():
            nxt = model(ids).logits[:, -1].argmax(-1)
        ids = torch.cat([ids, nxt[:, None]], 1)
    return ids


def test_compiled_static_decode_equals_full_recomputation():
    model = model_for("llama-gqa")
    ids = torch.randint(0, 97, (1, 7), generator=torch.Generator().manual_seed(0))
    want = greedy_by_recomputation(model, ids, 64)
    got = llmarch.generate(model, ids, max_new_tokens=64, cache="static", compile=True)
    assert torch.equal(got, want)


def test_every_tensor_a_static_step_writes_is_a_fixed_address_input():
    """CUDA graphs (compile_mode="reduce-overhead") replay a step only if every input it writes in place is marked
    as fixed-address; an unmarked one makes inductor skip the graph (seen on an H200). Find the written tensors by
    running steps, and require each to be marked, unguarded (a new cache re-records rather than recompiles)."""
    from llmarch.infer.decode import StaticEngine

    model = model_for("llama-gqa")
    ids = torch.randint(0, 97, (2, 6), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        engine = StaticEngine(model, batch=2, max_len=12)
        cache = engine.cache
        tensors = [t for v in vars(cache).values() for t in (v if isinstance(v, list) else [v])
                   if isinstance(t, torch.Tensor)]
        before = [(t, t.data_ptr(), t.clone()) for t in tensors]
        engine.prefill(ids, torch.ones_like(ids))
        engine.step(ids[:, 0])
    written = [t for t, ptr, old in before if t.data_ptr() == ptr and not torch.equal(t, old)]
    assert len(written) >= 2 * model.config.n_layers + 3  # k, v per layer; pos, key_valid, n_real
    assert all(getattr(t, "_dynamo_static_input_type", None) == "unguarded" for t in written)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_static_cache_logits_equal_full_forward(name):
    """Prefill + steps on the static cache give the full forward's logits at every position (padded batch)."""
    from llmarch.infer.decode import StaticEngine

    model = model_for(name)
    ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    with torch.no_grad():
        full = model(ids, attention_mask=mask).logits
        engine = StaticEngine(model, batch=2, max_len=16)
        steps = [engine.prefill(ids[:, :6], mask[:, :6])]
        steps += [engine.step(ids[:, t]) for t in range(6, 12)]
    got = torch.stack(steps[:-1], 1)  # logits predicting positions 6..11 came from inputs 5..10
    assert (got - full[:, 5:11]).abs().max() < 1e-4
    assert (steps[-1] - full[:, 11]).abs().max() < 1e-4


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("name", ["gpt2", "llama-gqa", "bloom-alibi"])
def test_batched_generation_equals_one_by_one(name, cache):
    model = model_for(name)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(1, 97, (n,), generator=g) for n in (9, 3, 6)]
    eos = 5
    T = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), T, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, T - len(p):], mask[i, T - len(p):] = p, 1
    batched = llmarch.generate(model, ids, 24, attention_mask=mask, eos_token_id=eos, pad_token_id=0, cache=cache)
    for i, p in enumerate(prompts):
        alone = llmarch.generate(model, p[None], 24, eos_token_id=eos, cache=cache)[0, len(p):]
        row = batched[i, T:]
        n = len(alone)
        assert torch.equal(row[:n], alone), f"row {i} differs from its one-by-one generation"
        assert (row[n:] == 0).all(), "a finished row is padded"


def test_stop_sequences_and_strings_stop_each_row():
    model = model_for("llama-gqa")
    ids = torch.randint(1, 97, (2, 4), generator=torch.Generator().manual_seed(3))
    free = llmarch.generate(model, ids, 12)
    stop = free[0, 4 + 3:4 + 5].tolist()  # row 0 emits these as its 4th-5th new tokens
    out = llmarch.generate(model, ids, 12, stop_sequences=[stop], pad_token_id=0)
    assert out[0, 4:4 + 5].tolist() == free[0, 4:4 + 5].tolist() and (out[0, 4 + 5:] == 0).all()
    decode = lambda toks: "".join(f"<{t}>" for t in toks)  # noqa: E731 - a fake detokenizer
    text_stop = f"<{free[1, 4 + 1].item()}><{free[1, 4 + 2].item()}>"
    out = llmarch.generate(model, ids, 12, stop_strings=[text_stop], decode=decode, pad_token_id=0)
    first = decode(free[1, 4:].tolist()).index(text_stop)
    n = len(decode(free[1, 4:].tolist())[:first + len(text_stop)].split("><"))
    assert out[1, 4:4 + n].tolist() == free[1, 4:4 + n].tolist() and (out[1, 4 + n:] == 0).all()
    with pytest.raises(ValueError, match="decode="):
        llmarch.generate(model, ids, 2, stop_strings=["x"])


def test_seeded_sampling_is_reproducible_and_streams():
    model = model_for("gpt2")
    ids = torch.randint(0, 97, (2, 5), generator=torch.Generator().manual_seed(4))
    seen = []
    kw = dict(temperature=0.9, top_k=20, top_p=0.95, min_p=0.01, repetition_penalty=1.3)
    a = llmarch.generate(model, ids, 16, seed=7, streamer=seen.append, **kw)
    b = llmarch.generate(model, ids, 16, seed=7, cache="static", **kw)
    c = llmarch.generate(model, ids, 16, seed=8, **kw)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(torch.stack(seen, 1), a[:, 5:])


def test_min_p_and_repetition_penalty_against_naive():
    logits = torch.tensor([[3.0, 2.0, 0.0, -1.0, -4.0]])
    p = logits.softmax(-1)
    kept = filter_logits(logits, min_p=0.2).isfinite()
    assert kept.tolist() == (p >= 0.2 * p.max()).tolist()
    ids, mask = torch.tensor([[0, 3, 4]]), torch.tensor([[1, 1, 0]])  # token 4 only as padding
    out = apply_repetition_penalty(logits, ids, 2.0, mask)
    assert out.tolist() == [[1.5, 2.0, 0.0, -2.0, -4.0]]
    with pytest.raises(ValueError, match="min_p"):
        Sampling(temperature=1.0, min_p=1.5)
    with pytest.raises(ValueError, match="repetition_penalty"):
        Sampling(repetition_penalty=0.0)


def test_static_cache_errors_name_the_fix():
    model = model_for("gpt2")
    with pytest.raises(ValueError, match="max_seq_len"):
        StaticKVCache.for_model(model, 1, 1000)
    with pytest.raises(ValueError, match="cache='static'"):
        llmarch.generate(model, torch.tensor([[1, 2]]), 2, compile=True)


def test_compiled_steps_logits_survive_the_next_step(monkeypatch):
    """A CUDA-graph step returns its own output buffer, overwritten by the next replay; the engine copies it out,
    so logits kept across steps stay what they were (simulated: a step that reuses one buffer)."""
    from llmarch.infer import decode

    model = model_for("llama-gqa")
    buffer = torch.zeros(1, 97)

    def reusing(model, tokens, cache):
        buffer.copy_(decode._step(model, tokens, cache))
        return buffer

    monkeypatch.setattr(decode, "compiled_step", lambda model, mode: reusing)
    ids = torch.randint(0, 97, (1, 5), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        engine = decode.StaticEngine(model, batch=1, max_len=16, compile=True, compile_mode="reduce-overhead")
        engine.prefill(ids, torch.ones_like(ids))
        kept = [engine.step(ids[:, i]) for i in range(3)]
        fresh = decode.StaticEngine(model, batch=1, max_len=16)
        fresh.prefill(ids, torch.ones_like(ids))
        want = [fresh.step(ids[:, i]) for i in range(3)]
    assert all(torch.equal(a, b) for a, b in zip(kept, want))
    assert not torch.equal(want[0], want[2])
