"""Issue 14, item 8: config field types are checked in one place (the dataclass annotations): numeric text is read
as the number, everything else of the wrong type (NaN, inf, lists, "false" or 2 for a boolean, None for a
required sub-config) is a ValueError naming the field; ``--set`` overrides are applied together and validated
once; YAML/JSON syntax errors name the file."""
from __future__ import annotations

import argparse

import pytest

import llmarch
from llmarch import ModelConfig
from llmarch.cli import main
from llmarch.cli.common import config_from_args

BASE = llmarch.preset("llama-tiny")


@pytest.mark.parametrize("change, field", [
    (dict(tie_embeddings="false"), "tie_embeddings"), (dict(tie_embeddings=2), "tie_embeddings"),
    (dict(norm_bias=0), "norm_bias"), (dict(norm_eps=float("nan")), "norm_eps"),
    (dict(norm_eps=float("inf")), "norm_eps"), (dict(dropout=float("nan")), "dropout"),
    (dict(d_model=[64]), "d_model"), (dict(n_layers=2.5), "n_layers"), (dict(vocab_size="many"), "vocab_size"),
    (dict(norm=3), "norm"), (dict(rope=None), "rope"), (dict(rope="none"), "rope"), (dict(rope=[1]), "rope"),
    (dict(rope={"theta": float("nan")}), "rope.theta"), (dict(rope={"theta": "1e400"}), "rope.theta"),
    (dict(rope={"scaling": "llama3", "factor": 8.0, "low_freq_factor": 0, "original_max_seq_len": 64}),
     "rope.low_freq_factor"),
    (dict(rope={"scaling": "yarn", "factor": 4.0, "beta_slow": 0, "original_max_seq_len": 64}), "rope.beta_slow"),
    (dict(rope={"bogus": 1}), "rope"), (dict(sparse={"global_tokens": ["a"]}), "sparse.global_tokens"),
    (dict(sparse={"seed": None}), "sparse.seed"), (dict(mla={"absorb": ["never"]}), "mla.absorb"),
    (dict(pattern=[1]), "pattern"), (dict(n_kv_heads=True), "n_kv_heads"),
])
def test_wrong_types_are_refused_by_field(change, field):
    with pytest.raises(ValueError, match=rf"^(unknown )?{field.replace('.', '[.]')}[:\[ ]"):
        BASE.replace(**change)


def test_numeric_text_is_read_as_the_number():
    cfg = ModelConfig.from_dict({**BASE.to_dict(), "norm_eps": "1e-5", "d_model": "64", "rope": {"theta": "5e5"}})
    assert (cfg.norm_eps, cfg.d_model, cfg.rope.theta) == (1e-5, 64, 5e5)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg


def test_set_overrides_are_validated_once_and_reach_sub_config_tuples():
    cfg = BASE.with_overrides({"pattern": "sliding", "window": "64"})  # each alone is invalid
    assert (cfg.pattern, cfg.window) == (("sliding",), 64)
    cfg = BASE.with_overrides({"pattern": "longformer", "mixer": "longformer", "window": "8",
                               "sparse.global_tokens": "0,3"})
    assert cfg.sparse.global_tokens == (0, 3)
    cfg = BASE.with_overrides({"ffn": "moe", "moe.n_experts": "4", "moe.top_k": "2"})  # moe was None
    assert cfg.moe.n_experts == 4
    with pytest.raises(ValueError, match="^rope: must be a mapping.*position='none'"):
        BASE.with_overrides({"rope": "none"})
    with pytest.raises(ValueError, match="^tie_embeddings: expected true or false"):
        BASE.with_overrides({"tie_embeddings": "2"})


def test_cli_set_and_bad_files_give_one_line_errors(tmp_path, capsys):
    args = argparse.Namespace(preset="llama-tiny", config=None, set=["pattern=sliding", "window=64"])
    assert config_from_args(args).window == 64  # what every verb's --set goes through
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("d_model: [1, 2\nn_layers: 2\n")
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{\"d_model\": 64,}")
    for argv, words in ((["--config", str(bad_yaml)], "not valid YAML"),
                        (["--config", str(bad_json)], "not valid JSON"),
                        (["--preset", "llama-tiny", "--set", "rope=none"], "rope: must be a mapping"),
                        (["--preset", "llama-tiny", "--set", "norm_eps=nan"], "norm_eps: must be a finite number"),
                        (["--preset", "llama-tiny", "--set", "tie_embeddings=maybe"], "tie_embeddings")):
        assert main(["inspect", *argv]) == 2
        err = capsys.readouterr().err
        assert words in err and "Traceback" not in err and err.count("\n") == 1, err
