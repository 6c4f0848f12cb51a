"""Parity with transformers for the decoder families: logits on a padded batch, greedy generation, save round
trip. The HF reference is built from our config by the production translator and loaded with llmarch.hf.load."""
from __future__ import annotations

import pytest
import torch

import llmarch
from llmarch.hf import ConversionError
from tests.hf_util import (assert_close_at, causal_pair, check_config_round_trip, check_greedy_generation,
                           check_padded_logits, check_save_reloads, hf_logits, make_hf_model, padded_batch)

BASE = dict(vocab_size=211, d_model=48, n_layers=3, n_heads=4, d_ff=96, max_seq_len=128)
CASES = {
    "gpt2": ("gpt2", llmarch.preset("gpt2-tiny").replace(**BASE)),
    "llama-gqa": ("llama", llmarch.preset("llama-tiny").replace(**BASE, n_kv_heads=2)),
    "llama-mqa-tied": ("llama", llmarch.preset("llama-tiny").replace(**BASE, n_kv_heads=1, tie_embeddings=True)),
    "llama-linear": ("llama", llmarch.preset("llama-tiny").replace(
        **BASE, n_kv_heads=2, rope=dict(scaling="linear", factor=2.0))),
    "llama-dynamic": ("llama", llmarch.preset("llama-tiny").replace(
        **{**BASE, "max_seq_len": 8}, n_kv_heads=2, rope=dict(scaling="dynamic", factor=2.0))),
    "llama3-scaling": ("llama", llmarch.preset("llama-tiny").replace(
        **BASE, n_kv_heads=2, rope=dict(theta=500000.0, scaling="llama3", factor=8.0, low_freq_factor=1.0,
                                        high_freq_factor=4.0, original_max_seq_len=16))),
    "llama-yarn": ("llama", llmarch.preset("llama-tiny").replace(
        **BASE, n_kv_heads=2, rope=dict(scaling="yarn", factor=4.0, original_max_seq_len=32))),
    "llama-bias-headdim": ("llama", llmarch.preset("llama-tiny").replace(
        **BASE, n_kv_heads=2, head_dim=16, qkv_bias=True, out_bias=True, ffn_bias=True)),
    "mistral-window": ("mistral", llmarch.preset("mistral-tiny").replace(**BASE, n_kv_heads=2, window=5)),
    "qwen2-bias": ("qwen2", llmarch.preset("qwen2-tiny").replace(**BASE, n_kv_heads=2)),
    "qwen2-mixed-window": ("qwen2", llmarch.preset("qwen2-tiny").replace(
        **BASE, n_kv_heads=2, pattern=("dense", "sliding", "sliding"), window=4)),
    "bloom-6-heads": ("bloom", llmarch.preset("bloom-tiny").replace(**{**BASE, "n_heads": 6, "d_ff": 192})),
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
    check_greedy_generation(pair)


def test_save_reloads_in_transformers(pair):
    check_save_reloads(pair)


def test_sharded_checkpoint_loads(tmp_path):
    cfg = CASES["llama-gqa"][1]
    hf_model, _ = make_hf_model(cfg, "llama", tmp_path)
    hf_model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    ids, mask = padded_batch(cfg.vocab_size)
    with torch.no_grad():
        mine = llmarch.hf.load(tmp_path / "sharded")(ids, attention_mask=mask).logits
    assert_close_at(mine, hf_logits(hf_model, ids, mask), mask)


def test_old_style_rope_config_is_read(tmp_path):
    """Older config.json files carry rope_theta + rope_scaling at the top level."""
    import json

    cfg = CASES["llama3-scaling"][1]
    _, path = make_hf_model(cfg, "llama", tmp_path)
    hf = json.loads((path / "config.json").read_text())
    params = hf.pop("rope_parameters")
    hf["rope_theta"] = params.pop("rope_theta")
    hf["rope_scaling"] = {"type" if k == "rope_type" else k: v for k, v in params.items()}
    (path / "config.json").write_text(json.dumps(hf))
    assert llmarch.hf.config_from_hf(path) == cfg


def test_wrong_checkpoint_lists_the_problem(tmp_path):
    cfg = CASES["llama-gqa"][1]
    _, path = make_hf_model(cfg, "llama", tmp_path)
    import json

    hf = json.loads((path / "config.json").read_text())
    hf["num_hidden_layers"] = 4  # the weights have 3
    (path / "config.json").write_text(json.dumps(hf))
    with pytest.raises(ConversionError, match=r"missing from the checkpoint: \['layers.3"):
        llmarch.hf.load(path)


def test_unknown_model_type_is_refused(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "gpt_neox"}')
    with pytest.raises(ValueError, match="model_type 'gpt_neox' is not supported"):
        llmarch.hf.load(tmp_path)


def test_pickled_weights_are_never_loaded(tmp_path):
    cfg = CASES["gpt2"][1]
    _, path = make_hf_model(cfg, "gpt2", tmp_path)
    (path / "model.safetensors").rename(path / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="pickled weights are never loaded"):
        llmarch.hf.load(path)
