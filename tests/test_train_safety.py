"""A training run directory under faults: one run at a time (OS lock), a non-finite loss stops the run without a
bad checkpoint, corrupt or crafted checkpoints fall back to the previous good one, a failed run leaves nothing
half-made, --resume reads the run's own settings, one text file is a corpus."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import llmarch
from llmarch.cli import main
from llmarch.train import Trainer, train
from llmarch.train import checkpoints as ckpt
from tests.train_util import TINY, settings


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def _cli(run: Path, cache: Path, *extra: str) -> list[str]:
    return ["train", "--preset", "llama-tiny", "--set", "d_model=32", "--set", "n_layers=1", "--set", "d_ff=64",
            "--out", str(run), "--steps", "2", "--seq-len", "32", "--batch-size", "2", "--max-data-mb", "0.2",
            "--vocab-size", "400", "--cache-dir", str(cache), "--eval-every", "2", "--samples", "0",
            "--no-progress", *extra]


def test_a_second_run_into_the_same_directory_is_refused(tmp_path, cache, capsys):
    from llmarch.train.rundir import RunDirectory

    run = tmp_path / "run"
    with RunDirectory(run):  # the first run holds the directory
        assert main(_cli(run, cache)) == 2
        err = capsys.readouterr().err
        assert "in use by another llmarch train" in err and f"pid {os.getpid()}" in err
        assert not ckpt.list_checkpoints(run)
    # a holder killed with SIGKILL releases the lock (the kernel does)
    import llmarch.train.rundir as rundir

    code = ("import importlib.util as u, os, sys; s = u.spec_from_file_location('rundir', sys.argv[1]); "
            "m = u.module_from_spec(s); s.loader.exec_module(m); m.RunDirectory(sys.argv[2]).__enter__(); "
            "os.kill(os.getpid(), 9)")  # the module alone (stdlib only): no torch import in the child
    assert subprocess.run([sys.executable, "-c", code, rundir.__file__, str(run)]).returncode == -9
    assert main(_cli(run, cache)) == 0 and len(ckpt.list_checkpoints(run)) == 1


def test_non_finite_loss_stops_without_a_bad_checkpoint(tmp_path, cache, monkeypatch, capsys):
    step = Trainer.train_step

    def diverging(self):  # after step 3 one weight is NaN, as after an exploding update
        record = step(self)
        if self.step == 3:
            with torch.no_grad():
                next(p for n, p in self.model.named_parameters() if "embed" not in n).view(-1)[0] = float("nan")
        return record

    monkeypatch.setattr(Trainer, "train_step", diverging)
    tc = settings(tmp_path / "run", cache, steps=8, save_every=2, keep_last=1)
    with pytest.raises(ValueError, match=r"step 4: loss is nan .*last good checkpoint is .*step_00000002.*--lr"):
        train(TINY, tc)
    good = ckpt.list_checkpoints(tmp_path / "run")
    assert [p.name for p in good] == ["step_00000002"]  # kept, never pruned for a NaN one
    assert all(torch.isfinite(t).all() for t in ckpt.load_checkpoint(good[0])["model"].values())
    # the weights are checked before a save too (a NaN produced by the very step that is saved)
    tc = settings(tmp_path / "run2", cache, steps=8, save_every=3, keep_last=1)
    with pytest.raises(ValueError, match="step 3: weight .* NaN"):
        train(TINY, tc)
    assert not (tmp_path / "run2").exists()  # nothing was committed: the half-made run is gone
    assert main(_cli(tmp_path / "run3", cache, "--lr", "nan")) == 2
    assert "lr: must be a finite number" in capsys.readouterr().err


def test_corrupt_and_crafted_checkpoints_fall_back(tmp_path, cache, caplog):
    run = tmp_path / "run"
    train(TINY, settings(run, cache, steps=4, save_every=2, keep_last=3))
    first, last = ckpt.list_checkpoints(run)
    (last / "state.json").write_text('{"step": 4}')  # crafted but hashed: a state without the data position
    from llmarch.manifest import write_manifest

    write_manifest(last)
    with (run / "metrics.jsonl").open("a") as fh:
        fh.write('{"step": 5, "lo')  # a write torn by a crash
    result = train(TINY, settings(run, cache, steps=6, save_every=2, keep_last=3, resume=True))
    assert result.step == 6
    assert "not a training checkpoint" in caplog.text and "torn write" in caplog.text
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and steps[-1] == 6  # resumed from step 2 (the crafted step 4 was skipped)
    newest = ckpt.list_checkpoints(run)[-1]
    (newest / "model.safetensors").write_bytes(b"\x08" + b"\0" * 7 + b"{}")  # a crafted header, hashed
    write_manifest(newest)
    caplog.clear()
    assert main(["generate", "--checkpoint", str(run), "--prompt", "x", "--max-new-tokens", "2"]) == 0
    assert f"checkpoint {newest} cannot be read" in caplog.text  # fell back to the one before
    assert main(["generate", "--checkpoint", str(newest), "--prompt", "x", "--max-new-tokens", "2"]) == 2


def test_failed_run_removes_only_what_it_created(tmp_path, cache):
    fresh = tmp_path / "fresh"
    with pytest.raises(ValueError, match="seq_len"):
        train(TINY, settings(fresh, cache, seq_len=128))
    assert not fresh.exists()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    with pytest.raises(ValueError, match="seq_len"):
        train(TINY, settings(mine, cache, seq_len=128))
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]


def test_resume_reads_the_runs_own_settings(tmp_path, cache, capsys, monkeypatch):
    run = tmp_path / "run"
    assert main(_cli(run, cache)) == 0
    capsys.readouterr()
    from llmarch import data

    def no_tokenising(*a, **k):
        raise AssertionError("tokenised the corpus before checking the settings")

    with monkeypatch.context() as m:
        m.setattr(data, "tokenize_corpus", no_tokenising)
        assert main(["train", "--out", str(run), "--resume", "--steps", "4", "--lr", "0.1"]) == 2
    assert "settings ['lr'] differ" in capsys.readouterr().err
    assert main(["train", "--out", str(run), "--resume", "--steps", "4", "--no-progress"]) == 0
    assert "trained to step 4" in capsys.readouterr().out
    saved = json.loads((run / "train.json").read_text())
    assert saved["steps"] == 4 and saved["seq_len"] == 32 and saved["vocab_size"] == 400


def test_one_text_file_is_split_within(tmp_path, cache):
    from llmarch import data

    text = "".join(f"def f{i}(x):\n    return x * {i} + {i % 7}\n\n" for i in range(600))
    corpus = tmp_path / "one.py"
    corpus.write_text(text)
    split = data.split_corpus(*data.corpus_files(corpus), 0.1)
    head, tail = split.texts("train"), split.texts("val")
    assert head[0] + tail[0] == text and 0.08 < len(tail[0]) / len(text) < 0.12 and head[0].endswith("\n")
    with pytest.raises(ValueError, match=r"val_fraction: must be in \(0, 1\)"):
        data.split_corpus(*data.corpus_files(corpus), 1.0)
    result = train(TINY, settings(tmp_path / "run", cache, data=str(corpus), max_data_mb=None, steps=2,
                                  eval_every=2))
    assert result.step == 2 and result.val_losses


def test_the_default_sequence_length_fits_the_model(tmp_path):
    from llmarch.train import TrainConfig
    from llmarch.train.setup import default_seq_len

    for name in ("bert-tiny", "roberta-tiny", "llama-tiny"):
        cfg = llmarch.preset(name)
        limit = cfg.max_seq_len - (cfg.position_offset if cfg.position == "learned" else 0)
        assert default_seq_len(cfg, TrainConfig(out=str(tmp_path))).seq_len == min(256, limit)


def test_resume_does_not_inherit_a_stop_at(tmp_path):
    """--stop-at belongs to one invocation: a resumed run continues to --steps."""
    import json

    from llmarch.train.resume import resume_settings

    (tmp_path / "train.json").write_text(json.dumps({"steps": 8, "stop_at": 2, "lr": 1e-3}))
    tc = resume_settings(str(tmp_path), {})
    assert tc.stop_at is None and tc.steps == 8 and tc.lr == 1e-3 and tc.resume


def test_resume_on_another_mesh_replaces_the_saved_mesh(tmp_path):
    """A mesh flag on --resume replaces the saved mesh whole (tp 2 + sp -> one process needs no --no-sp)."""
    import json

    from llmarch.train.resume import resume_settings

    (tmp_path / "train.json").write_text(json.dumps({"steps": 8, "tp": 2, "sequence_parallel": True, "lr": 1e-3}))
    kept = resume_settings(str(tmp_path), {"steps": 9})
    assert kept.tp == 2 and kept.sequence_parallel and kept.steps == 9
    moved = resume_settings(str(tmp_path), {"tp": 1})
    assert moved.tp == 1 and not moved.sequence_parallel and moved.lr == 1e-3 and moved.steps == 8
