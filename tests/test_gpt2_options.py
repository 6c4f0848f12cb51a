"""GPT-2's two attention options read from config.json, exact against transformers: scale_attn_by_inverse_layer_idx
(scores / (layer + 1)) and reorder_and_upcast_attn (fp32 scores and softmax; transformers' eager path)."""
from __future__ import annotations

import pytest
import torch

import llmarch
from tests.hf_util import TOL, assert_close_at, check_greedy_generation, check_save_reloads, hf_logits, make_hf_model, \
    padded_batch

BASE = dict(vocab_size=211, d_model=48, n_layers=3, n_heads=4, d_ff=96, max_seq_len=128)


def sharpened_pair(cfg, tmp):
    """A random HF GPT-2 whose q/k weights are scaled up, so attention is far from uniform and the score scale
    matters well above the tolerance."""
    hf_model, path = make_hf_model(cfg, "gpt2", tmp)
    with torch.no_grad():
        for block in hf_model.transformer.h:
            block.attn.c_attn.weight[:, : 2 * cfg.d_model] *= 12.0
    hf_model.save_pretrained(path)
    return hf_model, llmarch.hf.load(path).eval()


@pytest.mark.parametrize("option", ["attn_scale_by_layer", "attn_kernel"])
def test_gpt2_attention_options_match_transformers(option, tmp_path):
    change = {"attn_scale_by_layer": True} if option == "attn_scale_by_layer" else {"attn_kernel": "naive"}
    cfg = llmarch.preset("gpt2-tiny").replace(**BASE, **change)
    hf_model, ours = sharpened_pair(cfg, tmp_path)
    assert ours.config == cfg
    assert hf_model.config.scale_attn_by_inverse_layer_idx == cfg.attn_scale_by_layer
    assert hf_model.config.reorder_and_upcast_attn == (cfg.attn_kernel == "naive")
    ids, mask = padded_batch(cfg.vocab_size, lengths=(14, 9, 3))
    with torch.no_grad():
        mine = ours(ids, attention_mask=mask).logits
    theirs = hf_logits(hf_model, ids, mask)
    assert_close_at(mine, theirs, mask)
    pair = ("gpt2-" + option, "gpt2", cfg, hf_model, ours, tmp_path)
    check_greedy_generation(pair)
    check_save_reloads(pair)
    if option == "attn_scale_by_layer":  # the option changes the numbers: without it we would not match
        plain = llmarch.build(cfg.replace(attn_scale_by_layer=False)).eval()
        plain.load_state_dict(ours.state_dict())
        with torch.no_grad():
            other = plain(ids, attention_mask=mask).logits
        assert (other - theirs)[mask.bool()].abs().max() > 2 * TOL[torch.float32]
