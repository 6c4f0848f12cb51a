"""Full-model parity with transformers' SwitchTransformersForConditionalGeneration (T5 v1.0 + top-1 experts on
layers 1 and 3 of each 4-layer stack): logits given decoder inputs on a right-padded encoder batch, greedy
generation token for token, save round trip, and the switch-base-8 preset against transformers' own count.

Capacity: both sides count an expert's capacity per sequence over the tokens of one forward call, pads included,
in token order, so dropping is the same computation. The "drop" case runs with expert_capacity 2 (tokens really
are dropped in the encoder and in the decoder's teacher-forced pass; checked) and the "dropless" case with a
capacity no sequence reaches. Layer-level dropping parity: tests/test_hf_moe.py::test_switch_sparse_mlp_matches_hf.
"""
from __future__ import annotations

import pytest
import torch
import transformers

import llmarch
from llmarch.hf.io import family
from llmarch.nn import router_stats
from tests.hf_util import assert_same_weights, assert_seq2seq_greedy_matches, make_hf_model
from tests.test_hf_seq2seq import compare_logits, source_batch

SMALL = dict(vocab_size=211, d_model=48, n_heads=4, head_dim=12, d_ff=96, n_layers=4, dropout=0.0,
             attn_dropout=0.0)
CASES = {"drop": 2, "dropless": 64}  # expert_capacity
CLS = "SwitchTransformersForConditionalGeneration"




def config(capacity: int) -> llmarch.ModelConfig:
    base = llmarch.preset("switch-tiny")
    return base.replace(**SMALL, moe=dict(jitter=0.0, expert_capacity=capacity))


def make_pair(cfg, tmp, **init):
    hf_model, path = make_hf_model(cfg, "switch_transformers", tmp, model_class=CLS, **init)
    return hf_model.eval(), llmarch.hf.load(path).eval()


@pytest.fixture(params=sorted(CASES), scope="module")
def pair(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(request.param)
    cfg = config(CASES[request.param])
    return (request.param, cfg, *make_pair(cfg, tmp), tmp)


def test_config_round_trips(pair):
    _, cfg, hf_model, ours, _ = pair
    assert ours.config == cfg
    assert [type(b.layer[-1].mlp).__name__ for b in hf_model.encoder.block] == \
        ["SwitchTransformersDenseActDense", "SwitchTransformersSparseMLP"] * 2
    assert [cfg.moe.is_moe_layer(i) for i in range(4)] == [False, True, False, True]


def test_logits_match_given_decoder_inputs(pair):
    name, cfg, hf_model, ours, _ = pair
    compare_logits(name, cfg, hf_model, ours)
    dropped = [s["dropped_fraction"] for s in router_stats(ours)]
    assert len(dropped) == 4  # two sparse layers per stack
    if name == "drop":
        assert min(dropped) > 0, f"capacity 2 should drop tokens in every sparse layer: {dropped}"
    else:
        assert max(dropped) == 0


def test_greedy_generation_matches_hf(pair):
    name, cfg, _, _, tmp = pair
    # larger weights than transformers' init: otherwise these tiny models echo their last token
    hf_model, ours = make_pair(cfg, tmp / "generation", initializer_factor=3.0)
    ids, mask = source_batch(cfg, lengths=(9, 4), seed=3)
    assert_seq2seq_greedy_matches(name, cfg, hf_model, ours, ids, mask)


def test_save_reloads_in_transformers(pair):
    name, cfg, _, ours, tmp = pair
    out = llmarch.hf.save(ours, tmp / "saved")
    reloaded = getattr(transformers, CLS).from_pretrained(out, dtype=torch.float32).eval()
    assert reloaded.config.model_type == "switch_transformers"
    compare_logits(name + "-saved", cfg, reloaded, ours)
    again = llmarch.hf.load(out)
    assert again.config == cfg
    assert_same_weights(ours, again)


def test_switch_base_8_counts_equal_transformers():
    """619,339,008 parameters (the hub lists 619M), counted by transformers on the translated config."""
    cfg = llmarch.preset("switch-base-8")
    hf = family("switch_transformers").from_config(cfg)
    hf_cfg = transformers.SwitchTransformersConfig(**{k: v for k, v in hf.items() if k != "model_type"})
    assert (hf_cfg.encoder_sparse_step, hf_cfg.decoder_sparse_step, hf_cfg.d_ff, hf_cfg.expert_capacity) == \
        (2, 2, 3072, 64)
    with torch.device("meta"):
        theirs = getattr(transformers, CLS)(hf_cfg)
    ours = llmarch.build(cfg, device="meta")
    n = sum(p.numel() for p in ours.parameters())
    assert n == sum(p.numel() for p in theirs.parameters()) == 619_339_008


def test_t5_and_switch_refuse_each_other(tmp_path):
    switch = llmarch.build(config(4))
    with pytest.raises(ValueError, match="cannot save as 't5'.*switch_transformers"):
        llmarch.hf.save(switch, tmp_path / "a", model_type="t5")
    assert llmarch.hf.save(switch, tmp_path / "b").joinpath("config.json").read_text().count("switch_transformers")
    with pytest.raises(ValueError, match="cannot save as 'switch_transformers'.*needs ffn='moe'"):
        llmarch.hf.save(llmarch.build(llmarch.preset("t5-tiny")), tmp_path / "c", model_type="switch_transformers")
    # an explicit encoder/decoder_sparse_step wins over num_sparse_*_layers in transformers, so any schedule saves
    odd = config(4).replace(n_layers=3)
    saved = llmarch.hf.save(llmarch.build(odd), tmp_path / "d", model_type="switch_transformers")
    assert llmarch.hf.config_from_hf(saved).moe == odd.moe
