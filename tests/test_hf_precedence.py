"""Issue 14, item 6: config.json is read with transformers' own precedence rules (its configuration classes'
code): each odd but valid config below is built in transformers with random weights and its logits must match
ours after ``llmarch.hf.load``; rules that only show at full size are checked against transformers' resolved
config object."""
from __future__ import annotations

import json

import pytest
import torch
import transformers

import llmarch
from llmarch.hf import ConversionError
from llmarch.hf.io import family
from tests.hf_util import assert_close_at, hf_logits, padded_batch
from tests.test_hf_seq2seq import compare_logits

LLAMA = llmarch.preset("llama-tiny").replace(vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                                             max_seq_len=64)
T5 = llmarch.preset("t5-tiny").replace(vocab_size=97, d_model=32, n_heads=4, head_dim=8, d_ff=64, n_layers=2,
                                       dropout=0.0)
SWITCH = llmarch.preset("switch-tiny").replace(vocab_size=97, d_model=32, n_heads=4, head_dim=8, d_ff=64, n_layers=4,
                                               dropout=0.0, moe=dict(jitter=0.0, expert_capacity=64))


def hf_model_for(hf_cfg: dict, tmp, cls: str, prepare=None):
    """A random transformers model built from ``hf_cfg`` exactly as written (saved weights; config.json put back
    as written, since save_pretrained would restate it in its own terms)."""
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "config.json").write_text(json.dumps(hf_cfg))
    config = transformers.AutoConfig.from_pretrained(tmp)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = getattr(transformers, cls)(config).float().eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
        if prepare is not None:
            prepare(model)
    model.save_pretrained(tmp)
    (tmp / "config.json").write_text(json.dumps(hf_cfg))
    return model


def untie(model):
    model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.lm_head.weight))


def check_causal(hf_cfg, tmp, prepare=None, cls="LlamaForCausalLM"):
    theirs = hf_model_for(hf_cfg, tmp, cls, prepare)
    ours = llmarch.hf.load(tmp).eval()
    ids, mask = padded_batch(hf_cfg["vocab_size"], lengths=(16, 9))
    with torch.no_grad():
        assert_close_at(ours(ids, attention_mask=mask).logits, hf_logits(theirs, ids, mask), mask)
    return ours.config


def test_rope_scaling_replaces_rope_parameters_whole(tmp_path):
    hf = {**family("llama").from_config(LLAMA), "rope_scaling": {"rope_type": "linear", "factor": 4.0},
          "rope_parameters": {"rope_type": "default", "rope_theta": 500.0}}
    cfg = check_causal(hf, tmp_path)
    assert (cfg.rope.scaling, cfg.rope.factor, cfg.rope.theta) == ("linear", 4.0, 10000.0)


def test_a_tied_config_with_a_different_head_in_the_checkpoint_is_untied(tmp_path):
    hf = {**family("llama").from_config(LLAMA), "tie_word_embeddings": True}
    assert check_causal(hf, tmp_path, prepare=untie).tie_embeddings is False


def test_qwen2_sliding_layers_need_use_sliding_window(tmp_path):
    """Qwen2Config drops sliding_window unless use_sliding_window; transformers then refuses the sliding layers'
    mask ("Could not find a `sliding_window`"), so the translation refuses the config by name too."""
    hf = {**family("qwen2").from_config(LLAMA.replace(qkv_bias=True)), "use_sliding_window": False,
          "sliding_window": 4, "layer_types": ["sliding_attention", "full_attention"]}
    (tmp_path / "config.json").write_text(json.dumps(hf))
    assert transformers.AutoConfig.from_pretrained(tmp_path).sliding_window is None
    with pytest.raises(ConversionError, match="layer_types has sliding layers but use_sliding_window is false"):
        llmarch.hf.config_from_hf(tmp_path)
    hf["use_sliding_window"] = True  # now the window counts
    check_causal(hf, tmp_path / "on", cls="Qwen2ForCausalLM")


def seq2seq_check(hf_cfg, tmp, cfg, prepare=None, cls="T5ForConditionalGeneration"):
    theirs = hf_model_for(hf_cfg, tmp, cls, prepare)
    ours = llmarch.hf.load(tmp).eval()
    compare_logits(tmp.name, cfg, theirs, ours)
    return ours.config


@pytest.mark.parametrize("tie, scale, own_head", [(True, False, False), (True, False, True), (False, None, True),
                                                  (False, True, True), (None, None, False)],
                         ids=["tied_not_rescaled", "v5_untied", "old_untied", "untied_rescaled", "defaults"])
def test_t5_scale_decoder_outputs_and_tying(tmp_path, tie, scale, own_head):
    hf = family("t5").from_config(T5)
    for key, value in (("tie_word_embeddings", tie), ("scale_decoder_outputs", scale)):
        hf.pop(key)
        if value is not None:
            hf[key] = value
    cfg = seq2seq_check(hf, tmp_path, T5, prepare=untie if own_head else None)
    assert (cfg.tie_embeddings, cfg.scale_head) == (not own_head, scale if scale is not None else tie is not False)


def test_switch_explicit_sparse_step_wins_over_num_sparse_layers(tmp_path):
    hf = {**family("switch_transformers").from_config(SWITCH), "num_sparse_encoder_layers": 1,
          "num_sparse_decoder_layers": 1, "encoder_sparse_step": 2, "decoder_sparse_step": 2}
    cfg = seq2seq_check(hf, tmp_path, SWITCH, cls="SwitchTransformersForConditionalGeneration")
    assert cfg.moe.every == 2


@pytest.mark.parametrize("model_type, base, changes", [
    ("mistral", LLAMA, dict(sliding_window=None)),  # key absent: MistralConfig's 4096
    ("mistral", LLAMA.replace(n_heads=16), dict(num_key_value_heads=None)),  # key absent: 8, not n_heads
    ("mixtral", llmarch.preset("mixtral-tiny"), dict(rms_norm_eps=None, rope_parameters=None)),  # 1e-5, theta 1e6
    ("qwen2", LLAMA.replace(qkv_bias=True), dict(use_sliding_window=True, sliding_window=None, layer_types=None,
                                                 max_window_layers=None, num_hidden_layers=30, num_key_value_heads=None,
                                                 num_attention_heads=32, hidden_size=64)),
    ("llama", LLAMA, dict(rope_parameters={"rope_type": "default"}, rope_theta=5e5, partial_rotary_factor=0.5)),
    ("switch_transformers", SWITCH, dict(num_decoder_layers=None)),  # key absent: 12 decoder layers
])
def test_defaults_of_absent_keys_follow_the_config_class(tmp_path, model_type, base, changes):
    hf = family(model_type).from_config(base)
    for key, value in changes.items():
        hf.pop(key, None)
        if value is not None:
            hf[key] = value
    (tmp_path / "config.json").write_text(json.dumps(hf))
    theirs = transformers.AutoConfig.from_pretrained(tmp_path)
    ours = llmarch.hf.config_from_hf(tmp_path)
    window = getattr(theirs, "sliding_window", None)
    types = getattr(theirs, "layer_types", None) or \
        ["sliding_attention" if window else "full_attention"] * ours.n_layers
    assert [ours.layer_pattern(i) == "sliding" for i in range(ours.n_layers)] == \
        [t == "sliding_attention" and window is not None for t in types]
    if window is not None and "sliding" in ours.pattern:
        assert ours.window == window
    rope = getattr(theirs, "rope_parameters", None) or {}
    checks = {"n_kv_heads": (ours.kv_heads, getattr(theirs, "num_key_value_heads", ours.n_heads)),
              "norm_eps": (ours.norm_eps, getattr(theirs, "rms_norm_eps", getattr(theirs, "layer_norm_epsilon", 0))),
              "theta": (ours.rope.theta if ours.position == "rope" else None, rope.get("rope_theta")),
              "fraction": (ours.rope.fraction, rope.get("partial_rotary_factor", 1.0)),
              "decoder_layers": (ours.n_decoder_layers or ours.n_layers,
                                 getattr(theirs, "num_decoder_layers", ours.n_layers))}
    assert {k: a for k, (a, b) in checks.items()} == {k: b for k, (a, b) in checks.items()}
