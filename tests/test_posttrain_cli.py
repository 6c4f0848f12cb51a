"""The post-training verbs: `data instructions`, `finetune` (full and LoRA), `merge`, `train --from`, and chat
formatting with the tuned template."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from llmarch.cli import main
from llmarch.checkpoint import load_model
from llmarch.instructions import TASKS, build_instructions, follows, verify
from tests.posttrain_util import SFT_ROWS, tiny_model_dir, write_jsonl

SMALL = ["heapq.py", "copy.py", "fnmatch.py", "shlex.py"]


def stdlib_subset(tmp_path) -> Path:
    import sysconfig

    d = tmp_path / "src"
    d.mkdir()
    for name in SMALL:
        shutil.copy(Path(sysconfig.get_paths()["stdlib"]) / name, d / name)
    return d


def test_instructions_and_verifiers(tmp_path, capsys):
    src = stdlib_subset(tmp_path)
    out = tmp_path / "inst.jsonl"
    assert main(["data", "instructions", "--data", str(src), "--out", str(out), "--val-fraction", "0.3"]) == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert {r["task"] for r in rows} == set(TASKS.names()) and {r["split"] for r in rows} == {"train", "test"}
    assert {r["difficulty"] for r in rows} <= {"simple", "medium", "hard"}
    by_file = {}
    for r in rows:  # the held-out split is by file: a file's rows are all on one side
        by_file.setdefault(r["file"], set()).add(r["split"])
    assert all(len(s) == 1 for s in by_file.values())
    again = build_instructions(sorted(src.glob("*.py")), src, val_fraction=0.3)
    assert again == rows  # deterministic
    for r in rows:  # the reference answer passes, a wrong one fails
        assert verify(r, r["response"]) == 1.0 and follows(r, r["response"]), (r["task"], r["name"])
        assert verify(r, "not an answer (") < 0.5
        assert follows(r, "not an answer (") == (r["task"] == "docstring")
    assert main(["data", "instructions", "--data", str(src), "--out", str(out)]) == 2  # never overwritten


def test_finetune_sft_then_chat_uses_the_template(tmp_path, capsys):
    base = tiny_model_dir(tmp_path)
    data = write_jsonl(tmp_path / "sft.jsonl", SFT_ROWS)
    run = tmp_path / "run"
    argv = ["finetune", "--from", str(base), "--data", str(data), "--method", "sft", "--out", str(run), "--steps",
            "3", "--batch-size", "4", "--seq-len", "48", "--no-progress", "--eval-every", "3", "--lr", "1e-3"]
    assert main(argv) == 0
    assert "checkpoint:" in capsys.readouterr().out
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 3 and "val_loss" in records[-1]
    assert main(argv[:-2] + ["--steps", "4", "--resume", "--lr", "1e-3"]) == 0  # --resume extends the run
    from llmarch.infer.chat import Chat
    from llmarch.tokenizer import load_tokenizer_for
    from llmarch.train.checkpoints import resolve_model_dir

    ckpt = resolve_model_dir(run)
    tok = load_tokenizer_for(ckpt)
    chat = Chat(load_model(ckpt), tok, system="Be brief.", max_new_tokens=8, temperature=0.0)
    expected, _ = tok.apply_chat_template([{"role": "system", "content": "Be brief."},
                                           {"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert chat.prompt_ids("hi") == expected
    chat.send("hi")
    merged = tmp_path / "merged"
    assert main(["merge", str(run), str(merged)]) == 0  # a full fine-tuning run is copied
    x = torch.tensor([expected])
    torch.testing.assert_close(load_model(merged)(x).logits, load_model(ckpt)(x).logits)
    assert main(["merge", str(run), str(merged)]) == 2  # never overwrites


def test_bad_row_is_one_line_error(tmp_path, capsys):
    base = tiny_model_dir(tmp_path)
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps(SFT_ROWS[0]) + "\n" + json.dumps({"prompt": "no answer"}) + "\n" * 2 +
                    json.dumps(SFT_ROWS[1]) + "\n")
    assert main(["finetune", "--from", str(base), "--data", str(data), "--out", str(tmp_path / "r"), "--steps", "1",
                 "--no-progress", "--val-fraction", "0.01"]) == 2
    assert "bad.jsonl:2" in capsys.readouterr().err


def test_train_from_continues_pretraining(tmp_path, capsys):
    base = tiny_model_dir(tmp_path)
    text = tmp_path / "corpus.txt"
    text.write_text("def add(a, b):\n    return a + b\n" * 400)
    (tmp_path / "more.txt").write_text("What is two plus two? Four.\n" * 200)
    run = tmp_path / "run"
    assert main(["train", "--from", str(base), "--data", str(tmp_path / "*.txt"), "--out", str(run), "--steps",
                 "2", "--batch-size", "2", "--seq-len", "32", "--no-progress", "--samples", "0",
                 "--cache-dir", str(tmp_path / "cache"), "--eval-every", "2", "--eval-batches", "1"]) == 0
    from safetensors.torch import load_file
    from llmarch.train.checkpoints import resolve_model_dir

    start = load_file(str(base / "model.safetensors"))
    end = load_file(str(resolve_model_dir(run) / "model.safetensors"))
    assert start.keys() == end.keys()  # the same model and vocabulary (the directory's tokenizer)
    delta = max((start[k] - end[k]).abs().max().item() for k in start)
    assert 0 < delta < 0.1  # continued from the weights, not from a fresh init


def test_finetune_lora_writes_adapter_and_merges(tmp_path, capsys):
    base = tiny_model_dir(tmp_path)
    data = write_jsonl(tmp_path / "sft.jsonl", SFT_ROWS)
    run = tmp_path / "run"
    assert main(["finetune", "--from", str(base), "--data", str(data), "--out", str(run), "--steps", "2",
                 "--lora", "r=4,alpha=8,targets=q,v", "--no-progress", "--seq-len", "48", "--lr", "1e-2"]) == 0
    assert (run / "adapter" / "adapter_config.json").is_file()
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    merged = tmp_path / "merged"
    assert main(["merge", str(run), str(merged)]) == 0
    from llmarch import lora
    from llmarch.train.merge import merge_run  # noqa: F401
    from llmarch.train.posttrain import initial_model  # the adapted model, rebuilt, equals the merged one
    from llmarch.train import TrainConfig
    from llmarch.train.checkpoints import resolve_model_dir
    from safetensors.torch import load_file

    ckpt = resolve_model_dir(run)
    cfg = load_model(merged).config
    adapted = initial_model(cfg, TrainConfig(out=str(tmp_path / "x"), lora="r=4,alpha=8,targets=q,v"))
    adapted.load_state_dict(load_file(str(ckpt / "model.safetensors")), strict=False)
    x = torch.randint(0, cfg.vocab_size, (2, 10))
    torch.testing.assert_close(load_model(merged)(x).logits, adapted(x).logits, atol=1e-5, rtol=0)
    with lora.disabled(adapted):  # the adapters did change the model
        assert (adapted(x).logits - load_model(merged)(x).logits).abs().max() > 1e-6
    # the run itself loads as that merged model, so generate / chat / convert read it without `llmarch merge`
    torch.testing.assert_close(load_model(ckpt)(x).logits, adapted(x).logits, atol=1e-5, rtol=0)
    assert not any("lora" in name for name in load_model(ckpt).state_dict())
    capsys.readouterr()
    assert main(["generate", "--checkpoint", str(run), "--prompt", "hi", "--max-new-tokens", "3",
                 "--temperature", "0", "--no-stream"]) == 0
    from_run = capsys.readouterr().out
    assert main(["generate", "--checkpoint", str(merged), "--prompt", "hi", "--max-new-tokens", "3",
                 "--temperature", "0", "--no-stream"]) == 0
    assert capsys.readouterr().out == from_run
