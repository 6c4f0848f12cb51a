"""Parity with transformers for the encoder-decoder families: T5 v1.0 (tied, rescaled head, ReLU FFN), T5 v1.1
(gated GELU, untied head) and Marian (the post-norm sinusoidal 2017 Transformer): logits given decoder inputs with
a padded encoder batch, greedy generation token for token, save round trips."""
from __future__ import annotations

import pytest
import torch
import transformers

import llmarch
from tests.hf_util import TOL, assert_same_weights, assert_seq2seq_greedy_matches, make_hf_model



SMALL = dict(vocab_size=211, d_model=48, n_heads=4, d_ff=96, dropout=0.0, attn_dropout=0.0)
# Generation runs on larger weights: at transformers' default init these tiny models echo their last token, which
# would make generation parity weak. Logits are compared at the default init, where fp32 rounding stays far below
# the tolerance (with T5's unscaled scores, larger weights make transformers' own fp32-vs-fp64 error reach 1e-2).
GENERATION_INIT = {"t5-v1.0": dict(initializer_factor=3.0), "marian": dict(init_std=0.2)}
CASES = {  # name: (model_type, transformers class, config)
    "t5-v1.0": ("t5", "T5ForConditionalGeneration", llmarch.preset("t5-tiny").replace(
        **SMALL, head_dim=12, n_layers=2)),  # (transformers generate breaks on unequal T5 stacks)
    "t5-v1.1": ("t5", "T5ForConditionalGeneration", llmarch.preset("t5-v1.1-tiny").replace(
        **SMALL, head_dim=16, n_layers=2)),
    "marian": ("marian", "MarianMTModel", llmarch.preset("transformer-tiny").replace(
        **SMALL, n_layers=2, n_decoder_layers=3, norm_eps=1e-5, position="sinusoidal_halves", qkv_bias=True,
        out_bias=True, head_bias=True, activation="silu", max_seq_len=64, pad_token_id=210, eos_token_id=0,
        decoder_start_token_id=210)),
}


def source_batch(cfg, lengths=(11, 6, 3), seed: int = 1):
    """Right-padded encoder ids [B, S] and mask (the convention of these tokenizers)."""
    g = torch.Generator().manual_seed(seed)
    S = max(lengths)
    ids = torch.randint(2, cfg.vocab_size - 1, (len(lengths), S), generator=g)
    mask = torch.zeros(len(lengths), S, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    return ids.masked_fill(mask == 0, cfg.pad_token_id), mask


def make_pair(name, tmp, **init):
    model_type, cls, cfg = CASES[name]
    hf_model, path = make_hf_model(cfg, model_type, tmp, model_class=cls, **init)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        if not cfg.tie_embeddings:  # transformers builds T5 with the head tied; give it its own weights
            hf_model.lm_head.weight = torch.nn.Parameter(torch.randn(hf_model.lm_head.weight.shape, generator=g))
        if hasattr(hf_model, "final_logits_bias"):  # a buffer, so make_hf_model left it at zero
            hf_model.final_logits_bias.copy_(torch.randn(hf_model.final_logits_bias.shape, generator=g) * 0.1)
    hf_model.save_pretrained(path)
    return model_type, cls, cfg, hf_model.eval(), llmarch.hf.load(path).eval()


@pytest.fixture(params=sorted(CASES), scope="module")
def pair(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(request.param)
    return (request.param, *make_pair(request.param, tmp), tmp)


def compare_logits(name, cfg, hf_model, ours):
    ids, mask = source_batch(cfg)
    g = torch.Generator().manual_seed(2)
    dec = torch.randint(1, cfg.vocab_size, (ids.shape[0], 7), generator=g)
    dec[:, 0] = cfg.decoder_start_token_id
    with torch.no_grad():
        mine = ours(ids, attention_mask=mask, decoder_input_ids=dec)
        theirs = hf_model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec)
    enc = (mine.encoder_hidden_states - theirs.encoder_last_hidden_state)[mask.bool()].abs().max().item()
    diff = (mine.logits - theirs.logits).abs().max().item()
    assert enc <= TOL[torch.float32], f"{name}: encoder outputs differ by {enc:.3g}"
    assert diff <= TOL[torch.float32], f"{name}: logits differ by {diff:.3g}"


def test_config_round_trips(pair):
    _, _, _, cfg, _, ours, _ = pair
    assert ours.config == cfg


def test_logits_match_given_decoder_inputs(pair):
    name, _, _, cfg, hf_model, ours, _ = pair
    compare_logits(name, cfg, hf_model, ours)


def test_greedy_generation_matches_hf(pair):
    name, _, _, cfg, hf_model, ours, tmp = pair
    if name in GENERATION_INIT:
        _, _, _, hf_model, ours = make_pair(name, tmp / "generation", **GENERATION_INIT[name])
    ids, mask = source_batch(cfg, lengths=(9, 4), seed=3)
    assert_seq2seq_greedy_matches(name, cfg, hf_model, ours, ids, mask)


def test_save_reloads_in_transformers(pair):
    name, model_type, cls, cfg, _, ours, tmp = pair
    out = llmarch.hf.save(ours, tmp / "saved")
    reloaded = getattr(transformers, cls).from_pretrained(out, dtype=torch.float32).eval()
    assert reloaded.config.model_type == model_type
    compare_logits(name + "-saved", cfg, reloaded, ours)
    again = llmarch.hf.load(out)
    assert again.config == cfg
    assert_same_weights(ours, again)


def test_t5_buckets_match_reference():
    """Our bucket rule against transformers' on every distance up to past max_distance, both directions."""
    from transformers.models.t5.modeling_t5 import T5Attention

    from llmarch.nn.position import relative_buckets

    rel = torch.arange(-300, 301)[None, :]
    for bidirectional in (True, False):
        for n, dist in ((32, 128), (8, 20)):
            ref = T5Attention._relative_position_bucket(rel, bidirectional=bidirectional, num_buckets=n,
                                                        max_distance=dist)
            assert torch.equal(relative_buckets(rel, bidirectional, n, dist), ref)


def test_sinusoid_halves_match_marian_table():
    from transformers.models.marian.modeling_marian import MarianSinusoidalPositionalEmbedding

    from llmarch.nn.position import POSITIONS

    for dim in (48, 7):
        table = MarianSinusoidalPositionalEmbedding(300, dim).create_weight()
        ours = POSITIONS["sinusoidal_halves"](d_model=dim).embed(torch.arange(300)[None])[0]
        assert (ours - table).abs().max().item() < 1e-6
