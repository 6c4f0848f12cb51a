"""ModelConfig validation, serialisation and overrides; presets lookup; bad input to generate()."""
from __future__ import annotations

import pytest
import torch

import llmarch
from llmarch import ModelConfig
from llmarch.nn import ACTIVATIONS, FFNS, KERNELS, NORMS, PATTERNS, POSITIONS

OK = dict(vocab_size=101, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_seq_len=32)

# (changes to a valid config, field named in the error, another fragment the message must contain)
BAD = {
    "heads-not-dividing-d_model": (dict(n_heads=5), "n_heads", "must divide d_model"),
    "kv-heads-not-dividing-heads": (dict(n_kv_heads=3), "n_kv_heads", "must divide n_heads"),
    "odd-rotary-dim": (dict(head_dim=6, rope=dict(fraction=0.5)), "rope.fraction", "must be even"),
    "zero-window": (dict(pattern=("sliding",), window=0), "window", "positive integer"),
    "negative-window": (dict(window=-4), "window", "positive integer"),
    "missing-window": (dict(pattern=("sliding",)), "window", "is required by the sliding pattern"),
    "zero-layers": (dict(n_layers=0), "n_layers", "positive integer"),
    "bad-dropout": (dict(dropout=1.0), "dropout", "[0, 1)"),
    "negative-eps": (dict(norm_eps=0.0), "norm_eps", "> 0"),
    "eos-outside-vocab": (dict(eos_token_id=101), "eos_token_id", "outside the vocabulary"),
    "pattern-length": (dict(n_layers=3, pattern=("dense", "sliding"), window=4), "pattern", "has 2 entries"),
    "rope-factor-below-one": (dict(rope=dict(scaling="linear", factor=0.5)), "rope.factor", "must be >= 1"),
    "llama3-without-original": (dict(rope=dict(scaling="llama3", factor=8.0)), "rope.original_max_seq_len",
                                "is required"),
}

ENUMS = {"kind": ["decoder", "encoder", "encoder_decoder"], "norm_placement": ["post", "pre"],
         "norm": sorted(NORMS), "ffn": sorted(FFNS), "activation": sorted(ACTIVATIONS),
         "attn_kernel": sorted(KERNELS), "position": sorted(POSITIONS)}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_config_raises_value_error_naming_the_field(case):
    changes, field, fragment = BAD[case]
    with pytest.raises(ValueError) as err:
        ModelConfig(**{**OK, **changes})
    msg = str(err.value)
    assert msg.startswith(f"{field}:"), msg
    assert fragment in msg, msg


@pytest.mark.parametrize("field", sorted(ENUMS))
def test_unknown_enumerated_value_lists_the_allowed_values(field):
    with pytest.raises(ValueError) as err:
        ModelConfig(**{**OK, field: "bogus"})
    msg = str(err.value)
    assert msg.startswith(f"{field}: 'bogus' is not allowed"), msg
    assert str(ENUMS[field]) in msg, msg


def test_unknown_pattern_and_rope_scaling_list_the_allowed_values():
    with pytest.raises(ValueError, match=r"pattern: 'diagonal' is not allowed; choose one of \[.*'dense'"):
        ModelConfig(**OK, pattern=("dense", "diagonal"))
    with pytest.raises(ValueError, match=r"rope.scaling: 'ntk' is not allowed; choose one of \['dynamic'"):
        ModelConfig(**OK, rope=dict(scaling="ntk"))
    assert set(PATTERNS) >= {"dense", "sliding"}


def test_from_dict_refuses_unknown_fields():
    with pytest.raises(ValueError, match=r"unknown config field\(s\) \['n_layer'\]; known fields are"):
        ModelConfig.from_dict({**OK, "n_layer": 3})
    with pytest.raises(ValueError, match=r"unknown rope field\(s\) \['base'\]"):
        ModelConfig.from_dict({**OK, "rope": {"base": 1e4}})


ROUND_TRIP = ModelConfig(**OK, n_kv_heads=2, pattern=("dense", "sliding"), window=8, norm="layernorm",
                         rope=dict(scaling="yarn", factor=4.0, original_max_seq_len=16), eos_token_id=3)


@pytest.mark.parametrize("suffix", [".json", ".yaml", ".yml"])
def test_file_round_trip(tmp_path, suffix):
    path = tmp_path / f"cfg{suffix}"
    ROUND_TRIP.to_file(path)
    again = ModelConfig.from_file(path)
    assert again == ROUND_TRIP
    assert isinstance(again.rope, llmarch.RopeConfig) and isinstance(again.pattern, tuple)
    assert ModelConfig.from_dict(ROUND_TRIP.to_dict()) == ROUND_TRIP


def test_from_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ModelConfig.from_file(tmp_path / "nope.json")
    bad = tmp_path / "list.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="expected a mapping of config fields, got list"):
        ModelConfig.from_file(bad)


def test_with_path_sets_fields_by_dotted_name_and_converts_strings():
    cfg = ModelConfig(**OK)
    assert cfg.with_path("rope.theta", "500000").rope.theta == 500000.0
    assert cfg.with_path("n_kv_heads", "2").kv_heads == 2
    assert cfg.with_path("n_kv_heads", "none").n_kv_heads is None
    assert cfg.with_path("tie_embeddings", "true").tie_embeddings is True
    assert cfg.replace(window=4).with_path("pattern", "dense,sliding").pattern == ("dense", "sliding")
    assert cfg.replace(window=4).with_path("pattern", "sliding").pattern == ("sliding",)
    assert cfg.with_path("rope.scaling", "linear").with_path("rope.factor", "2").rope.factor == 2.0
    assert cfg.n_kv_heads is None and cfg.rope.theta == 10000.0  # the original is unchanged (frozen)


def test_with_path_errors_name_the_field():
    cfg = ModelConfig(**OK)
    with pytest.raises(ValueError, match=r"unknown config field 'layers'"):
        cfg.with_path("layers", "3")
    with pytest.raises(ValueError, match=r"unknown config field 'rope.base'"):
        cfg.with_path("rope.base", "3")
    with pytest.raises(ValueError, match=r"n_layers: cannot read 'three' as int"):
        cfg.with_path("n_layers", "three")
    with pytest.raises(ValueError, match=r"n_heads: must divide d_model"):
        cfg.with_path("n_heads", "5")


def test_unknown_preset_suggests_close_names():
    with pytest.raises(ValueError, match=r"unknown preset 'lama-2-7b'; did you mean llama-2-7b"):
        llmarch.preset("lama-2-7b")
    with pytest.raises(ValueError, match=r"unknown preset 'zzzz' \(`llmarch presets` lists all"):
        llmarch.preset("zzzz")
    assert llmarch.preset("LLaMA-2-7B") == llmarch.preset("llama-2-7b")


def test_preset_overrides_are_validated():
    assert llmarch.preset("llama-tiny", n_layers=1).n_layers == 1
    with pytest.raises(ValueError, match="n_kv_heads: must divide n_heads"):
        llmarch.preset("llama-tiny", n_kv_heads=3)


# --- bad input to generate() -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    return llmarch.build(ModelConfig(**OK)).eval()


def test_generate_refuses_token_ids_outside_the_vocabulary(tiny):
    with pytest.raises(ValueError, match=r"input_ids: token id 101 is outside the vocabulary \[0, 101\)"):
        llmarch.generate(tiny, torch.tensor([[1, 101]]), max_new_tokens=2)
    with pytest.raises(ValueError, match=r"input_ids: token id -1 is outside the vocabulary"):
        llmarch.generate(tiny, torch.tensor([[-1, 3]]), max_new_tokens=2)


def test_generate_refuses_a_prompt_longer_than_a_learned_position_table():
    learned = llmarch.build(ModelConfig(**OK, position="learned")).eval()
    with pytest.raises(ValueError, match=r"prompt \(33 tokens\) \+ max_new_tokens \(1\) = 34 positions exceed the "
                                         r"model's learned position table \(max_seq_len=32\)"):
        llmarch.generate(learned, torch.zeros(1, 33, dtype=torch.long), max_new_tokens=1)


def test_generate_refuses_a_bad_attention_mask_shape(tiny):
    with pytest.raises(ValueError, match=r"attention_mask has shape \(1, 4\), expected \(2, 4\)"):
        llmarch.generate(tiny, torch.zeros(2, 4, dtype=torch.long), attention_mask=torch.ones(1, 4),
                         max_new_tokens=1)


def test_generate_refuses_other_bad_arguments(tiny):
    ids = torch.zeros(1, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="max_new_tokens must be a positive integer"):
        llmarch.generate(tiny, ids, max_new_tokens=-1)
    with pytest.raises(ValueError, match="the prompt is empty"):
        llmarch.generate(tiny, ids[:, :0])
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        llmarch.generate(tiny, ids, max_new_tokens=1, temperature=-1.0)
    with pytest.raises(ValueError, match="input_ids must hold integer token ids"):
        llmarch.generate(tiny, ids.float(), max_new_tokens=1)


def test_layer_mixers_schedule_cycles_and_is_validated():
    cfg = llmarch.preset("llama-tiny")
    hybrid = cfg.replace(layer_mixers=["latent", "attention"], mla={"kv_lora_rank": 16, "qk_rope_head_dim": 8,
                                                                    "qk_nope_head_dim": 8, "v_head_dim": 16})
    assert [hybrid.layer_mixer(i) for i in range(cfg.n_layers)] == ["latent", "attention"] * (cfg.n_layers // 2)
    assert hybrid.mixers == ("latent", "attention")
    assert llmarch.ModelConfig.from_dict(hybrid.to_dict()) == hybrid
    model = llmarch.build(hybrid)
    assert [type(b.attn).__name__ for b in model.decoder.layers][:2] == ["LatentAttention", "Attention"]
    with pytest.raises(ValueError, match="layer_mixers"):
        cfg.replace(layer_mixers=("attention", "nope"))
    with pytest.raises(ValueError, match="layer_mixers"):
        cfg.replace(layer_mixers=("attention",) * (cfg.n_layers + 1))
