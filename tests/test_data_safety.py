"""Nothing a user saved is lost or silently trusted: directory writers refuse non-empty outputs (and with
--overwrite replace only model files), every load path checks the manifest, the CLI answers in one line."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

import llmarch
from llmarch.checkpoint import load_model, save_model
from llmarch.cli import main

TINY = llmarch.preset("llama-tiny").replace(d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, d_ff=64, vocab_size=300,
                                            max_seq_len=64)


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    torch.manual_seed(0)
    return save_model(llmarch.build(TINY), tmp_path_factory.mktemp("src") / "model")


def _leftovers(*dirs: Path) -> list[str]:
    return [p.name for d in dirs for p in d.iterdir() if ".tmp." in p.name or p.name.endswith(".old")]


def test_directory_writers_never_delete_user_files(src, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    for argv in (["convert", str(src), str(out)], ["convert", str(src), str(out), "--to", "hf"],
                 ["convert", str(src), str(out), "--quantize", "int8"]):
        assert main(argv) == 2
        assert "not empty" in capsys.readouterr().err and [p.name for p in out.iterdir()] == ["notes.txt"]
    afile = tmp_path / "afile"
    afile.write_text("keep")
    assert main(["convert", str(src), str(afile)]) == 2 and afile.read_text() == "keep"
    assert "is a file" in capsys.readouterr().err
    # --overwrite replaces only model files: a quantized model becomes an HF one, stale quantization.json goes
    assert main(["convert", str(src), str(out), "--quantize", "int8", "--overwrite"]) == 0
    assert (out / "quantization.json").is_file()
    assert main(["convert", str(src), str(out), "--to", "hf", "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "notes.txt"]
    assert (out / "notes.txt").read_text() == "mine" and not _leftovers(tmp_path, out)
    x = torch.tensor([[1, 2, 3]])
    assert torch.allclose(load_model(out)(x).logits, load_model(src)(x).logits, atol=1e-5)
    # `convert SRC .` into an empty working directory; `convert SRC ..` is refused with a message
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    assert main(["convert", str(src), "."]) == 0
    assert sorted(p.name for p in here.iterdir()) == ["config.json", "manifest.json", "model.safetensors"]
    assert not _leftovers(tmp_path, here)
    assert main(["convert", str(src), ".."]) == 2 and "not empty" in capsys.readouterr().err
    # the library writers follow the same rule
    for save in (lambda p: llmarch.hf.save(llmarch.build(TINY), p), lambda p: save_model(llmarch.build(TINY), p)):
        with pytest.raises(ValueError, match="not empty"):
            save(tmp_path / "out")
    assert (out / "notes.txt").read_text() == "mine"


KILLED_WRITER = """
import os, signal, sys
from llmarch.outdir import staged_dir
with staged_dir(sys.argv[1]) as tmp:
    (tmp / "model.safetensors").write_bytes(b"half written")
    os.kill(os.getpid(), signal.SIGKILL)  # no chance to clean up
"""


def test_a_killed_writers_staging_directory_is_removed_by_the_next_write(src, tmp_path, capsys):
    import subprocess

    from llmarch.outdir import _staging_prefix

    out = tmp_path / "out"
    writer = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(out)])
    assert writer.wait() == -9
    left = _leftovers(tmp_path)
    assert len(left) == 1 and not out.exists()  # what the kill left: the staging directory, no OUT
    live = tmp_path / (_staging_prefix(out) + "x")  # a writer still running (this process): kept
    other = tmp_path / f".out.tmp.otherhost.{writer.pid}.x"  # a dead pid, but on another host: kept
    for d in (live, other):
        d.mkdir()
    assert main(["convert", str(src), str(out)]) == 0
    assert sorted(_leftovers(tmp_path)) == sorted([live.name, other.name])
    x = torch.tensor([[1, 2, 3]])
    torch.testing.assert_close(load_model(out)(x).logits, load_model(src)(x).logits)


def test_index_build_refuses_a_user_directory_and_query_finds_text(tmp_path, capsys):
    text = tmp_path / "corpus.txt"
    text.write_text("".join(f"line {i}: the quick brown fox number {i} jumps\n" for i in range(200)) +
                    "a very particular sentence about zebras and their striped coats\n" * 3)
    out = tmp_path / "idx"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    build = ["index", "build", "--data", str(text), "--out", str(out), "--chunk-size", "16", "--json"]
    assert main(build) == 2 and "not empty" in capsys.readouterr().err
    assert main(build + ["--overwrite"]) == 0
    assert (out / "notes.txt").read_text() == "mine" and (out / "meta.json").is_file()
    capsys.readouterr()
    assert main(["index", "query", str(out), "particular sentence about zebras", "-k", "3", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 3 and "zeb" in rows[0]["text"] and rows[0]["score"] >= rows[-1]["score"]


def test_every_load_path_checks_the_manifest(src, tmp_path, capsys):
    bad = tmp_path / "bad"
    assert main(["convert", str(src), str(bad)]) == 0
    weights = bad / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-3] ^= 0x40  # one flipped bit in the last weight
    weights.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="sha256"):
        load_model(bad)
    for argv in (["convert", str(bad), str(tmp_path / "c")], ["generate", "--checkpoint", str(bad), "--prompt", "x"]):
        assert main(argv) == 2 and "does not match its sha256" in capsys.readouterr().err
    # crafted files whose hashes were updated: a message naming the directory, never a traceback
    manifest = json.loads((bad / "manifest.json").read_text())
    weights.write_bytes(b"not a safetensors file at all")
    from llmarch.manifest import sha256, write_manifest

    write_manifest(bad)
    with pytest.raises(ValueError, match="cannot be loaded"):
        load_model(bad)
    manifest = json.loads((bad / "manifest.json").read_text())
    del manifest["model.safetensors"]["bytes"]
    (bad / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="integer 'bytes'"):
        load_model(bad)
    assert sha256(weights) == manifest["model.safetensors"]["sha256"]


def test_cli_errors_are_one_line(tmp_path, capsys, monkeypatch):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"llmarch {llmarch.__version__}"
    with pytest.raises(SystemExit) as e:  # a mistyped flag: the verb's usage, not the top-level one
        main(["train", "--preset", "llama-tiny", "--out", str(tmp_path / "r"), "--stpes", "10"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "usage: llmarch train" in err and "--stpes" in err
    import llmarch.cli.presets as verb

    def boom(args):
        raise RuntimeError("something unforeseen")

    monkeypatch.setattr(verb, "run", boom)
    assert main(["presets"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "RuntimeError: something unforeseen" in err and "-v" in err
    with pytest.raises(RuntimeError):
        main(["-v", "presets"])


def test_closed_pipe_exits_quietly(capsys, monkeypatch):
    read, write = os.pipe()
    os.close(read)  # the reader is gone (as with `| head` once it has its lines)
    with os.fdopen(write, "w") as pipe:
        monkeypatch.setattr(sys, "stdout", pipe)
        assert main(["compare", "llama-tiny", "gpt2-tiny", "--json"]) == 141
        monkeypatch.undo()
    assert capsys.readouterr().err == ""


def test_retro_checkpoint_generates_without_an_index(tmp_path, capsys):
    from llmarch.tokenizer import train_tokenizer

    tok = train_tokenizer(["def f(x):\n    return x + 1\n" * 50], 300)
    cfg = llmarch.preset("retro-tiny").replace(vocab_size=tok.vocab_size, d_model=32, n_heads=2, n_kv_heads=2,
                                               d_ff=64)
    path = save_model(llmarch.build(cfg), tmp_path / "retro")
    tok.save(path / "tokenizer.json")
    assert main(["generate", "--checkpoint", str(path), "--prompt", "def ", "--max-new-tokens", "4",
                 "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("def ")
