"""Run under torchrun (2 gloo processes) by tests/test_parallel_train.py: each named check runs the training loop
(``llmarch.train.train``, several runs in one process group) on a parallel mesh and writes what the test compares
into DIR. Usage: torchrun --nproc_per_node 2 tests/dist_train_checks.py DIR CACHE CHECK [CHECK ...] (CACHE: a token
cache the test has filled)."""
from __future__ import annotations

import json
import os
import shutil
import sys
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

from llmarch.train import train
from llmarch.train.metrics import read_metrics
from tests.train_util import TINY, settings

CHECKS = {}


def check(fn):
    CHECKS[fn.__name__] = fn
    return fn


def losses(run: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(run)]


def on_main(fn) -> None:
    if dist.get_rank() == 0:
        fn()
    dist.barrier()


@check
def dcp(tmp: Path, cache: Path) -> None:
    """FSDP2 (dp=2) saves sharded at step 2; it resumes on dp=2 and on tp=2; the loaded tp=2 state is the saved
    one bit-for-bit. Writes the losses and the cut run (for the one-process resume of the test)."""
    from llmarch.train.checkpoints import is_sharded
    from llmarch.train.distributed import full_state
    from llmarch.train.loop import Trainer
    from llmarch.train.parallel.dcp import read_model_state
    from llmarch.model import build

    train(TINY, settings(tmp / "whole", cache, steps=3, parallel="fsdp"))
    train(TINY, settings(tmp / "cut", cache, steps=3, parallel="fsdp", stop_at=2))
    step2 = tmp / "cut" / "checkpoints" / "step_00000002"
    assert is_sharded(step2) and not (step2 / "model.safetensors").exists()
    on_main(lambda: [shutil.copytree(tmp / "cut", tmp / name) for name in ("cut_tp", "cut_one")])
    train(TINY, settings(tmp / "cut", cache, steps=3, parallel="fsdp", resume=True))
    # tp=2 leaves dp=1: 8 sequences per rank keep the global batch of dp=2 x 4
    tc = settings(tmp / "cut_tp", cache, steps=3, parallel="fsdp", tp=2, batch_size=8, resume=True)
    trainer = Trainer(TINY, tc)
    loaded = full_state(trainer.model, trainer.optimizer)[0]
    if dist.get_rank() == 0:
        saved = read_model_state(step2 / "sharded", build(trainer.cfg))
        worst = max((loaded[k] - v).abs().max().item() for k, v in saved.items())
        assert worst == 0.0, f"the state loaded on tp=2 differs from the saved one by {worst}"
    trainer.run()
    out = {name: losses(tmp / name) for name in ("whole", "cut", "cut_tp")}
    on_main(lambda: (tmp / "dcp.json").write_text(json.dumps(out)))


@check
def pp(tmp: Path, cache: Path) -> None:
    """Pipeline parallel in the loop: 2 stages under 1F1B (2 layers), and 4 stages (2 per rank) under the
    interleaved schedule with gradient clipping; the test compares them with one process. A run saved on the
    1F1B stages resumes on them (sharded checkpoint, stage names mapped to the whole model's), and so does a
    one-process run's full checkpoint."""
    train(TINY, settings(tmp / "pp_1f1b", cache, steps=3, pp=2, microbatches=2, eval_every=3, stop_at=2))
    train(TINY, settings(tmp / "pp_1f1b", cache, steps=3, pp=2, microbatches=2, eval_every=3, resume=True))
    # a one-process (full) checkpoint written by the test, resumed on the stages
    train(TINY, settings(tmp / "one_cut", cache, steps=3, pp=2, microbatches=2, eval_every=3, resume=True))
    from llmarch.train.loop import Trainer
    from tests.dist_checks import check_plan

    deep = TINY.replace(n_layers=4)
    trainer = Trainer(deep, settings(tmp / "pp_interleaved", cache, steps=3, pp=2, pp_schedule="interleaved",
                                     microbatches=4, eval_every=3, clip=0.05))
    trainer.run()
    # llmarch plan --mesh pp=2: the largest rank's parameters and AdamW moments, measured on the stages
    check_plan("pp_interleaved", trainer.cfg, trainer.model.parameters(), trainer.optimizer, pp=2, fsdp=False)


@check
def pp_dp(tmp: Path, cache: Path) -> None:
    """4 processes: pp=2 x dp=2 (replicas, then FSDP2 shards of each stage), 2 sequences per data-parallel rank
    (the global batch of 4); compare with one process by hand (docs/distributed.md)."""
    for parallel in ("ddp", "fsdp"):
        train(TINY, settings(tmp / f"pp_{parallel}", cache, steps=3, pp=2, batch_size=2, microbatches=2,
                             eval_every=3, parallel=parallel))


if __name__ == "__main__":
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    try:
        for name in sys.argv[3:]:
            CHECKS[name](Path(sys.argv[1]), Path(sys.argv[2]))
            on_main(lambda: print(f"{name}: ok", flush=True))
    except BaseException:  # fail now: the other rank may be waiting in a collective this one never reaches
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    dist.barrier()
    dist.destroy_process_group()
