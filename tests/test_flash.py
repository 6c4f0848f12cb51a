"""llmarch.native.flash: attention of many queries without the [T, S] scores (``flash.c``), forward and backward,
held to float64 attention and its autograd gradients written out here: causal with T == S and after a cache
(T < S), over all keys, grouped-query and multi-query heads, head and value widths off the vector width, query and
key counts off the block sizes, strided queries, several threads; bf16 as the fp32 kernels rounded once; what it
leaves to torch; and ``sdpa_attention`` serving a model's prefill and training step through it."""
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
    assert got is not None and got.shape == (B, H, T, Dv) and got.transpose(1, 2).is_contiguous()  # as q: [B, T, H]
    contiguous_q = flash.forward(q.contiguous(), k, v, scale, causal)
    assert contiguous_q.is_contiguous() and torch.equal(contiguous_q, got)
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


@pytest.mark.parametrize("B,H,G,T,S,Dh,Dv,causal", [
    (2, 4, 2, 100, 100, 64, 64, True),     # several blocks of queries and keys, with tails
    (1, 4, 1, 17, 130, 80, 67, True),      # after a cache: key blocks no query sees in part
    (1, 6, 3, 50, 70, 19, 130, False),     # every key; values past two vectors
])
def test_gradients_equal_float64_autograd(B, H, G, T, S, Dh, Dv, causal):
    q = rand(B, T, H, Dh).transpose(1, 2).requires_grad_()
    k, v = rand(B, G, S, Dh, seed=1).requires_grad_(), rand(B, G, S, Dv, seed=2).requires_grad_()
    g = rand(B, H, T, Dv, seed=3)
    scale = 1 / math.sqrt(Dh)
    # the kernels' autograd function (flash.forward sends value widths apart from key widths to torch for training)
    y = (flash._Attention.apply(q, k, v, scale, causal, None, None) if Dv != Dh
         else flash.forward(q, k, v, scale, causal))
    assert type(y.grad_fn).__name__ == "_AttentionBackward"
    got = torch.autograd.grad(y, (q, k, v), g)
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    want = torch.autograd.grad(reference(qd, kd, vd, scale, causal), (qd, kd, vd), g.double())
    for a, b in zip(got, want):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("threads,shares", [(1, True), (3, True), (3, False), (1, False)])
def test_gradients_on_threads_and_by_either_pass_for_dq(threads, shares, monkeypatch):
    """dq from each thread's own sums, added up (shares), or from a second pass over query blocks: both as float64's
    on 1 and 3 threads."""
    monkeypatch.setattr(flash, "DQ_SHARES_MAX", flash.DQ_SHARES_MAX if shares else -1)
    q, k, v = (rand(2, 3, 150, 24, seed=s).requires_grad_() for s in range(3))
    g = rand(2, 3, 150, 24, seed=3)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = torch.autograd.grad(flash.forward(q, k, v, 0.25, True), (q, k, v), g)
    finally:
        torch.set_num_threads(before)
    exact = [t.detach().double().requires_grad_() for t in (q, k, v)]
    want = torch.autograd.grad(reference(*exact, 0.25, True), exact, g.double())
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5)


def test_bf16_is_the_fp32_kernel_on_the_bf16_values():
    """bf16: the output is the fp32 kernel's rounded once; the gradients (from the output as saved, in bf16, as
    torch's bf16 kernel saves it) no further from float64's than torch's bf16 kernel's are."""
    q, k, v = (rand(1, 4, 70, 32, seed=s).bfloat16().requires_grad_() for s in range(3))
    g = rand(1, 4, 70, 32, seed=3).bfloat16()
    y = flash.forward(q, k, v, 0.2, True)
    got = torch.autograd.grad(y, (q, k, v), g)
    wide = [t.detach().float() for t in (q, k, v)]
    assert y.dtype == torch.bfloat16 and torch.equal(y, flash.forward(*wide, 0.2, True).bfloat16())
    exact = [t.double().requires_grad_() for t in wide]
    want = torch.autograd.grad(reference(*exact, 0.2, True), exact, g.double())
    torch_grads = torch.autograd.grad(F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.2), (q, k, v), g)
    for a, b, c in zip(got, want, torch_grads):
        assert a.dtype == torch.bfloat16
        assert (a.double() - b).abs().max() <= 1.5 * (c.double() - b).abs().max()
        assert (a.double() - b).abs().mean() <= 1.1 * (c.double() - b).abs().mean()


@pytest.mark.parametrize("case", ["few queries", "more queries than keys", "strided values", "mixed dtypes",
                                  "training with values wider than keys", "not built"])
def test_what_it_leaves_to_torch(case, monkeypatch):
    q, k, v = rand(1, 2, 32, 8), rand(1, 2, 32, 8, seed=1), rand(1, 2, 32, 8, seed=2)
    causal = True
    if case == "training with values wider than keys":
        v = rand(1, 2, 32, 12, seed=2).requires_grad_()
        with torch.no_grad():
            assert flash.forward(q, k, v, 0.3, causal) is not None  # inference takes them
    elif case == "mixed dtypes":
        k = k.bfloat16()
    elif case == "few queries":
        q = q[:, :, :flash.MIN_QUERIES - 1]
    elif case == "more queries than keys":
        k, v = k[:, :, :20], v[:, :, :20]
    elif case == "strided values":
        v = rand(1, 2, 8, 32, seed=2).transpose(-1, -2)
    elif case == "not built":
        monkeypatch.setattr(flash, "available", lambda: False)
    assert flash.forward(q, k, v, 0.3, causal) is None


def counting(monkeypatch) -> dict[str, int]:
    """Counts the kernels' forward and backward calls (after their first-use checks, which call them too)."""
    assert flash.available()
    calls = {"fwd": 0, "bwd": 0}

    def counted(name, real):
        def count(*a, **kw):
            calls[name] += 1
            return real(*a, **kw)
        return count
    monkeypatch.setattr(flash, "_fwd", counted("fwd", flash._fwd))
    monkeypatch.setattr(flash, "_bwd", counted("bwd", flash._bwd))
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sdpa_attention_serves_a_prefill_through_the_kernel(dtype, monkeypatch):
    """A LLaMA-style model's forward without gradients: every layer's attention on the kernel (bf16: widened to fp32
    and rounded once), logits as torch's kernel gives them (fp32: within 1e-5; bf16: within a few roundings of
    torch's bf16 kernel's, and no further than those from the fp32 model of the same weights); a training step's
    forward and backward on it too, gradients as torch's kernel gives them."""
    torch.manual_seed(0)
    cfg = llmarch.preset("llama-tiny").replace(max_seq_len=128)
    model = llmarch.build(cfg).eval().to(dtype)
    ids = torch.randint(0, model.config.vocab_size, (2, 40))
    calls = counting(monkeypatch)
    with torch.no_grad():
        got = model(ids).logits
    assert calls == {"fwd": model.config.n_layers, "bwd": 0}
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
    model.zero_grad()
    model(ids).logits.float().square().mean().backward()
    assert calls == {"fwd": model.config.n_layers, "bwd": model.config.n_layers}
    got = {name: p.grad.clone() for name, p in model.named_parameters()}
    monkeypatch.setattr(flash, "available", lambda: False)
    model.zero_grad()
    model(ids).logits.float().square().mean().backward()
    for name, p in model.named_parameters():
        if dtype == torch.float32:
            torch.testing.assert_close(got[name], p.grad, rtol=1e-4, atol=1e-6)
        else:  # bf16 gradients through two different bf16 attentions: close, not equal
            assert (got[name].float() - p.grad.float()).abs().max() <= 0.1 * p.grad.float().abs().max() + 1e-3


def test_bf16_many_queries_are_the_fp32_kernel_rounded_once():
    q, k, v = (rand(1, 4, 70, 32, seed=s).bfloat16() for s in range(3))
    with torch.no_grad():
        got = kernels.sdpa_attention(q, k, v, causal=True)
    want = flash.forward(q.float(), k.float(), v.float(), 1 / math.sqrt(32), True).bfloat16()
    assert got.dtype == torch.bfloat16 and torch.equal(got, want)
    torch.testing.assert_close(got.float(), F.scaled_dot_product_attention(q.float(), k.float(), v.float(),
                                                                           is_causal=True), rtol=1e-2, atol=1e-2)


def test_torch_func_transforms_get_torchs_kernel(monkeypatch):
    """Under torch.func (vmap, grad) the attention runs torch's kernel, which the transforms see through."""
    q, k, v = rand(3, 2, 32, 8), rand(3, 2, 32, 8, seed=1), rand(3, 2, 32, 8, seed=2)
    calls = counting(monkeypatch)
    got = torch.func.vmap(lambda a: kernels.sdpa_attention(a[None], k[:1], v[:1], causal=True)[0])(q)
    assert calls == {"fwd": 0, "bwd": 0}
    grad = torch.func.grad(lambda a: kernels.sdpa_attention(a, k, v, causal=True).sum())(q)
    assert calls == {"fwd": 0, "bwd": 0} and grad.shape == q.shape
    torch.testing.assert_close(got, F.scaled_dot_product_attention(q, k[:1].expand_as(k), v[:1].expand_as(v),
                                                                   is_causal=True), rtol=1e-5, atol=1e-5)


def run_mask(kind: str, B: int, T: int, S: int) -> torch.Tensor:
    """[B, 1, T, S] boolean masks whose every row is one run of keys, as llmarch's attention builds them (queries at
    the end of the keys, T <= S)."""
    t, s = torch.arange(T)[:, None] + (S - T), torch.arange(S)[None, :]
    causal = (s <= t).expand(B, T, S)
    if kind == "left padding":  # the padding queries see every key
        m = causal & (s >= torch.tensor([0, 7])[:B, None, None])
        m = m | ~m.any(-1, keepdim=True)
    elif kind == "right padding":
        m = causal & (s < torch.tensor([S, S - 9])[:B, None, None])
    elif kind == "encoder padding":
        m = (s < torch.tensor([S - 5, S - 40])[:B, None, None]).expand(B, T, S)  # (cross-attention: T > S)
    elif kind == "documents":  # packed: documents of 30, 40 and the rest keys
        doc = (torch.arange(S) >= 30).long() + (torch.arange(S) >= 70).long()
        m = causal & (doc[None, :] == doc[S - T:, None])
    elif kind == "sliding window":
        m = causal & (s > t - 20)
    else:  # any runs
        g = torch.Generator().manual_seed(5)
        lo = torch.randint(0, S, (B, T, 1), generator=g)
        hi = lo + 1 + (torch.rand(B, T, 1, generator=g) * (S - lo)).long()
        m = (s >= lo) & (s < hi)
    return m[:, None].contiguous()


def masked_reference(q, k, v, mask, scale):
    H, G = q.shape[1], k.shape[1]
    kd, vd = (t.repeat_interleave(H // G, 1) for t in (k, v))
    return (q @ kd.transpose(-1, -2) * scale).masked_fill(~mask, float("-inf")).softmax(-1) @ vd


KINDS = ["left padding", "right padding", "encoder padding", "documents", "sliding window", "any runs"]


@pytest.mark.parametrize("kind,T,S", [(kind, T, S) for kind in KINDS for T, S in ((100, 100), (70, 130))]
                         + [("encoder padding", 130, 60), ("any runs", 130, 60)])  # more queries than keys: cross
def test_masks_of_key_runs_take_the_kernel(kind, T, S, monkeypatch):
    """A mask whose rows are each one run of keys (padding either side, packed documents, a sliding window, any)
    runs on the kernel as key ranges: forward and gradients as float64 attention under that mask."""
    B, H, G, D = 2, 4, 2, 24
    q = rand(B, T, H, D).transpose(1, 2).requires_grad_()
    k, v = rand(B, G, S, D, seed=1).requires_grad_(), rand(B, G, S, D, seed=2).requires_grad_()
    g = rand(B, H, T, D, seed=3)
    mask = run_mask(kind, B, T, S)
    calls = counting(monkeypatch)
    y = kernels.sdpa_attention(q, k, v, mask=mask)
    got = torch.autograd.grad(y, (q, k, v), g)
    assert calls == {"fwd": 1, "bwd": 1}
    exact = [t.detach().double().requires_grad_() for t in (q, k, v)]
    want_y = masked_reference(*exact, mask, 1 / math.sqrt(D))
    want = torch.autograd.grad(want_y, exact, g.double())
    torch.testing.assert_close(y.double(), want_y, rtol=1e-5, atol=1e-5)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("threads,shares", [(1, True), (3, True), (3, False)])
def test_key_ranges_on_threads_and_by_either_pass_for_dq(threads, shares, monkeypatch):
    monkeypatch.setattr(flash, "DQ_SHARES_MAX", flash.DQ_SHARES_MAX if shares else -1)
    q, k, v = (rand(2, 3, 150, 24, seed=s).requires_grad_() for s in range(3))
    g = rand(2, 3, 150, 24, seed=3)
    mask = run_mask("any runs", 2, 150, 150)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        y = kernels.sdpa_attention(q, k, v, mask=mask, scale=0.25)
        got = torch.autograd.grad(y, (q, k, v), g)
    finally:
        torch.set_num_threads(before)
    exact = [t.detach().double().requires_grad_() for t in (q, k, v)]
    want = torch.autograd.grad(masked_reference(*exact, mask, 0.25), exact, g.double())
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", ["a hole in a row", "a query seeing no key", "float mask", "one row per head"])
def test_other_masks_are_left_to_torch(case, monkeypatch):
    q, k, v = (rand(2, 4, 40, 16, seed=s) for s in range(3))
    mask = run_mask("right padding", 2, 40, 40)
    if case == "a hole in a row":
        mask[0, 0, 30, 12] = False
    elif case == "a query seeing no key":
        mask[1, 0, 5] = False
    elif case == "one row per head":
        mask = mask.expand(2, 4, 40, 40)
    calls = counting(monkeypatch)
    attn_mask = mask.float().log() if case == "float mask" else mask  # 0 / -inf
    with torch.no_grad():
        got = kernels.sdpa_attention(q, k, v, mask=attn_mask)
    assert calls == {"fwd": 0, "bwd": 0}
    assert torch.equal(got, F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask))


def test_a_mask_is_read_once_and_again_after_a_change(monkeypatch):
    """The layers of a forward share one mask: its key ranges are found once; an in-place change finds them anew."""
    q, k, v = (rand(2, 4, 40, 16, seed=s) for s in range(3))
    mask = run_mask("right padding", 2, 40, 40)
    seen = []
    real = torch.Tensor.flip
    monkeypatch.setattr(torch.Tensor, "flip", lambda t, *a: seen.append(1) or real(t, *a))
    with torch.no_grad():
        for _ in range(3):
            kernels.sdpa_attention(q, k, v, mask=mask)
        assert len(seen) == 1
        mask[0, 0, 30, 12] = False  # now a hole: torch's kernel with the mask as it is
        got = kernels.sdpa_attention(q, k, v, mask=mask)
    assert len(seen) == 2
    assert torch.equal(got, F.scaled_dot_product_attention(q, k, v, attn_mask=mask))


def on_kernel_then_torch(model, step, forwards: int, monkeypatch) -> list[tuple]:
    """(what ``step()`` returns, the gradients it left) with llmarch's kernels — ``forwards`` forwards per layer and
    one backward on them — then with torch's kernel."""
    results = []
    for kernel in (True, False):
        if not kernel:
            monkeypatch.setattr(flash, "available", lambda: False)
        calls = counting(monkeypatch) if kernel else None
        model.zero_grad()
        out = step()
        if kernel:
            assert calls == {"fwd": forwards * model.config.n_layers, "bwd": model.config.n_layers}
        results.append((out, [p.grad.clone() for p in model.parameters()]))
    return results


def kernel_then_torch(model, ids, train_mask, infer_mask, monkeypatch) -> list[tuple]:
    """(logits at train_mask's real slots, logits of a forward without gradients under infer_mask, gradients of a
    loss over the first) on llmarch's kernels, then on torch's."""
    def step():
        out = model(ids, attention_mask=train_mask).logits
        out.float()[train_mask.bool()].square().mean().backward()
        with torch.no_grad():
            other = model(ids, attention_mask=infer_mask).logits
        return out[train_mask.bool()], other if infer_mask is None else other[infer_mask.bool()]
    return [(*out, grads) for out, grads in on_kernel_then_torch(model, step, 2, monkeypatch)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_padded_batch_trains_and_generates_through_the_kernel(dtype, monkeypatch):
    """A right-padded batch (fine-tuning) and a left-padded one (batched prompts): every layer's attention on the
    kernel, logits at the real positions and gradients as with torch's kernel."""
    torch.manual_seed(0)
    model = llmarch.build(llmarch.preset("llama-tiny").replace(max_seq_len=128)).to(dtype)
    ids = torch.randint(3, model.config.vocab_size, (3, 40))
    right = (torch.arange(40)[None] < torch.tensor([[40], [31], [22]])).long()
    left = right.flip(-1)
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=0.05, atol=0.05)
    results = kernel_then_torch(model, ids, right, left, monkeypatch)
    (a_out, a_prompts, a_grads), (b_out, b_prompts, b_grads) = results
    torch.testing.assert_close(a_out.float(), b_out.float(), **tol)
    torch.testing.assert_close(a_prompts.float(), b_prompts.float(), **tol)
    for a, b in zip(a_grads, b_grads):
        if dtype == torch.float32:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
        else:
            assert (a.float() - b.float()).abs().max() <= 0.1 * b.float().abs().max() + 1e-3


def test_a_prefill_after_a_cache_takes_the_kernel_as_causal(monkeypatch):
    """The attention module masks a chunk of queries after cached keys with the offset-causal mask: the kernel takes
    exactly that mask (as causal, T < S), and a model continuing its cache by 24 tokens gives the logits of one
    48-token forward; any other mask stays on torch's kernel."""
    q, k, v = rand(1, 4, 20, 16), rand(1, 2, 50, 16, seed=1), rand(1, 2, 50, 16, seed=2)
    mask = torch.ones(1, 1, 20, 50, dtype=torch.bool).tril(30)
    calls = counting(monkeypatch)
    with torch.no_grad():
        got = kernels.sdpa_attention(q, k, v, mask=mask)
        assert calls["fwd"] == 1
        torch.testing.assert_close(got, F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True),
                                   rtol=1e-5, atol=1e-5)
        other = mask.clone()
        other[0, 0, 3, 40] = True  # one query sees one key past its place
        kernels.sdpa_attention(q, k, v, mask=other)
        assert calls["fwd"] == 1
    torch.manual_seed(0)
    model = llmarch.build(llmarch.preset("llama-tiny").replace(max_seq_len=128)).eval()
    ids = torch.randint(0, model.config.vocab_size, (1, 48))
    with torch.no_grad():
        whole = model(ids).logits
        cache = model.new_cache()
        model(ids[:, :24], cache=cache, use_cache=True)
        calls["fwd"] = 0
        rest = model(ids[:, 24:], cache=cache, use_cache=True).logits
    assert calls["fwd"] == model.config.n_layers
    torch.testing.assert_close(rest, whole[:, 24:], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("T, S, grad, user_off, expect_cudnn", [
    (8, 8, False, False, False),  # inference: a prefill of a new length would build a cuDNN plan
    (1, 9, False, False, False),  # a decode step over a cache
    (4, 12, True, False, False),  # keys from a cache, even with gradients
    (8, 8, True, False, True),  # training: torch's choice
    (1, 9, False, True, True),  # flash and memory-efficient switched off by the user: cuDNN stays
])
def test_accelerator_inference_sets_cudnn_attention_aside_for_the_call(monkeypatch, T, S, grad, user_off,
                                                                     expect_cudnn):
    """On a non-CPU device (meta here; the GPU run measured it) torch's SDPA runs with cuDNN's backend off for
    inference and cached keys, and the user's setting is restored afterwards, also when the call raises."""
    seen = []
    real = F.scaled_dot_product_attention

    def recording(*a, **kw):
        seen.append(torch.backends.cuda.cudnn_sdp_enabled())
        return real(*a, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording)
    q = torch.empty(1, 4, T, 16, device="meta", requires_grad=grad)
    k, v = (torch.empty(1, 2, S, 16, device="meta", requires_grad=grad) for _ in range(2))
    flags = (torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.mem_efficient_sdp_enabled())
    try:
        if user_off:
            torch.backends.cuda.enable_flash_sdp(False)
            torch.backends.cuda.enable_mem_efficient_sdp(False)
        with torch.set_grad_enabled(grad):
            out = kernels.sdpa_attention(q, k, v, causal=T == S)
        assert out.shape == (1, 4, T, 16) and seen == [expect_cudnn]
        assert torch.backends.cuda.cudnn_sdp_enabled()
        cpu = kernels.sdpa_attention(*(torch.randn(1, 2, 3, 16) for _ in range(3)))  # the CPU is left alone
        assert cpu.shape == (1, 2, 3, 16) and seen[-1]

        def failing(*a, **kw):
            raise RuntimeError("kernel failed")

        monkeypatch.setattr(F, "scaled_dot_product_attention", failing)
        with pytest.raises(RuntimeError), torch.no_grad():
            kernels.sdpa_attention(q, k, v)
        assert torch.backends.cuda.cudnn_sdp_enabled()
    finally:
        torch.backends.cuda.enable_flash_sdp(flags[0])
        torch.backends.cuda.enable_mem_efficient_sdp(flags[1])


def alibi_bias(H: int, T: int, S: int) -> torch.Tensor:
    """ALiBi's bias as llmarch's position scheme builds it, for queries at the end of the keys."""
    from llmarch.nn.position import AlibiPositions

    return AlibiPositions(n_heads=H).score_bias(torch.arange(T) + S - T, torch.arange(S))


@pytest.mark.parametrize("H,T,S,kind", [(4, 100, 100, None), (6, 70, 130, None), (4, 100, 100, "right padding"),
                                        (4, 70, 130, "left padding")])
def test_alibi_bias_takes_the_kernel(H, T, S, kind, monkeypatch):
    """ALiBi (BLOOM): the bias recognised as slopes and added in the kernel: forward and gradients as float64
    attention with that bias, causal or under a padding mask; 6 heads: slopes of a head count not a power of 2."""
    B, D = 2, 16
    q = rand(B, T, H, D).transpose(1, 2).requires_grad_()
    k, v = rand(B, H, S, D, seed=1).requires_grad_(), rand(B, H, S, D, seed=2).requires_grad_()
    g = rand(B, H, T, D, seed=3)
    bias = alibi_bias(H, T, S)
    mask = run_mask(kind, B, T, S) if kind else torch.ones(T, S, dtype=torch.bool).tril(S - T)[None, None]
    calls = counting(monkeypatch)
    if kind is None and T == S:  # as a model's unpadded forward passes it: causal, no mask
        y = kernels.sdpa_attention(q, k, v, bias=bias, causal=True)
    else:
        y = kernels.sdpa_attention(q, k, v, mask=mask, bias=bias)
    got = torch.autograd.grad(y, (q, k, v), g)
    assert calls == {"fwd": 1, "bwd": 1}
    exact = [t.detach().double().requires_grad_() for t in (q, k, v)]
    scores = exact[0] @ exact[1].transpose(-1, -2) / math.sqrt(D) + bias.double()
    want_y = scores.masked_fill(~mask, float("-inf")).softmax(-1) @ exact[2]
    want = torch.autograd.grad(want_y, exact, g.double())
    torch.testing.assert_close(y.double(), want_y, rtol=1e-5, atol=1e-5)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", ["relative buckets", "slopes off by an ulp", "queries not at the end", "bf16 bias"])
def test_other_biases_are_left_to_torch(case, monkeypatch):
    q, k, v = (rand(1, 4, 40, 16, seed=s) for s in range(3))
    bias = alibi_bias(4, 40, 40)
    if case == "relative buckets":
        bias = rand(1, 4, 40, 40, seed=7)
    elif case == "slopes off by an ulp":
        bias[0, 2, 30, 12] = torch.nextafter(bias[0, 2, 30, 12], torch.tensor(0.0))
    elif case == "queries not at the end":
        from llmarch.nn.position import AlibiPositions

        bias = AlibiPositions(n_heads=4).score_bias(torch.arange(40) + 1, torch.arange(40))  # one slot later
    elif case == "bf16 bias":
        bias = bias.bfloat16()
    calls = counting(monkeypatch)
    with torch.no_grad():
        got = kernels.sdpa_attention(q, k, v, bias=bias, causal=True)
    assert calls == {"fwd": 0, "bwd": 0}
    mask = torch.ones(40, 40, dtype=torch.bool).tril()
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.float().masked_fill(~mask, float("-inf")))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_a_bloom_model_trains_and_prefills_through_the_kernel(monkeypatch):
    """A BLOOM-style model (ALiBi), padded and not: every layer on the kernel, logits and gradients as with torch's."""
    torch.manual_seed(0)
    model = llmarch.build(llmarch.preset("bloom-tiny").replace(max_seq_len=128))
    ids = torch.randint(3, model.config.vocab_size, (2, 40))
    right = (torch.arange(40)[None] < torch.tensor([[40], [29]])).long()
    results = kernel_then_torch(model, ids, right, None, monkeypatch)  # padded, then unpadded (causal)
    for a, b in zip(results[0][:2], results[1][:2]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    for a, b in zip(results[0][2], results[1][2]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_an_alibi_bias_changed_in_place_is_read_again(monkeypatch):
    q, k, v = (rand(1, 4, 40, 16, seed=s) for s in range(3))
    bias = alibi_bias(4, 40, 40)
    calls = counting(monkeypatch)
    with torch.no_grad():
        kernels.sdpa_attention(q, k, v, bias=bias, causal=True)
        assert calls["fwd"] == 1
        bias[0, 1, 20, 3] += 1.0  # no longer ALiBi's
        got = kernels.sdpa_attention(q, k, v, bias=bias, causal=True)
    assert calls["fwd"] == 1
    mask = torch.ones(40, 40, dtype=torch.bool).tril()
    torch.testing.assert_close(got, F.scaled_dot_product_attention(
        q, k, v, attn_mask=bias.masked_fill(~mask, float("-inf"))), rtol=1e-5, atol=1e-5)


def test_packed_fine_tuning_rows_run_on_the_kernel(monkeypatch):
    """Packed chat rows (conversations side by side, right padding: ``document_ids`` 1, 2, ..., 0 on padding) give
    masks of runs: the step runs on the kernels, with the loss and gradients of torch's kernel."""
    from llmarch.train.chat_data import Row, causal_targets, collate
    from llmarch.train.masking import IGNORE

    torch.manual_seed(0)
    model = llmarch.build(llmarch.preset("llama-tiny").replace(max_seq_len=128))
    rows = [Row(list(range(3, 33)), [1] * 30, [1] * 12 + [2] * 18), Row(list(range(5, 25)), [1] * 20, [1] * 20)]
    inputs, labels = causal_targets(collate(rows, pad_id=0))
    def step():
        loss = F.cross_entropy(model(**inputs).logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE)
        loss.backward()
        return loss.detach()

    results = on_kernel_then_torch(model, step, 1, monkeypatch)
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-6)
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
