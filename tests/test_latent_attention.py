"""Multi-head latent attention: parity with transformers' DeepSeek-V2/V3 (all-dense tiny configs; DeepSeek-V2 with
MoE layers: tests/test_hf_deepseek_moe.py), the compressed cache, cached decode == recomputation, absorbed == naive."""
from __future__ import annotations

import pytest
import torch

import llmarch
from llmarch.nn.cache import KVCache, LatentCache
from llmarch.nn.latent_attention import LatentAttention
from tests.hf_util import (assert_close_at, causal_pair, check_config_round_trip, check_greedy_generation,
                           check_padded_logits, check_save_reloads, make_hf_model, padded_batch)

BASE = dict(vocab_size=211, d_model=48, n_layers=2, n_heads=4, d_ff=96, max_seq_len=128)
TINY = llmarch.preset("deepseek-v2-tiny").replace(ffn="glu", moe=None)  # attention under test: dense FFNs
CASES = {
    "v2-plain-q": ("deepseek_v2", TINY.replace(**BASE, mla=dict(kv_lora_rank=12, q_lora_rank=None,
                                                                qk_rope_head_dim=8, qk_nope_head_dim=6,
                                                                v_head_dim=10))),
    "v2-qlora-bias-yarn": ("deepseek_v2", TINY.replace(
        **BASE, qkv_bias=True, out_bias=True, rope=dict(scaling="yarn", factor=4.0, original_max_seq_len=32),
        mla=dict(kv_lora_rank=16, q_lora_rank=20, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
                 mscale_all_dim=0.7))),
    "v3-qlora": ("deepseek_v3", TINY.replace(**BASE, mla=dict(kv_lora_rank=16, q_lora_rank=20, qk_rope_head_dim=8,
                                                             qk_nope_head_dim=8, v_head_dim=12))),
}


@pytest.fixture(params=sorted(CASES), scope="module")
def pair(request, tmp_path_factory):
    model_type, cfg = CASES[request.param]
    return causal_pair(request.param, model_type, cfg, tmp_path_factory.mktemp(request.param))


def test_config_round_trips(pair):
    check_config_round_trip(pair)


def test_logits_match_on_padded_batch(pair):
    check_padded_logits(pair)


def test_greedy_generation_matches(pair):
    check_greedy_generation(pair, new_tokens=16)


def test_save_reloads_in_transformers(pair):
    check_save_reloads(pair, explicit_type=True)


def test_v3_moe_checkpoints_are_refused_clearly(tmp_path):
    cfg = CASES["v3-qlora"][1]
    _, path = make_hf_model(cfg, "deepseek_v3", tmp_path)
    import json

    hf = json.loads((path / "config.json").read_text())
    hf["first_k_dense_replace"] = 1
    (path / "config.json").write_text(json.dumps(hf))
    with pytest.raises(ValueError, match="deepseek_v3 MoE layers .* are not supported"):
        llmarch.hf.load(path)


def _model(absorb: str, **mla):
    cfg = TINY.replace(**BASE, mla=dict(kv_lora_rank=12, q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=6,
                                        v_head_dim=10, absorb=absorb, **mla))
    torch.manual_seed(0)
    return llmarch.build(cfg).eval()


def test_cache_holds_only_latent_and_rope_key():
    model = _model("decode")
    ids, mask = padded_batch(211, lengths=(9, 5))
    cache = model.new_cache()
    with torch.no_grad():
        model(ids, attention_mask=mask, cache=cache)
    assert isinstance(cache, LatentCache)
    R, Dr = 12, 8
    for i in range(model.config.n_layers):
        assert cache.latent(i).shape == (2, 1, 9, R) and cache.rope_key(i).shape == (2, 1, 9, Dr)
        assert cache.numbers_per_token(i) == R + Dr
    assert cache.nbytes() == model.config.n_layers * 2 * 9 * (R + Dr) * 4


@pytest.mark.parametrize("absorb", ["never", "decode", "always"])
def test_cached_decode_equals_recomputation(absorb):
    model = _model(absorb)
    ids, mask = padded_batch(211, lengths=(12, 7))
    with torch.no_grad():
        full = model(ids, attention_mask=mask).logits
        cache = model.new_cache()
        steps = [model(ids[:, :5], attention_mask=mask[:, :5], cache=cache).logits]
        for t in range(5, 12):
            steps.append(model(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], cache=cache).logits)
    assert_close_at(torch.cat(steps, dim=1), full, mask)


def test_absorbed_path_equals_naive_path(monkeypatch):
    naive, absorbed = _model("never"), _model("always")
    calls = []
    original = LatentAttention._absorbed
    monkeypatch.setattr(LatentAttention, "_absorbed", lambda self, *a: calls.append(1) or original(self, *a))
    ids, mask = padded_batch(211, lengths=(11, 6))
    with torch.no_grad():
        a = naive(ids, attention_mask=mask).logits
        assert not calls
        b = absorbed(ids, attention_mask=mask).logits
    assert len(calls) == absorbed.config.n_layers
    assert_close_at(b, a, mask)


def test_latent_attention_refuses_a_plain_kv_cache():
    model = _model("decode")
    with pytest.raises(ValueError, match="LatentCache"):
        model(torch.zeros(1, 3, dtype=torch.long), cache=KVCache())


def test_bad_mla_settings_name_the_field():
    with pytest.raises(ValueError, match="mla.qk_rope_head_dim"):
        TINY.replace(mla=dict(qk_rope_head_dim=7))
    with pytest.raises(ValueError, match="mla.absorb"):
        TINY.replace(mla=dict(absorb="sometimes"))
