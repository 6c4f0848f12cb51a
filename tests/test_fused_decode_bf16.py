"""The bf16 native decode layer (llmarch.native.decode with a bf16 record): a bf16 model's decode step in one native
call per layer, rounding to bf16 wherever the eager bf16 step rounds, on both bf16 routes (oneDNN's bf16 products;
products widened to fp32). Held to the eager bf16 steps it replaces:
nearly all logits and every cache entry bit-equal (the rest one rounding apart, where summation order flips a
rounding), greedy tokens identical, across the attention and FFN shapes of test_fused_decode.py, the mixtures of
experts of test_fused_moe.py, the latent attention of test_fused_latent.py and padded batches; and standing aside
where the eager bf16 step computes something else (torch's own bf16 kernels, autocast, a bf16 model without its
blocked copies)."""
from __future__ import annotations

import pytest
import torch

from llmarch import native
from llmarch.infer.layout import pack_weights, unpack_weights
from llmarch.native import bf16 as native_bf16
from llmarch.nn import dense, fused_decode, fused_moe, widened

from tests.decode_util import Spy, generate_both, num_threads, steps
from tests.test_fused_decode import BASE, CASES, model_for
from tests.test_fused_latent import CASES as LATENT_CASES
from tests.test_fused_latent import model_for as latent_model
from tests.test_fused_moe import CASES as MOE_CASES
from tests.test_fused_moe import forward_spy, moe_model

pytestmark = pytest.mark.skipif(native.library("decode") is None or not native_bf16.available(),
                                reason="no x86-64 CPU with AVX2 or no C compiler: the native kernels cannot be built")

BF16 = torch.bfloat16
TOL = dict(rtol=2 ** -6, atol=2 ** -6)  # two bf16 roundings of values up to ~2


# The bf16 routes an eager step can take, each a real CPU's: oneDNN's bf16 products (AVX-512 BF16 / AMX hosts), and
# products widened to fp32 (a CPU without bf16 products, e.g. AVX2). This host runs its own route, and on a host with
# bf16 products also the other one, taken for a CPU without them (oneDNN's bf16 off, the widened route on).
ROUTES = ["onednn bf16", "widened"] if dense.ONEDNN_BF16 else ["widened"]


@pytest.fixture(autouse=True, params=ROUTES)
def bf16_route(request):
    """Each test on each route (its own context: a test's ``monkeypatch.undo()`` keeps it)."""
    with pytest.MonkeyPatch.context() as mp:
        if request.param == "widened":
            mp.setattr(dense, "ONEDNN_BF16", False)
            mp.setattr(widened, "ROUTE", True)
        yield request.param


def bf16_model(**over):
    model = model_for(**over).to(BF16)
    pack_weights(model)
    return model


def check_bf16_steps(model, ids, n, monkeypatch, exact=0.95):
    """n native bf16 steps against the eager bf16 ones: all served; at least ``exact`` of the logits and 99 % of the
    cache bit-equal, the rest within two roundings; the same greedy tokens."""
    want, want_tokens, want_cache = steps(model, ids, n, False, monkeypatch)
    spy = Spy(monkeypatch)
    got, got_tokens, got_cache = steps(model, ids, n, True, monkeypatch)
    assert spy.steps == n and got.dtype == BF16
    assert (got == want).float().mean() >= exact
    torch.testing.assert_close(got.float(), want.float(), **TOL)
    assert torch.equal(got_tokens, want_tokens)
    for i in want_cache.k:
        for a, b in [(got_cache.k[i], want_cache.k[i]), (got_cache.v[i], want_cache.v[i])]:
            assert a.dtype == BF16 and (a == b).float().mean() >= 0.99
            torch.testing.assert_close(a.float(), b.float(), **TOL)


@pytest.mark.parametrize("case", sorted(CASES))
def test_bf16_steps_are_the_eager_bf16_steps(case, monkeypatch):
    model = bf16_model(**CASES[case])
    ids = torch.randint(0, BASE["vocab_size"], (3, 7), generator=torch.Generator().manual_seed(3))
    check_bf16_steps(model, ids, 10, monkeypatch)


@pytest.mark.parametrize("case", sorted(MOE_CASES))
def test_bf16_moe_steps_are_the_eager_bf16_steps(case, monkeypatch):
    """Mixtures of experts in bf16 layers: routing in fp32 over the widened router, as the eager router computes it;
    each expert's output rounded, weighted by its rounded weight, summed in fp32 and rounded once (as the sorted
    dispatch's index_add sums them); shared experts (gated or not) rounded as the eager bf16 ops round them."""
    model = moe_model(activation="gelu_tanh" if "gelu" in case else "silu", **MOE_CASES[case]).to(BF16)
    pack_weights(model)
    ids = torch.randint(0, BASE["vocab_size"], (4, 7), generator=torch.Generator().manual_seed(4))
    check_bf16_steps(model, ids, 10, monkeypatch)


@pytest.mark.parametrize("case", ["mixtral", "qwen2-moe", "switch, mlp experts"])
@pytest.mark.parametrize("N", [1, 16, "most"])  # "most": fused_moe.max_tokens
def test_bf16_moe_forward_is_the_eager_bf16_forward(case, N, monkeypatch):
    """An MoE layer's own bf16 inference forward (a prefill's, or one in a stack whose attention is not native) runs
    in one native call over the blocked bf16 copies, rounding where the eager bf16 forward rounds: nearly all
    outputs bit-equal (the rest one rounding apart), the same experts, the routing's fp32 values."""
    moe = moe_model(**MOE_CASES[case]).decoder.layers[0].ffn.to(BF16)
    pack_weights(moe)
    N = fused_moe.max_tokens(moe, BF16) if N == "most" else N
    x = torch.randn(1, N, BASE["d_model"], generator=torch.Generator().manual_seed(N)).to(BF16)
    results = []
    for fused in ("0", "1"):
        monkeypatch.setenv("LLMARCH_FUSED_DECODE", fused)
        spy = forward_spy(monkeypatch)
        with torch.no_grad():
            results.append((moe(x), moe.last_routing[0]))
    assert spy.steps == 1
    (want, want_route), (got, got_route) = results
    assert got.dtype == BF16 and (got == want).float().mean() >= 0.95
    torch.testing.assert_close(got.float(), want.float(), **TOL)
    assert torch.equal(got_route.experts, want_route.experts)
    for name in ("logits", "probs", "weights"):
        torch.testing.assert_close(getattr(got_route, name), getattr(want_route, name), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", sorted(LATENT_CASES))
def test_bf16_latent_steps_are_the_eager_bf16_steps(case, monkeypatch):
    """Latent attention in bf16 layers (DeepSeek-V2 style, a dense then an MoE layer): the absorbed query and the
    value up-projection rounded once, as the eager layer's bf16 batched products round them; bf16 latent and
    rope-key caches. Fewer logits are bit-equal than for grouped-query layers (≥ 80 %): the eager layer's attention
    runs torch's math backend there (q and k each scaled by √scale, another summation order), so its rounded
    output flips more often, and one flip in a row's last layer moves most of that row's logits by an ulp."""
    model = latent_model(**LATENT_CASES[case], n_layers=2).to(BF16)
    pack_weights(model)
    ids = torch.randint(0, 500, (3, 7), generator=torch.Generator().manual_seed(8))
    check_bf16_steps(model, ids, 10, monkeypatch, exact=0.8)


def test_bf16_rounds_where_the_eager_step_rounds(monkeypatch):
    """The same steps computed without the bf16 roundings (the fp32 model of the bf16 weights) differ from the
    eager bf16 steps far more than the native bf16 ones do: the roundings are what makes them bit-equal."""
    model = bf16_model(n_layers=3)
    ids = torch.randint(0, BASE["vocab_size"], (2, 6), generator=torch.Generator().manual_seed(4))
    want = steps(model, ids, 6, False, monkeypatch)[0]
    got = steps(model, ids, 6, True, monkeypatch)[0]
    wide = steps(model.float(), ids, 6, True, monkeypatch)[0]  # fp32 arithmetic on the same (bf16) values
    assert (wide.bfloat16() == want).float().mean() < 0.8 < 0.95 <= (got == want).float().mean()


@pytest.mark.parametrize("case", ["gqa", "bloom style"])
def test_bf16_padded_batches_and_long_generation(case, monkeypatch):
    model = bf16_model(**CASES[case])
    ids = torch.randint(0, BASE["vocab_size"], (3, 6), generator=torch.Generator().manual_seed(5))
    mask = torch.tensor([[0, 0, 0, 1, 1, 1], [1, 1, 1, 1, 1, 1], [0, 1, 1, 0, 1, 1]])
    want, got, spy = generate_both(model, ids, 40, monkeypatch, attention_mask=mask)
    assert torch.equal(got, want) and spy.steps == 39


def test_bf16_stands_aside_where_the_eager_step_computes_otherwise(monkeypatch):
    ids = torch.randint(0, BASE["vocab_size"], (2, 4), generator=torch.Generator().manual_seed(6))
    model = bf16_model()
    spy = Spy(monkeypatch)
    steps(model, ids, 2, True, monkeypatch)
    assert spy.steps == 2  # the baseline: these steps qualify
    monkeypatch.setattr(widened, "ROUTE", False)  # eager bf16 then runs torch's bf16 kernels
    monkeypatch.setattr(dense, "ONEDNN_BF16", False)
    steps(model, ids, 2, True, monkeypatch)
    assert spy.steps == 2
    monkeypatch.undo()
    spy = Spy(monkeypatch)
    with torch.autocast("cpu", dtype=BF16):
        steps(model, ids, 2, True, monkeypatch)
    unpack_weights(model)  # no blocked bf16 copies
    steps(model, ids, 2, True, monkeypatch)
    assert spy.steps == 0


def test_one_stack_switches_between_fp32_and_bf16_plans(monkeypatch):
    """A plan is made for the activations' dtype; converting the model makes and serves the other one."""
    model = model_for()
    pack_weights(model)
    ids = torch.randint(0, BASE["vocab_size"], (1, 5), generator=torch.Generator().manual_seed(7))
    spy = Spy(monkeypatch)
    steps(model, ids, 3, True, monkeypatch)
    assert fused_decode._PLANS[model.decoder].dtype == torch.float32
    model.to(BF16)
    pack_weights(model)
    check_bf16_steps(model, ids, 3, monkeypatch)
    assert fused_decode._PLANS[model.decoder].dtype == BF16 and spy.steps == 6


def test_bf16_two_threads_and_the_threaded_attention(monkeypatch):
    """Two OpenMP threads over a bf16 cache: 2 rows x 4 heads x 520 keys x 64 dims, past the kernel's 2^18
    threshold, so attention splits its heads."""
    model = bf16_model(n_layers=1, d_model=256, d_ff=64)
    ids = torch.randint(0, BASE["vocab_size"], (2, 512), generator=torch.Generator().manual_seed(6))
    with num_threads(2):
        check_bf16_steps(model, ids, 8, monkeypatch)
