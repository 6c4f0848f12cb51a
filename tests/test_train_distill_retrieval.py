"""`llmarch train --teacher` (knowledge distillation from a checkpoint) and `llmarch train/generate --index`
(RETRO retrieval in the loop): the logged loss is the distillation loss computed by hand, bad teachers are
refused, and a shrunk retro-tiny trains and generates with a tiny index built with the run's tokenizer."""
from __future__ import annotations

import copy
import logging
from types import SimpleNamespace

import pytest
import torch

import llmarch
from llmarch.checkpoint import load_model, save_model
from llmarch.cli import main
from llmarch.infer.distill import distillation_loss
from llmarch.retrieval import RetroModel
from llmarch.tokenizer import train_tokenizer
from llmarch.train import Trainer, train
from llmarch.train.metrics import read_metrics
from llmarch.train.objectives import ce_sum
from llmarch.train.retrieving import with_retrieval
from llmarch.train.teacher import load_teacher, with_teacher
from tests.train_util import TINY, settings  # noqa: F401  (fixture)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def test_teacher_loss_is_the_distillation_loss(tmp_path, cache):
    teacher_run = tmp_path / "teacher"
    train(TINY, settings(teacher_run, cache, steps=3))
    tc = settings(tmp_path / "student", cache, steps=2, eval_every=100, teacher=str(teacher_run),
                  distill_temperature=3.0, distill_alpha=0.7)
    trainer = Trainer(TINY, tc)
    student = copy.deepcopy(trainer.model)  # the weights step 1 computes its loss with
    chunk = trainer.train_seqs.batch(0, tc.batch_size)[:, :tc.seq_len + 1]
    teacher = load_model(sorted((teacher_run / "checkpoints").iterdir())[-1]).eval()
    with torch.no_grad():
        s_logits, t_logits = student(chunk[:, :-1]).logits, teacher(chunk[:, :-1]).logits
    expected = float(distillation_loss(s_logits, t_logits, chunk[:, 1:], 3.0, 0.7))
    plain = float(ce_sum(s_logits, chunk[:, 1:])) / chunk[:, 1:].numel()
    assert abs(expected - plain) > 1e-2  # the test tells distillation from plain CE
    result = trainer.run()
    records = read_metrics(tmp_path / "student")
    assert result.step == 2 and result.checkpoint is not None and [r["step"] for r in records] == [1, 2]
    assert records[0]["loss"] == pytest.approx(expected, rel=1e-5, abs=1e-6)
    # validation stays plain CE (comparable with runs without a teacher)
    assert records[-1]["val_loss"] == pytest.approx(result.val_losses[-1][1]) and records[-1]["val_loss"] > 0


def test_bad_teachers_are_refused(tmp_path, cache):
    tok = train_tokenizer(["def f(x):\n    return x\n" * 50], 300)
    model_dir = tmp_path / "wide"
    save_model(llmarch.build(TINY.replace(vocab_size=500)), model_dir)
    with pytest.raises(ValueError, match="vocab_size 500 but the student has 300"):
        load_teacher(str(model_dir), TINY.replace(vocab_size=300), tok, 32, torch.device("cpu"))
    tc = SimpleNamespace(teacher=str(model_dir))
    with pytest.raises(ValueError, match="causal_lm objective, not 'mlm'"):
        with_teacher(SimpleNamespace(name="mlm"), tc, TINY, tok, torch.device("cpu"))
    with pytest.raises(ValueError, match="distill_alpha"):
        settings(tmp_path / "x", cache, distill_alpha=1.5)


TEXT = ["def add(a, b):\n    return a + b\n", "class Point:\n    x: int = 0\n    y: int = 0\n",
        "for i in range(10):\n    print(i * i)\n", "import os\npath = os.path.join('a', 'b')\n",
        "while True:\n    break\n", "value = {'key': [1, 2, 3]}\n"]
RETRO_SET = ["d_model=32", "n_heads=4", "n_kv_heads=4", "d_ff=64", "max_seq_len=128", "retrieval.chunk_size=16",
             "retrieval.neighbour_len=32"]


def test_retro_trains_and_generates_with_an_index(tmp_path, cache, caplog, monkeypatch, capsys):
    data = tmp_path / "data"
    data.mkdir()
    for i, text in enumerate(TEXT):
        (data / f"f{i}.py").write_text(text * 40)
    tok_file = train_tokenizer([t * 40 for t in TEXT], 300).save(tmp_path / "tokenizer.json")
    idx, bytes_idx = tmp_path / "idx", tmp_path / "bytes_idx"
    for out, extra in ((idx, ["--tokenizer", str(tok_file)]), (bytes_idx, [])):
        assert main(["index", "build", "--data", str(data), "--out", str(out), "--chunk-size", "16",
                     "--encoder-preset", "dpr-tiny", *extra]) == 0
    calls = []
    forward = RetroModel.forward
    monkeypatch.setattr(RetroModel, "forward", lambda self, *a, **kw: calls.append(
        kw.get("neighbours") is not None and bool(kw["neighbour_mask"].any())) or forward(self, *a, **kw))
    run = tmp_path / "run"
    argv = ["train", "--preset", "retro-tiny", *[x for s in RETRO_SET for x in ("--set", s)], "--out", str(run),
            "--data", str(data), "--tokenizer", str(tok_file), "--cache-dir", str(cache), "--steps", "2",
            "--batch-size", "2", "--seq-len", "32", "--eval-every", "2", "--eval-batches", "1", "--samples", "0",
            "--warmup", "1", "--no-progress"]
    caplog.set_level(logging.INFO)
    assert main(argv + ["--index", str(idx)]) == 0
    assert "retrieval on" in caplog.text
    assert len(calls) >= 3 and all(calls)  # 2 training forwards + validation, each with neighbours found
    capsys.readouterr()
    calls.clear()
    assert main(["generate", "--checkpoint", str(run), "--index", str(idx), "--prompt", "def add",
                 "--max-new-tokens", "24", "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("def add") and any(calls)  # a chunk completed: retrieved
    # an index over UTF-8 bytes does not fit a BPE model: refused, naming both
    argv[argv.index(str(run))] = str(tmp_path / "run2")
    assert main(argv + ["--index", str(bytes_idx)]) == 2
    err = capsys.readouterr().err
    assert "UTF-8 bytes (V=256)" in err and "(V=300)" in err
    assert main(["generate", "--checkpoint", str(run), "--index", str(bytes_idx)]) == 2
    assert "UTF-8 bytes (V=256)" in capsys.readouterr().err
    # a RETRO config without an index trains with retrieval off, and says so
    cfg = llmarch.preset("retro-tiny")
    assert with_retrieval("objective", SimpleNamespace(index=None), cfg, None) == "objective"
    assert "retrieval off" in caplog.text
