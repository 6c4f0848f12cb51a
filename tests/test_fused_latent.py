"""Multi-head latent attention (DeepSeek-V2) in the native decode layer (llmarch.nn.fused_latent, attention.c's
mla_attention). Held to the eager absorbed layers it replaces: per-step logits and the latent / rope-key caches at
1e-5, greedy tokens identical, with and without the query's own latent, biases, a sliding window, no rotation,
yarn-scaled positions, padded batches, a cache that outgrows its buffers, MoE and dense FFN layers, int8 weights;
and standing aside where the eager layer computes another form or must see the call."""
from __future__ import annotations

import dataclasses

import pytest
import torch

import llmarch
from llmarch import native
from llmarch.infer.layout import pack_weights
from llmarch.infer.quantize import quantize
from llmarch.nn import fused_decode
from llmarch.nn.cache import LatentCache

from tests.decode_util import Spy, check_steps, generate_both, num_threads, steps

pytestmark = pytest.mark.skipif(native.library("decode") is None,
                                reason="no x86-64 CPU with AVX2 or no C compiler: the native kernels cannot be built")

MLA = dict(kv_lora_rank=32, q_lora_rank=48, qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=24)
CASES = {
    "deepseek-v2-tiny": {},
    "no query latent, odd widths": dict(mla=dict(kv_lora_rank=36, q_lora_rank=None, qk_rope_head_dim=8,
                                                 qk_nope_head_dim=12, v_head_dim=20)),
    "biases": dict(qkv_bias=True, out_bias=True),
    "sliding": dict(pattern=("sliding",), window=5),
    "no rotation": dict(position="learned"),
    "yarn": dict(rope=dict(theta=10000.0, scaling="yarn", factor=4.0, original_max_seq_len=64),
                 mla=dict(MLA, mscale_all_dim=0.707)),
    "dense ffn, absorbed always": dict(ffn="glu", moe=None, mla=dict(MLA, absorb="always")),
}


def model_for(seed=0, **over):
    torch.manual_seed(seed)
    model = llmarch.build(llmarch.preset("deepseek-v2-tiny").replace(**over)).eval()
    with torch.no_grad():  # gains and biases away from their init values, so a mix-up shows
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.3 * torch.randn_like(p))
    pack_weights(model)
    return model


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("B", [1, 3])
def test_latent_steps_are_the_eager_steps(case, B, monkeypatch):
    model = model_for(**CASES[case])
    ids = torch.randint(0, 500, (B, 7), generator=torch.Generator().manual_seed(B))
    cache = check_steps(model, ids, 10, monkeypatch)
    assert type(cache) is LatentCache
    if case == "sliding":  # the window trimmed the cache, and the fused steps kept what the eager ones kept
        assert cache.k[0].shape[2] == 4


def test_padded_batch_and_a_long_generation(monkeypatch):
    """Left-padded rows (each at its own positions) attend to their own real keys only: logits at 1e-5 over steps
    with a hole in the mask and a masked-out new token; 150 new tokens outgrow the cache's buffers."""
    model = model_for(n_layers=2)
    ids = torch.randint(0, 500, (3, 6), generator=torch.Generator().manual_seed(5))
    mask = torch.tensor([[0, 0, 0, 1, 1, 1], [1, 1, 1, 1, 1, 1], [0, 1, 1, 0, 1, 1]])
    want, got, spy = generate_both(model, ids, 9, monkeypatch, attention_mask=mask)
    assert torch.equal(got, want) and spy.steps == 8
    results = []
    for fused in ("0", "1"):
        monkeypatch.setenv("LLMARCH_FUSED_DECODE", fused)
        cache, m, out = model.new_cache(), mask, []
        with torch.no_grad():
            model(ids, attention_mask=m, cache=cache)
            for i in range(5):
                m = torch.cat([m, torch.tensor([[1], [0 if i == 2 else 1], [1]])], 1)
                out.append(model(ids[:, i:i + 1], attention_mask=m, cache=cache).logits)
        results.append(torch.cat(out, 1))
    assert spy.steps == 13
    torch.testing.assert_close(results[1], results[0], rtol=1e-5, atol=1e-5)
    want, got, spy = generate_both(model, ids[:1], 150, monkeypatch)
    assert torch.equal(got, want) and spy.steps == 149


def test_int8_latent_model(monkeypatch):
    """int8 projections run on the native int8 kernel; kv_up is read through its dequantized copy, as the eager
    absorbed form reads it."""
    model = quantize(model_for(), "int8")
    ids = torch.randint(0, 500, (2, 5), generator=torch.Generator().manual_seed(1))
    check_steps(model, ids, 8, monkeypatch)


def test_latent_layers_stand_aside_where_the_eager_layer_computes_otherwise(monkeypatch):
    ids = torch.randint(0, 500, (2, 4), generator=torch.Generator().manual_seed(2))
    cfg = llmarch.preset("deepseek-v2-tiny")
    naive = llmarch.build(cfg.replace(mla=dataclasses.replace(cfg.mla, absorb="never"))).eval()
    pack_weights(naive)
    spy = Spy(monkeypatch)
    steps(naive, ids, 2, True, monkeypatch)  # the naive form: eager
    model = model_for()
    handle = model.decoder.layers[1].attn.kv_down.register_forward_hook(lambda *a: None)
    steps(model, ids, 2, True, monkeypatch)  # a hook on a projection the eager layer calls
    assert spy.steps == 0
    handle.remove()
    steps(model, ids, 2, True, monkeypatch)
    assert spy.steps == 2
    assert fused_decode._PLANS[model.decoder].latent


def test_two_threads_and_the_threaded_latent_attention_match(monkeypatch):
    """Two OpenMP threads: attention over 2 rows x 4 heads x 520 keys x a latent of 128 (past the kernel's 2^18
    threshold) splits its heads."""
    model = model_for(n_layers=1, ffn="glu", moe=None, mla=dict(MLA, kv_lora_rank=128))
    ids = torch.randint(0, 500, (2, 512), generator=torch.Generator().manual_seed(6))
    with num_threads(2):
        check_steps(model, ids, 8, monkeypatch)
