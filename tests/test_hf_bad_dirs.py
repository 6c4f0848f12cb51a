"""Issue 14, item 10: a damaged or crafted Hugging Face directory is a ConversionError (a ValueError) naming the
file and the tensor or field: wrong shapes, mistyped or zero sizes, an index without weight_map or pointing out of
the directory (names and symlinks), truncated or non-safetensors files, a missing or invalid config.json."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import llmarch
from llmarch.cli import main
from llmarch.hf import ConversionError

CFG = llmarch.preset("llama-tiny").replace(vocab_size=64, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, d_ff=64)


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    torch.manual_seed(0)
    return llmarch.hf.save(llmarch.build(CFG), tmp_path_factory.mktemp("hf") / "good")


@pytest.fixture
def bad(good, tmp_path):
    d = tmp_path / "bad"
    shutil.copytree(good, d)
    return d


def edit_config(d, **changes):
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, **changes}))


def shard(d, index: dict | None):
    (d / "model.safetensors").rename(d / "part-1.safetensors")
    if index is not None:
        (d / "model.safetensors.index.json").write_text(json.dumps(index))


def test_a_tensor_of_the_wrong_shape_names_file_and_tensor(bad):
    state = load_file(str(bad / "model.safetensors"))
    name = "model.layers.0.self_attn.q_proj.weight"
    state[name] = torch.zeros(state[name].shape[0], state[name].shape[1] - 1)  # one column short
    save_file(state, str(bad / "model.safetensors"))
    with pytest.raises(ConversionError, match=r"layers\.0\.self_attn\.q_proj\.weight \(32, 31\) in "
                                              r"model\.safetensors .*cannot form"):
        llmarch.hf.load(bad)
    state[name] = torch.zeros(8, 32)  # wrong row count: fuses, then the shape check names it
    save_file(state, str(bad / "model.safetensors"))
    with pytest.raises(ConversionError, match=r"q_proj\.weight in model\.safetensors.* expects"):
        llmarch.hf.load(bad)


@pytest.mark.parametrize("changes, words", [
    (dict(hidden_size="128"), "hidden_size must be a positive integer, got '128'"),
    (dict(num_attention_heads=0), "num_attention_heads must be a positive integer, got 0"),
    (dict(rms_norm_eps=float("nan")), "rms_norm_eps must be a finite number"),
    (dict(tie_word_embeddings="false"), "tie_word_embeddings must be true or false"),
    (dict(num_key_value_heads=3), "n_kv_heads: must divide n_heads"),
    (dict(rope_parameters=[1]), "rope_parameters must be a mapping"),
])
def test_bad_config_fields_name_config_json_and_the_field(bad, changes, words):
    edit_config(bad, **changes)
    for read in (llmarch.hf.load, llmarch.hf.config_from_hf):
        with pytest.raises(ConversionError, match=f"config.json: .*{words}"):
            read(bad)


@pytest.mark.parametrize("index, words", [
    ({"metadata": {}}, "weight_map is missing"),
    ({"weight_map": {"x": 3}}, r"weight_map\['x'\] must be a shard file name"),
    ({"weight_map": {"model.norm.weight": "../outside.safetensors"}}, "resolves outside the model directory"),
    ({"weight_map": {"model.norm.weight": "/etc/passwd"}}, "resolves outside the model directory"),
    ({"weight_map": {"model.norm.weight": "part-2.safetensors"}}, r"shard\(s\) \['part-2.safetensors'\]"),
])
def test_a_bad_shard_index_is_refused(bad, index, words):
    shard(bad, index)
    (bad.parent / "outside.safetensors").write_bytes((bad / "part-1.safetensors").read_bytes())
    with pytest.raises(ConversionError, match=f"model.safetensors.index.json: .*{words}"):
        llmarch.hf.load(bad)


def test_a_symlink_out_of_the_directory_is_refused(bad):
    outside = bad.parent / "elsewhere.safetensors"
    (bad / "model.safetensors").rename(outside)
    (bad / "model.safetensors").symlink_to(outside)
    with pytest.raises(ConversionError, match="'model.safetensors' resolves outside the model directory"):
        llmarch.hf.load(bad)
    (bad / "model.safetensors").unlink()
    (bad / "part-1.safetensors").symlink_to(outside)
    (bad / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "part-1.safetensors"}}))
    with pytest.raises(ConversionError, match="'part-1.safetensors' resolves outside"):
        llmarch.hf.load(bad)


@pytest.mark.parametrize("damage", ["truncated", "text", "empty"])
def test_unreadable_weights_name_the_file(bad, damage):
    f = bad / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes({"truncated": data[:len(data) // 2], "text": b"not weights at all", "empty": b""}[damage])
    with pytest.raises(ConversionError, match=r"model\.safetensors: not a readable safetensors file"):
        llmarch.hf.load(bad)


def test_missing_or_invalid_config_json(bad, capsys):
    (bad / "config.json").write_text("{not json")
    with pytest.raises(ConversionError, match=r"config\.json: not valid JSON"):
        llmarch.hf.load(bad)
    (bad / "config.json").write_text("[1, 2]")
    with pytest.raises(ConversionError, match=r"config\.json: expected a mapping"):
        llmarch.hf.load(bad)
    (bad / "config.json").unlink()
    with pytest.raises(ConversionError, match=r"config\.json: missing"):
        llmarch.hf.load(bad)


def test_the_cli_reports_one_line(bad, capsys):
    edit_config(bad, hidden_size="128")
    assert main(["generate", "--checkpoint", str(bad), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert "hidden_size must be a positive integer" in err and err.count("\n") == 1, err
