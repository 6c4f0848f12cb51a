"""llmarch.native.flash: attention of many queries without the [T, S] scores (``flash.c``), held to float64
attention written out here: causal with T == S and after a cache (T < S), over all keys, grouped-query and
multi-query heads, head and value widths off the vector width, query counts off the block size, strided queries,
several threads; what it leaves to torch; and ``sdpa_attention`` serving a model's prefill (fp32, and bf16 widened
to it and rounded once) through it."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import llmarch
from llmarch import native
from llmarch.native import flash
from llmarch.nn import kernels

pytestmark = pytest.mark.skipif(native.library("flash") is None,
                                reason="no CPU with AVX-512 or no C compiler: the flash kernel cannot be built")


def reference(q, k, v, scale, causal):
    """float64 softmax(q k^T * scale) v, causal: query t sees keys s <= t + S - T."""
    H, G, T, S = q.shape[1], k.shape[1], q.shape[2], k.shape[2]
    kd, vd = (t.double().repeat_interleave(H // G, 1) for t in (k, v))
    s = q.double() @ kd.transpose(-1, -2) * scale
    if causal:
        s = s.masked_fill(~torch.ones(T, S, dtype=torch.bool).tril(S - T), float("-inf"))
    return s.softmax(-1) @ vd


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_the_kernel_passes_its_self_check():
    assert flash.available()


@pytest.mark.parametrize("B,H,G,T,S,Dh,Dv,causal", [
    (2, 4, 2, 100, 100, 64, 64, True),     # blocks of 48 queries and 64 keys with tails
    (1, 6, 3, 48, 48, 19, 19, True),       # one query block exactly, a head width off the vector width
    (1, 4, 1, 17, 130, 80, 67, True),      # after a cache (T < S), multi-query, a value width past one vector
    (2, 2, 2, 65, 65, 128, 130, False),    # every key (an encoder), values past 128
    (1, 8, 2, 200, 260, 64, 64, False),
    (1, 2, 1, 16, 16, 1, 1, True),         # the fewest queries it takes, one-wide heads
])
def test_forward_equals_float64_attention(B, H, G, T, S, Dh, Dv, causal):
    q = rand(B, T, H, Dh).transpose(1, 2)  # [B, H, T, Dh] as a projection's view: rows H * Dh apart
    k, v = rand(B, G, S, Dh, seed=1), rand(B, G, S, Dv, seed=2)
    scale = 1 / math.sqrt(Dh)
    got = flash.forward(q, k, v, scale, causal)
    assert got is not None and got.shape == (B, H, T, Dv) and got.is_contiguous()
    torch.testing.assert_close(got.double(), reference(q, k, v, scale, causal), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("threads", [1, 3])
def test_values_do_not_depend_on_the_threads(threads):
    q, k, v = rand(2, 5, 150, 32), rand(2, 5, 150, 32, seed=1), rand(2, 5, 150, 32, seed=2)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = flash.forward(q, k, v, 0.2, True)
    finally:
        torch.set_num_threads(before)
    torch.set_num_threads(1)
    try:
        assert torch.equal(got, flash.forward(q, k, v, 0.2, True))
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(got.double(), reference(q, k, v, 0.2, True), rtol=1e-5, atol=1e-5)


def test_large_scores_and_a_far_key_stay_finite():
    """Scores spanning hundreds (the running maximum grows block by block and rescales what was summed), where fp32
    scores themselves are off by ~1e-5: no further from float64 than torch's fp32 kernel."""
    q, k, v = rand(1, 2, 64, 16) * 6, rand(1, 2, 300, 16, seed=1) * 6, rand(1, 2, 300, 16, seed=2)
    k[:, :, 250] = q[:, :, 10] * 3  # one key far past the first blocks outweighs all others for query 10
    got, want = flash.forward(q, k, v, 1.0, False), reference(q, k, v, 1.0, False)
    assert got.isfinite().all() and (want[0, :, 10] - v[0, :, 250]).abs().max() < 1e-6
    torch_error = (F.scaled_dot_product_attention(q, k, v, scale=1.0).double() - want).abs().max()
    assert (got.double() - want).abs().max() <= 2 * torch_error + 1e-6


@pytest.mark.parametrize("case", ["gradient", "bf16", "few queries", "more queries than keys", "strided values",
                                  "not built"])
def test_what_it_leaves_to_torch(case, monkeypatch):
    q, k, v = rand(1, 2, 32, 8), rand(1, 2, 32, 8, seed=1), rand(1, 2, 32, 8, seed=2)
    causal = True
    if case == "gradient":
        q.requires_grad_()
    elif case == "bf16":
        q, k, v = q.bfloat16(), k.bfloat16(), v.bfloat16()
    elif case == "few queries":
        q = q[:, :, :flash.MIN_QUERIES - 1]
    elif case == "more queries than keys":
        k, v = k[:, :, :20], v[:, :, :20]
    elif case == "strided values":
        v = rand(1, 2, 8, 32, seed=2).transpose(-1, -2)
    elif case == "not built":
        monkeypatch.setattr(flash, "available", lambda: False)
    assert flash.forward(q, k, v, 0.3, causal) is None


def counting(monkeypatch) -> list[int]:
    calls, real = [0], flash._call

    def count(*a):
        calls[0] += 1
        return real(*a)
    monkeypatch.setattr(flash, "_call", count)
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sdpa_attention_serves_a_prefill_through_the_kernel(dtype, monkeypatch):
    """A LLaMA-style model's forward without gradients: every layer's attention on the kernel (bf16: widened to fp32
    and rounded once), logits as torch's kernel gives them (fp32: within 1e-5; bf16: within a few roundings of
    torch's bf16 kernel's, and no further than those from the fp32 model of the same weights); with a gradient,
    torch's kernel."""
    torch.manual_seed(0)
    cfg = llmarch.preset("llama-tiny").replace(max_seq_len=128)
    model = llmarch.build(cfg).eval().to(dtype)
    ids = torch.randint(0, model.config.vocab_size, (2, 40))
    calls = counting(monkeypatch)
    with torch.no_grad():
        got = model(ids).logits
    assert calls[0] == model.config.n_layers
    monkeypatch.setattr(flash, "available", lambda: False)
    with torch.no_grad():
        want = model(ids).logits
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    else:
        fp32 = llmarch.build(cfg).eval()
        fp32.load_state_dict({name: t.float() for name, t in model.state_dict().items()})
        with torch.no_grad():
            exact = fp32(ids).logits
        assert (got.float() - want.float()).abs().max() < 0.03
        assert (got.float() - exact).abs().mean() <= 1.1 * (want.float() - exact).abs().mean()
    monkeypatch.undo()
    calls = counting(monkeypatch)
    model(ids).logits.sum().backward()
    assert calls[0] == 0


def test_bf16_many_queries_are_the_fp32_kernel_rounded_once():
    q, k, v = (rand(1, 4, 70, 32, seed=s).bfloat16() for s in range(3))
    with torch.no_grad():
        got = kernels.sdpa_attention(q, k, v, causal=True)
    want = flash.forward(q.float(), k.float(), v.float(), 1 / math.sqrt(32), True).bfloat16()
    assert got.dtype == torch.bfloat16 and torch.equal(got, want)
    torch.testing.assert_close(got.float(), F.scaled_dot_product_attention(q.float(), k.float(), v.float(),
                                                                           is_causal=True), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_masked_attention_is_left_to_torch(dtype, monkeypatch):
    """A padding mask (or any mask) over many queries: torch's kernel with the mask, not the kernel."""
    q, k, v = (rand(2, 4, 40, 16, seed=s).to(dtype) for s in range(3))
    mask = torch.ones(2, 1, 40, 40, dtype=torch.bool).tril()
    mask[1, :, :, :7] = False  # the second sequence's first 7 keys are padding
    mask[1, :, :7] = True  # (its padding queries see everything, as llmarch's masks make them)
    calls = counting(monkeypatch)
    with torch.no_grad():
        got = kernels.sdpa_attention(q, k, v, mask=mask)
    assert calls[0] == 0
    assert torch.equal(got, F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.double(), kernels.naive_attention(q.double(), k.double(), v.double(), mask=mask),
                               rtol=tol, atol=tol)
