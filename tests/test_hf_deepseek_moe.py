"""Parity with transformers' DeepseekV2ForCausalLM with MoE layers (first layer dense, then routed + shared
experts): greedy and group-limited routing, a routed weight scale; logits on a padded batch, greedy generation,
save round trip, and the deepseek-v2-lite preset against transformers' own parameter count."""
from __future__ import annotations

import json

import pytest
import torch
import transformers

import llmarch
from llmarch import native
from llmarch.hf.io import family
from llmarch.infer.layout import pack_weights, unpack_weights
from llmarch.nn import router_stats
from tests.decode_util import Spy
from tests.hf_util import assert_close_at, assert_same_weights, hf_logits, make_hf_model, padded_batch

BASE = dict(vocab_size=211, d_model=48, n_layers=3, n_heads=4, d_ff=96, max_seq_len=128)
MLA = dict(kv_lora_rank=12, q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=6, v_head_dim=10)
TINY = llmarch.preset("deepseek-v2-tiny")
CASES = {
    "greedy-scaled": TINY.replace(**BASE, mla=MLA, moe=dict(n_experts=6, top_k=2, d_ff=32, n_shared=2,
                                                            routed_scale=2.5)),
    "group-limited": TINY.replace(**BASE, mla=dict(MLA, q_lora_rank=20), moe=dict(
        n_experts=8, top_k=3, d_ff=24, n_shared=1, n_groups=4, topk_groups=2)),
}




@pytest.fixture(params=sorted(CASES), scope="module")
def pair(request, tmp_path_factory):
    cfg = CASES[request.param]
    tmp = tmp_path_factory.mktemp(request.param)
    hf_model, path = make_hf_model(cfg, "deepseek_v2", tmp)
    with torch.no_grad():  # transformers initialises routers with std 0.02: near ties; widen them
        for name, p in hf_model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.normal_(0.0, 0.5)
    hf_model.save_pretrained(path)
    return request.param, cfg, hf_model, llmarch.hf.load(path).eval(), tmp


def test_config_round_trips(pair):
    _, cfg, hf_model, ours, _ = pair
    assert ours.config == cfg
    assert [type(layer.mlp).__name__ for layer in hf_model.model.layers] == \
        ["DeepseekV2MLP", "DeepseekV2Moe", "DeepseekV2Moe"]


def test_logits_match_on_padded_batch(pair):
    name, cfg, hf_model, ours, _ = pair
    ids, mask = padded_batch(cfg.vocab_size, lengths=(14, 9, 3))
    with torch.no_grad():
        mine = ours(ids, attention_mask=mask).logits
    assert_close_at(mine, hf_logits(hf_model, ids, mask), mask)
    loads = [s["tokens_per_expert"] for s in router_stats(ours)]
    assert len(loads) == 2 and all(sum(x > 0 for x in load) >= 2 for load in loads), loads


def test_greedy_generation_matches(pair):
    name, cfg, hf_model, ours, _ = pair
    ids, mask = padded_batch(cfg.vocab_size, lengths=(6, 4), seed=3)
    hf_out = hf_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=16, do_sample=False,
                               pad_token_id=0, eos_token_id=None)
    mine = llmarch.generate(ours, ids, attention_mask=mask, max_new_tokens=16)
    assert torch.equal(mine, hf_out), f"{name}: generations differ\n{mine}\n{hf_out}"
    assert len(set(mine[:, 6:].flatten().tolist())) > 2, f"{name}: degenerate generations: {mine}"


@pytest.mark.skipif(native.library("decode") is None,
                    reason="no x86-64 CPU with AVX2 or no C compiler: the native kernels cannot be built")
def test_greedy_generation_matches_on_native_decode_layers(pair, monkeypatch):
    """With packed weights every decode step runs latent attention and the MoE layers in native calls
    (llmarch.nn.fused_decode): still transformers' tokens."""
    name, cfg, hf_model, ours, _ = pair
    ids, mask = padded_batch(cfg.vocab_size, lengths=(6, 4), seed=3)
    hf_out = hf_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=16, do_sample=False,
                               pad_token_id=0, eos_token_id=None)
    pack_weights(ours)
    spy = Spy(monkeypatch)
    try:
        mine = llmarch.generate(ours, ids, attention_mask=mask, max_new_tokens=16)
    finally:
        unpack_weights(ours)  # the module-scoped model goes back as it was
    assert spy.steps == 15 and torch.equal(mine, hf_out), f"{name}: generations differ\n{mine}\n{hf_out}"


def test_save_reloads_in_transformers(pair):
    _, cfg, _, ours, tmp = pair
    out = llmarch.hf.save(ours, tmp / "saved")
    assert json.loads((out / "config.json").read_text())["model_type"] == "deepseek_v2"
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids, mask = padded_batch(cfg.vocab_size, lengths=(10, 5))
    with torch.no_grad():
        mine = ours(ids, attention_mask=mask).logits
    assert_close_at(mine, hf_logits(reloaded, ids, mask), mask)
    again = llmarch.hf.load(out)
    assert again.config == cfg
    assert_same_weights(ours, again)


def test_deepseek_v2_lite_counts_equal_transformers():
    """15,706,484,224 parameters: the model card's 15.7B, counted by transformers on the translated config."""
    cfg = llmarch.preset("deepseek-v2-lite")
    hf = family("deepseek_v2").from_config(cfg)
    hf_cfg = transformers.DeepseekV2Config(**{k: v for k, v in hf.items() if k != "model_type"})
    assert (hf_cfg.n_routed_experts, hf_cfg.num_experts_per_tok, hf_cfg.n_shared_experts,
            hf_cfg.moe_intermediate_size, hf_cfg.first_k_dense_replace) == (64, 6, 2, 1408, 1)
    with torch.device("meta"):
        theirs = transformers.DeepseekV2ForCausalLM(hf_cfg)
    n = sum(p.numel() for p in llmarch.build(cfg, device="meta").parameters())
    assert n == sum(p.numel() for p in theirs.parameters()) == 15_706_484_224


@pytest.mark.parametrize("field,value,match", [("norm_topk_prob", True, "norm_topk_prob=True is not supported"),
                                               ("moe_layer_freq", 2, "moe_layer_freq=2 is not supported"),
                                               ("topk_method", "noaux_tc", "topk_method='noaux_tc'")])
def test_ambiguous_moe_settings_are_refused(tmp_path, field, value, match):
    hf = family("deepseek_v2").from_config(CASES["greedy-scaled"])
    hf[field] = value
    (tmp_path / "config.json").write_text(json.dumps(hf))
    with pytest.raises(ValueError, match=match):
        llmarch.hf.config_from_hf(tmp_path)


def test_group_settings_name_the_field():
    with pytest.raises(ValueError, match="moe.n_groups: 3 groups do not divide n_experts=8"):
        TINY.replace(moe=dict(n_groups=3, topk_groups=1))
    with pytest.raises(ValueError, match="moe.top_k: 3 is more than"):
        TINY.replace(moe=dict(n_groups=4, topk_groups=1, top_k=3))
    with pytest.raises(ValueError, match="moe.routed_scale"):
        TINY.replace(moe=dict(routed_scale=0.0))
    with pytest.raises(ValueError, match="cannot save as 'mixtral'.*routed_scale"):
        llmarch.hf.save(llmarch.build(llmarch.preset("mixtral-tiny").replace(moe=dict(routed_scale=2.0))),
                        "/nonexistent/never-written", model_type="mixtral")
