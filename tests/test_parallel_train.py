"""The training loop on parallel meshes, 2 gloo processes (tests/dist_train_checks.py, several runs per launch):
sharded (DCP) checkpoints that resume bit-for-bit on the same mesh, on tp=2 and on one process, and export to
one safetensors directory; pipeline parallel (1F1B, interleaved) equal to one process."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmarch.train import train
from llmarch.train.metrics import read_metrics
from tests import dist_util
from tests.train_util import TINY, settings



def launch(tmp: Path, cache: Path, *checks: str) -> str:
    return dist_util.launch("dist_train_checks.py", 2, [str(tmp), str(cache)], list(checks), timeout=120)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """The tokenizer and token cache, made once in this process (the ranks then only read it)."""
    tmp = tmp_path_factory.mktemp("cache")
    train(TINY, settings(tmp / "warm", tmp / "cache", steps=1))
    return tmp / "cache"


def test_sharded_checkpoint_resumes_on_other_meshes(tmp_path, cache):
    """Saved sharded on dp=2 (FSDP2) at step 2: resumed on dp=2 and on one process (2 micro-batches) bit-for-bit
    equal to the uninterrupted run; on tp=2 (loaded state bit-equal, checked by the ranks) within 1e-5; exported
    with ``llmarch convert`` to one model.safetensors holding the same weights."""
    from llmarch.checkpoint import load_model
    from llmarch.cli import main
    from llmarch.train.checkpoints import is_sharded

    launch(tmp_path, cache, "dcp")
    got = json.loads((tmp_path / "dcp.json").read_text())
    assert got["cut"] == got["whole"] and len(got["whole"]) == 3
    assert max(abs(a - b) for a, b in zip(got["cut_tp"], got["whole"])) < 1e-5, got
    train(TINY, settings(tmp_path / "cut_one", cache, steps=3, grad_accum=2, resume=True))  # the same global batch
    one = [r["loss"] for r in read_metrics(tmp_path / "cut_one")]
    # bit-for-bit: one process with 2 micro-batches sums the same two gradients dp=2 does (scaled by powers of 2)
    assert one == got["whole"], (one, got["whole"])
    step3 = tmp_path / "cut" / "checkpoints" / "step_00000003"
    assert is_sharded(step3)
    assert main(["convert", str(step3), str(tmp_path / "export")]) == 0
    assert (tmp_path / "export" / "model.safetensors").is_file()
    exported, sharded = load_model(tmp_path / "export").state_dict(), load_model(step3).state_dict()
    assert exported.keys() == sharded.keys()
    assert all((exported[k] == v).all() for k, v in sharded.items())


def test_pipeline_parallel_in_the_loop_equals_one_process(tmp_path, cache):
    """``--pp 2`` (1F1B, 2 micro-batches; cut at step 2 and resumed from its sharded checkpoint) and the
    interleaved schedule (4 stages, 2 per rank, clipped): the losses, gradient norms, validation loss and updated
    weights of one process within 1e-5; a one-process checkpoint resumed on pp=2 continues the same run."""
    from llmarch.checkpoint import load_model

    train(TINY, settings(tmp_path / "one_cut", cache, steps=3, eval_every=3, stop_at=2))  # resumed on pp=2
    launch(tmp_path, cache, "pp")
    for run, cfg, extra in (("pp_1f1b", TINY, {}), ("pp_interleaved", TINY.replace(n_layers=4), dict(clip=0.05))):
        train(cfg, settings(tmp_path / f"one_{run}", cache, steps=3, eval_every=3, save_every=3, **extra))
        one, pp = read_metrics(tmp_path / f"one_{run}"), read_metrics(tmp_path / run)
        assert [r["step"] for r in pp] == [1, 2, 3]
        for key in ("loss", "grad_norm", "val_loss"):
            a = {r["step"]: r[key] for r in one if key in r}
            b = {r["step"]: r[key] for r in pp if key in r and r["step"] in a}  # (the cut run also validated at 2)
            a, b = list(a.values()), list(b.values())
            assert len(a) == len(b) > 0 and max(abs(x - y) for x, y in zip(a, b)) < 1e-5, (run, key, a, b)
        step3 = "checkpoints/step_00000003"
        w1 = load_model(tmp_path / f"one_{run}" / step3).state_dict()
        w2 = load_model(tmp_path / run / step3).state_dict()
        assert w1.keys() == w2.keys()
        assert max((w1[k] - w2[k]).abs().max().item() for k in w1) < 1e-5, run
    cut, whole = read_metrics(tmp_path / "one_cut"), read_metrics(tmp_path / "one_pp_1f1b")
    assert cut[-1]["step"] == 3 and abs(cut[-1]["loss"] - whole[-1]["loss"]) < 1e-5, (cut, whole)
