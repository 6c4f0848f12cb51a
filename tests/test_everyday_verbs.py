"""Everyday verbs on real model directories: `plan` costs the paper's training context and only the attention pairs
the mask allows; inspect / compare / plan / diagram / plot take HF, checkpoint and run directories; convert and
hf.save carry the tokenizer so converted and quantized models generate text; chat reads a run directory."""
from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pytest
import torch

import llmarch
from llmarch import presets
from llmarch.cli import main
from llmarch.nn.patterns import PATTERNS, Pattern, build_pattern

sys.path.insert(0, str(Path(__file__).parent))
from hf_util import make_hf_model  # noqa: E402

TEXT = ["hello world, the quick brown fox jumps over the lazy dog"] * 20


def tiny_cfg():
    return llmarch.preset("llama-tiny").replace(vocab_size=320, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                                                d_ff=64, max_seq_len=128)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """An HF directory with its tokenizer and generation config, and a training run with one checkpoint."""
    import transformers

    from llmarch.tokenizer import train_tokenizer
    from llmarch.train.checkpoints import save_checkpoint

    tmp = tmp_path_factory.mktemp("verbs")
    _, hf_dir = make_hf_model(tiny_cfg(), "llama", tmp)
    tok = train_tokenizer(TEXT, 320)
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok.inner, bos_token="<bos>",
                                         eos_token="<eos>").save_pretrained(hf_dir)
    transformers.GenerationConfig(max_new_tokens=7, do_sample=False).save_pretrained(hf_dir)
    torch.manual_seed(0)
    model = llmarch.build(tiny_cfg().replace(n_kv_heads=1))
    run = tmp / "run"
    save_checkpoint(run, 3, model.config, model.state_dict(), {}, {"cpu": torch.get_rng_state()}, {"step": 3}, tok)
    return {"hf": hf_dir, "run": run, "tmp": tmp}


# --- plan: training context and mask-aware attention ------------------------------------------------------------
def plan_json(capsys, *argv) -> dict:
    assert main(["plan", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_plan_defaults_to_the_papers_training_context(capsys):
    p = plan_json(capsys, "llama-3.1-8b")
    assert p["seq_len"] == 8192 and "Llama 3" in p["seq_len_source"]  # not the 131k context of the extension
    tiny = plan_json(capsys, "llama-tiny")  # nothing recorded: the model's context, and the output says so
    assert tiny["seq_len"] == 512 and "max_seq_len" in tiny["seq_len_source"]
    given = plan_json(capsys, "llama-3.1-8b", "--seq-len", "1024")
    assert given["seq_len"] == 1024 and "given" in given["seq_len_source"]
    assert main(["plan", "llama-3.1-8b"]) == 0
    text = capsys.readouterr().out
    assert "seq_len 8192: the pre-training context" in text and "causal" in text


def test_plan_counts_only_the_pairs_the_mask_allows(capsys):
    cfg = presets.get("mistral-tiny")  # causal + sliding window W = 64 on every layer
    T, W = 256, cfg.window
    pairs = sum(1 for q in range(T) for k in range(T) if k <= q and q - k < W)  # the naive count
    per_pair = 2 * 2 * cfg.n_heads * cfg.dh  # q·k and p·v, 2 FLOPs per multiply-add
    p = plan_json(capsys, "mistral-tiny", "--seq-len", str(T), "--tokens", "1e6")
    assert p["attention"] == pytest.approx(3 * per_pair * pairs * cfg.n_layers / T * 1e6)
    assert p["attention_dense"] == pytest.approx(3 * per_pair * T * T * cfg.n_layers / T * 1e6)
    assert "sliding W=64" in p["attention_counting"]


@pytest.mark.parametrize("name", PATTERNS.names())
def test_pattern_pair_counts_match_the_rendered_mask(name):
    p = build_pattern(name, window=5)
    for n in (1, 4, 5, 23):
        for causal in (True, False):
            assert p.pairs(n, causal) == int(p.render(n, causal=causal).sum()) == Pattern.pairs(p, n, causal)
    assert build_pattern("sliding", window=4096).pairs(131072) == 4096 * 4097 // 2 + (131072 - 4096) * 4096


# --- one resolver: preset | config file | HF dir | checkpoint dir | run dir ---------------------------------------
def test_verbs_take_hf_checkpoint_and_run_directories(dirs, capsys, tmp_path):
    hf_dir, run = str(dirs["hf"]), str(dirs["run"])
    ckpt = str(next((dirs["run"] / "checkpoints").iterdir()))
    totals = {}
    for spec in (hf_dir, ckpt, run):
        assert main(["inspect", spec, "--json", "--seq-len", "16"]) == 0
        totals[spec] = json.loads(capsys.readouterr().out)["params"]["total"]
    assert totals[hf_dir] == sum(p.numel() for p in llmarch.build(tiny_cfg()).parameters())
    assert totals[ckpt] == totals[run] < totals[hf_dir]  # the run's model has one kv head
    assert main(["compare", hf_dir, run, "llama-tiny", "--json"]) == 0
    cols = json.loads(capsys.readouterr().out)
    assert cols[hf_dir]["attention"].startswith("GQA") and cols[run]["attention"].startswith("MQA")
    assert main(["plan", "--preset", hf_dir, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["seq_len"] == 128
    assert main(["diagram", "--config", run, "-o", str(tmp_path / "d.mmd")]) == 0
    assert "flowchart" in (tmp_path / "d.mmd").read_text() or "graph" in (tmp_path / "d.mmd").read_text()
    assert main(["plot", "rope", hf_dir, "-o", str(tmp_path / "rope.png")]) == 0 and (tmp_path / "rope.png").stat().st_size
    capsys.readouterr()


def test_hf_config_json_says_to_pass_the_directory(dirs, capsys):
    assert main(["inspect", "--config", str(dirs["hf"] / "config.json")]) == 2
    err = capsys.readouterr().err
    assert "pass its directory" in err and str(dirs["hf"]) in err and "Traceback" not in err
    assert main(["inspect", str(dirs["tmp"] / "missing" / "model")]) == 2
    assert "does not exist" in capsys.readouterr().err


# --- convert and hf.save carry the tokenizer ---------------------------------------------------------------------
def generated_text(capsys, checkpoint) -> str:
    assert main(["generate", "--checkpoint", str(checkpoint), "--prompt", "hello world", "--max-new-tokens", "6",
                 "--temperature", "0", "--no-stream"]) == 0
    return capsys.readouterr().out


def test_convert_carries_tokenizer_and_generation_config(dirs, capsys):
    import transformers

    hf_dir, tmp = dirs["hf"], dirs["tmp"]
    ours, back, q = tmp / "ours", tmp / "back", tmp / "q8"
    for argv in (["convert", str(hf_dir), str(ours)], ["convert", str(ours), str(back), "--to", "hf"],
                 ["convert", str(hf_dir), str(q), "--quantize", "int8"]):
        assert main(argv) == 0
        assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= \
            set(json.loads(capsys.readouterr().out)["carried"])
    texts = [generated_text(capsys, d) for d in (hf_dir, ours, back, q)]
    assert texts[0].startswith("hello world") and len(texts[0]) > len("hello world\n")
    assert texts[1] == texts[2] == texts[0]  # same weights, same tokenizer: the same text
    assert texts[3].startswith("hello world") and len(texts[3]) > len("hello world\n")
    tok = transformers.AutoTokenizer.from_pretrained(back)
    assert tok("the quick fox").input_ids == transformers.AutoTokenizer.from_pretrained(hf_dir)("the quick fox").input_ids
    assert transformers.GenerationConfig.from_pretrained(back).max_new_tokens == 7


def test_hf_save_carries_files_of_the_loaded_directory(dirs, tmp_path):
    import transformers

    run_ckpt = next((dirs["run"] / "checkpoints").iterdir())
    from llmarch.checkpoint import load_model

    llmarch.hf.save(load_model(run_ckpt), tmp_path / "hf")  # an llmarch tokenizer gets a tokenizer_config.json
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert tok.eos_token == "<eos>" and tok.decode(tok("lazy dog").input_ids) == "lazy dog"
    llmarch.hf.save(llmarch.hf.load(dirs["hf"]), tmp_path / "hf2")
    assert (tmp_path / "hf2" / "generation_config.json").read_text() == \
        (dirs["hf"] / "generation_config.json").read_text()


# --- chat: run directories and labelled turns --------------------------------------------------------------------
def test_chat_reads_a_run_directory_and_labels_turns(dirs, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n/quit\n"))
    assert main(["chat", "--checkpoint", str(dirs["run"]), "--max-new-tokens", "4", "--temperature", "0"]) == 0
    out = capsys.readouterr().out
    assert "you> " in out and "model> " in out and out.index("you> ") < out.index("model> ")
    from llmarch.infer.chat import repl

    class Echo:
        def send(self, line, on_text):
            on_text(line.upper())

    buf, lines = io.StringIO(), iter(["hi", "/quit"])
    repl(Echo(), read=lambda prompt: next(lines), out=buf)  # type: ignore[arg-type]
    assert buf.getvalue().endswith("model> HI\n")
