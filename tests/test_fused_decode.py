"""llmarch.nn.fused_decode: a decode step with every decoder layer in one native call (llmarch.native.decode).
Held to the eager layers it replaces: per-step logits and the cache it leaves behind, greedy tokens, across
attention shapes (MHA, GQA, MQA, biases, sliding window, no rotation, scaled RoPE, ALiBi), batch sizes, a cache that
outgrows its buffers, and int8 weights; a spy checks that the fused path ran where it should and stood aside
everywhere else (gradients, training, padding, hooks, swapped modules, stale or dropped packed copies)."""
from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch

import llmarch
from llmarch import native
from llmarch.infer.layout import pack_weights, unpack_weights
from llmarch.infer.quantize import quantize
from llmarch.native import decode as native_decode
from llmarch.nn import dense
from llmarch.rope_config import RopeConfig

from tests.decode_util import Spy, check_steps, generate_both, num_threads

pytestmark = pytest.mark.skipif(native.library("decode") is None,
                                reason="no x86-64 CPU with AVX2 or no C compiler: the native kernels cannot be built")

BASE = dict(vocab_size=96, d_model=48, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=40, max_seq_len=600)
CASES = {
    "gqa": {},
    "mha": dict(n_kv_heads=4),
    "mqa": dict(n_kv_heads=1),
    "biases": dict(qkv_bias=True, out_bias=True, ffn_bias=True),
    "sliding": dict(pattern=("sliding",), window=5),
    "learned positions": dict(position="learned"),
    "llama3 rope": dict(rope=RopeConfig(theta=500000.0, scaling="llama3", factor=8.0, original_max_seq_len=64)),
    "scaled, odd head": dict(d_model=40, n_heads=4, n_kv_heads=2, attn_scale=0.3),
    "gpt-2 style": dict(norm="layernorm", norm_bias=True, ffn="mlp", activation="gelu_tanh", position="learned",
                        n_kv_heads=4, qkv_bias=True, out_bias=True, ffn_bias=True),
    "layernorm, no bias": dict(norm="layernorm", norm_bias=False),
    "geglu": dict(activation="gelu_tanh"),
    "mlp, erf gelu": dict(ffn="mlp", activation="gelu", d_ff=37),
    "mlp, relu": dict(ffn="mlp", activation="relu"),
    "bloom style": dict(norm="layernorm", norm_bias=True, ffn="mlp", activation="gelu_tanh", position="alibi",
                        n_kv_heads=4, qkv_bias=True, out_bias=True, ffn_bias=True, embed_norm=True),
    "alibi, sliding, gqa": dict(position="alibi", pattern=("sliding",), window=5, n_heads=6, d_model=48),
}


def model_for(seed=0, **over):
    torch.manual_seed(seed)
    model = llmarch.build(llmarch.preset("llama-tiny").replace(**{**BASE, **over})).eval()
    with torch.no_grad():  # gains and biases away from their init values, so a mix-up shows
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.3 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("B", [1, 3])
def test_fused_steps_are_the_eager_steps(case, B, monkeypatch):
    model = model_for(**CASES[case])
    pack_weights(model)
    ids = torch.randint(0, BASE["vocab_size"], (B, 7), generator=torch.Generator().manual_seed(B))
    got_cache = check_steps(model, ids, 12, monkeypatch)
    if case == "sliding":  # the window trimmed the cache, and the fused steps kept what the eager ones kept
        assert got_cache.k[0].shape[2] == 4


def test_long_generation_outgrows_the_buffers_and_matches(monkeypatch):
    """300 new tokens: the cache's buffers are re-made along the way (spare slots run out) and attention runs over
    hundreds of keys."""
    model = model_for(n_layers=1)
    pack_weights(model)
    ids = torch.randint(0, BASE["vocab_size"], (2, 3), generator=torch.Generator().manual_seed(0))
    want, got, spy = generate_both(model, ids, 300, monkeypatch)
    assert spy.steps == 299 and torch.equal(got, want)


def test_two_threads_and_the_threaded_attention_match(monkeypatch):
    """Two OpenMP threads: the products split their blocks, and attention over 2 x 4 heads x 520 keys x 64 dims
    (past the kernel's 2^18 threshold) splits its heads."""
    model = model_for(n_layers=1, d_model=256, d_ff=64)
    pack_weights(model)
    ids = torch.randint(0, BASE["vocab_size"], (2, 512), generator=torch.Generator().manual_seed(6))
    with num_threads(2):
        check_steps(model, ids, 8, monkeypatch)


@pytest.mark.parametrize("case", ["gqa", "sliding", "learned positions", "bloom style"])
def test_padded_batches_match(case, monkeypatch):
    """Rows of different lengths, left-padded: each row attends to its own real keys only; a mask with a hole in
    the middle, a new token masked out, and a row with no real key at all (it then sees every key, as the eager
    mask has it)."""
    model = model_for(**CASES[case])
    pack_weights(model)
    ids = torch.randint(0, BASE["vocab_size"], (3, 6), generator=torch.Generator().manual_seed(5))
    mask = torch.tensor([[0, 0, 0, 1, 1, 1], [1, 1, 1, 1, 1, 1], [0, 1, 1, 0, 1, 1]])
    want, got, spy = generate_both(model, ids, 9, monkeypatch, attention_mask=mask)
    assert torch.equal(got, want) and spy.steps == 8
    results = []
    ids, mask = torch.cat([ids, ids[:1]]), torch.cat([mask, torch.zeros(1, 6, dtype=mask.dtype)])
    for fused in ("0", "1"):
        monkeypatch.setenv("LLMARCH_FUSED_DECODE", fused)
        cache, m = model.new_cache(), mask
        with torch.no_grad():
            model(ids, attention_mask=m, cache=cache)
            out = []
            for i in range(6):
                m = torch.cat([m, torch.tensor([[1], [1], [0 if i == 2 else 1], [0]])], 1)
                out.append(model(ids[:, i:i + 1], attention_mask=m, cache=cache).logits)
        results.append(torch.cat(out, 1))
    assert spy.steps == 14
    torch.testing.assert_close(results[1], results[0], rtol=1e-5, atol=1e-5)



@pytest.mark.parametrize("activations", ["fp32", "int8"])
def test_int8_weights_run_fused_and_match(activations, monkeypatch):
    """int8 weights with fp32 activations (gemv.c) and with int8 activations (w8a8.c): the native layer's products
    are the eager Int8Linear's."""
    model = quantize(model_for(qkv_bias=True), "int8", activations=activations)
    ids = torch.randint(0, BASE["vocab_size"], (2, 5), generator=torch.Generator().manual_seed(1))
    check_steps(model, ids, 10, monkeypatch)


def test_generate_takes_the_fused_path_once_weights_are_packed(monkeypatch):
    model = model_for()
    ids = torch.randint(0, BASE["vocab_size"], (1, 4), generator=torch.Generator().manual_seed(2))
    spy = Spy(monkeypatch)
    first = llmarch.generate(model, ids, 6)  # a short first call: no packing, so no native layers
    assert spy.steps == 0
    again = llmarch.generate(model, ids, 6)  # the same weights again: generate packs them
    assert spy.steps == 5 and torch.equal(first, again)


def _one_step(model, monkeypatch, grad=False, mask=None):
    monkeypatch.setenv("LLMARCH_FUSED_DECODE", "1")
    ids = torch.randint(0, BASE["vocab_size"], (2, 4), generator=torch.Generator().manual_seed(3))
    cache = model.new_cache()
    with torch.set_grad_enabled(grad):
        model(ids, cache=cache, attention_mask=None if mask is None else mask[:, :4])
        return model(ids[:, -1:], cache=cache, attention_mask=mask).logits


def test_fused_path_stands_aside_where_it_does_not_serve(monkeypatch):
    model = model_for()
    pack_weights(model)
    spy = Spy(monkeypatch)
    _one_step(model, monkeypatch)
    assert spy.steps == 1  # the baseline: this step qualifies
    _one_step(model, monkeypatch, grad=True)  # gradients wanted
    model.train()
    _one_step(model, monkeypatch)
    model.eval()
    monkeypatch.setenv("LLMARCH_FUSED_DECODE", "0")
    with torch.no_grad():
        model(torch.ones(1, 3, dtype=torch.long), cache=model.new_cache())
    assert spy.steps == 1


def test_hooks_swapped_modules_and_changed_weights_are_seen(monkeypatch):
    model = model_for()
    pack_weights(model)
    spy = Spy(monkeypatch)
    want = _one_step(model, monkeypatch)
    assert spy.steps == 1
    seen = []
    handle = model.decoder.layers[1].ffn.down.register_forward_hook(lambda *a: seen.append(1))
    torch.testing.assert_close(_one_step(model, monkeypatch), want, rtol=1e-5, atol=1e-5)
    assert seen == [1, 1] and spy.steps == 1  # the hook ran, in the eager layers (prefill and step)
    handle.remove()
    _one_step(model, monkeypatch)
    assert spy.steps == 2
    attn = model.decoder.layers[0].attn
    plain = attn.out
    attn.out = copy.deepcopy(plain)  # a different module (as an adapter wrapper would be): no packed copy
    _one_step(model, monkeypatch)
    assert spy.steps == 2
    attn.out = plain
    _one_step(model, monkeypatch)
    assert spy.steps == 3
    with torch.no_grad():
        plain.weight.mul_(2)  # in place: the packed copy is stale, the eager path sees the new weight
    edited = _one_step(model, monkeypatch)
    assert spy.steps == 3 and not torch.allclose(edited, want)
    pack_weights(model)  # packed again: fused, with the new weight
    torch.testing.assert_close(_one_step(model, monkeypatch), edited, rtol=1e-5, atol=1e-5)
    assert spy.steps == 4
    copy_of = weakref.ref(dense.packed(plain.weight))
    unpack_weights(model)
    gc.collect()
    assert copy_of() is None  # the plan does not keep dropped copies alive
    _one_step(model, monkeypatch)
    assert spy.steps == 4


def test_layers_it_does_not_compute_keep_the_eager_path(monkeypatch):
    spy = Spy(monkeypatch)
    for over in (dict(norm="rmsnorm_zero"), dict(activation="quick_gelu"), dict(norm_placement="post"),
                 dict(rope=RopeConfig(fraction=0.5)), dict(position="relative")):
        model = model_for(**over)
        pack_weights(model)
        _one_step(model, monkeypatch)
    assert spy.steps == 0


def test_kernel_passes_its_self_check():
    assert native_decode.available()


@pytest.mark.parametrize("int8", [False, True])
def test_a_model_made_under_inference_mode_packs_and_decodes(int8, monkeypatch):
    """Inference tensors keep no version counter (reading it raised in generate and pack_weights); their copies
    are made and used all the same."""
    ids = torch.randint(0, BASE["vocab_size"], (2, 4), generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        model = model_for(seed=2)
        model = quantize(model, "int8") if int8 else model
        pack_weights(model)
        want, got, spy = generate_both(model, ids, 8, monkeypatch)
    assert spy.steps == 7 and torch.equal(got, want)
