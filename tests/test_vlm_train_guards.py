"""`llmarch train --images` under the main trainer's guards: a run cut at --stop-at and resumed ends with the same
weights and losses as an uninterrupted one; a non-finite loss stops the run naming the step (and a run without a
checkpoint leaves no directory behind); a locked run directory is refused."""
import json

import pytest
import torch
from safetensors.torch import load_file

import llmarch
from llmarch.cli import main
from llmarch.train.settings import TrainConfig

ARGS = ["--preset", "llava-tiny", "--images", "digits", "--steps", "4", "--batch-size", "4", "--warmup", "1",
        "--save-every", "2", "--eval-every", "4", "--no-progress"]


def final_state(run):
    ckpt = sorted((run / "checkpoints").iterdir())[-1]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return ckpt.name, load_file(str(ckpt / "model.safetensors")), [(r["step"], r["loss"]) for r in rows]


def test_resumed_run_equals_the_uninterrupted_one(tmp_path, monkeypatch):
    from llmarch.train import image_loop

    monkeypatch.setattr(image_loop, "HELD_OUT", 0.01)  # 17 held-out pairs: a fast final evaluation
    assert main(["train", *ARGS, "--out", str(tmp_path / "whole"), "--log-every", "1"]) == 0
    assert main(["train", *ARGS, "--out", str(tmp_path / "cut"), "--log-every", "1", "--stop-at", "2"]) == 0
    assert not (tmp_path / "cut" / "eval.json").exists()
    assert main(["train", "--out", str(tmp_path / "cut"), "--resume"]) == 0
    name, weights, losses = final_state(tmp_path / "whole")
    name2, weights2, losses2 = final_state(tmp_path / "cut")
    assert name == name2 == "step_00000004" and losses == losses2 and [s for s, _ in losses] == [1, 2, 3, 4]
    assert weights.keys() == weights2.keys() and all(torch.equal(weights[k], weights2[k]) for k in weights)
    assert json.loads((tmp_path / "cut" / "eval.json").read_text())["steps"] == 4


def test_non_finite_loss_stops_the_run_and_a_locked_run_is_refused(tmp_path, monkeypatch):
    from llmarch.train import image_loop
    from llmarch.train.finite import NonFiniteError
    from llmarch.train.rundir import RunDirectory, RunLocked

    def poisoned(cfg):
        model = llmarch.build(cfg)
        with torch.no_grad():
            model.projector.proj_out.bias[0] = float("nan")
        return model

    monkeypatch.setattr(image_loop, "build", poisoned)
    tc = TrainConfig(out=str(tmp_path / "nan"), images="digits", steps=3, batch_size=4, warmup=1, progress=False)
    with pytest.raises(NonFiniteError, match="step 1: loss is nan"):
        image_loop.train_image_text(llmarch.preset("llava-tiny"), tc)
    assert not (tmp_path / "nan").exists()  # nothing committed: the run directory is removed
    with RunDirectory(tmp_path / "busy"):
        with pytest.raises(RunLocked, match="in use"):
            image_loop.train_image_text(llmarch.preset("llava-tiny"), TrainConfig(
                out=str(tmp_path / "busy"), images="digits", steps=1, batch_size=2, progress=False))
