"""torchrun with 2 processes on gloo (CPU): DDP and FSDP2 train the same model as 1 process with the same global
batch; an FSDP2 checkpoint saved mid-run resumes to the same loss."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import llmarch
from llmarch.train import train
from llmarch.train.metrics import read_metrics
from tests.train_util import TINY, settings  # noqa: F401  (fixture)

SRC = str(Path(llmarch.__file__).resolve().parents[1])
MODEL_ARGS = ["--preset", "llama-tiny"] + [a for k, v in dict(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                                                               d_ff=64, max_seq_len=64).items()
                                           for a in ("--set", f"{k}={v}")]


def torchrun(out: Path, cache: Path, *extra: str, model_args: list[str] = MODEL_ARGS) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "llmarch.train", *model_args, "--out", str(out), "--cache-dir", str(cache), "--steps", "4",
           "--batch-size", "2", "--seq-len", "32", "--lr", "3e-3", "--warmup", "2", "--max-data-mb", "0.2",
           "--vocab-size", "400", "--eval-every", "2", "--eval-batches", "2", "--log-every", "1", "--samples", "0",
           "--no-progress", *extra]
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """1 process, 2 micro-batches of 2 = the global batch of 2 processes x 2 sequences."""
    tmp = tmp_path_factory.mktemp("ref")
    train(TINY, settings(tmp / "run", tmp / "cache", steps=4, batch_size=2, grad_accum=2, eval_every=2))
    return tmp / "cache", read_metrics(tmp / "run")


def losses(records: list[dict]) -> list[float]:
    return [r["loss"] for r in records] + [r["val_loss"] for r in records if "val_loss" in r]


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_match_one(tmp_path, reference, parallel):
    cache, ref = reference
    run = tmp_path / parallel
    if parallel == "fsdp":  # also: save under FSDP2 at step 2, resume from it
        torchrun(run, cache, "--parallel", parallel, "--stop-at", "2")
        assert (run / "checkpoints" / "step_00000002" / "manifest.json").is_file()
        torchrun(run, cache, "--parallel", parallel, "--resume")
    else:
        torchrun(run, cache, "--parallel", parallel)
    got = read_metrics(run)
    assert [r["step"] for r in got] == [1, 2, 3, 4]
    a, b = losses(ref), losses(got)
    assert len(a) == len(b) == 6
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-4, (a, b)
    assert b[3] < b[0]  # and it learns
    resumed = llmarch.train.checkpoints.load_checkpoint(run / "checkpoints" / "step_00000004")
    assert resumed["state"]["world"] == 2 and resumed["state"]["consumed"] == 16


def test_encoder_decoder_under_fsdp_with_activation_checkpointing(tmp_path, reference):
    """t5-tiny (two stacks of blocks, cross-attention, a relative bias shared across each stack, one embedding for
    both) sharded per block and checkpointed per block: the same losses as 1 process, masks included (they are
    drawn per micro-batch from its first sample's index)."""
    cache, _ = reference
    cfg = llmarch.preset("t5-tiny", dropout=0.0)
    train(cfg, settings(tmp_path / "one", cache, steps=4, batch_size=2, grad_accum=2, eval_every=2))
    torchrun(tmp_path / "two", cache, "--parallel", "fsdp", "--grad-checkpointing",
             model_args=["--preset", "t5-tiny", "--set", "dropout=0"])
    a, b = losses(read_metrics(tmp_path / "one")), losses(read_metrics(tmp_path / "two"))
    assert len(a) == len(b) == 6
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-4, (a, b)
    assert b[3] < b[0]
