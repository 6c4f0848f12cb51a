"""Parallel axes on torch.distributed: mesh validation (in process); in one torchrun launch of 4 gloo processes
(tests/dist_checks.py) TP x FSDP2 on a 2-D mesh (without and with sequence parallel, and with kv copies), expert
parallel and pipeline parallel each equal to one process, and DCP save on one mesh / resume on another; on 2
processes TP with a tied head and with kv copies, and ``llmarch train --tp 2 --sp`` with one kv head."""
from __future__ import annotations

import pytest
import torch

import llmarch
from llmarch.train.parallel.mesh import MeshSpec, spec_for
from llmarch.train.parallel.tensor import Relayout, halves_layout, heads_layout
from tests.dist_util import launch

CHECKS = ["tp_fsdp", "tp_sp", "tp_kv_copies", "ep", "pp", "dcp"]  # ("tp", tensor parallel alone, runs on 2 processes)


def test_parallel_axes_equal_one_process():
    """One launch runs every check; each prints 'NAME: ok' after comparing losses and gradients within 1e-5."""
    launch("dist_checks.py", 4, [], CHECKS)


def test_tensor_parallel_tied_head_and_kv_copies_on_two_processes():
    """tp=2 with the LM head tied to the embedding (one vocabulary-sharded DTensor), and with one kv head for two
    tp ranks (copied, gradients summed): losses and gradients of one process within 1e-5 (and the gradient norm);
    the measured per-rank parameters, AdamW moments and saved activations of the tied run equal ``llmarch plan
    --mesh tp=2`` (activations within 2 %)."""
    launch("dist_checks.py", 2, [], ["tp_tied", "tp_kv_copies"])


LLAMA = llmarch.preset("llama-tiny", d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64)


@pytest.mark.parametrize("kwargs, message", [
    (dict(tp=3), "does not divide the world size"),
    (dict(dp=4, tp=2), "must equal the world size"),
    (dict(ep=2, world=2), "needs an MoE model"),
    (dict(pp=4, world=4), "n_layers: 2 is not divisible by pp = 4"),
])
def test_mesh_errors_name_the_field(kwargs, message):
    world = kwargs.pop("world", 4)
    with pytest.raises(ValueError, match=message):
        spec_for(LLAMA, world, **kwargs)


def test_mesh_fills_dp_and_checks_experts():
    assert spec_for(LLAMA, 8, tp=2, pp=2) == MeshSpec(2, 2, 1, 2)
    assert spec_for(LLAMA, 4, tp=4).tp == 4  # 2 kv heads, each copied on 2 tp ranks
    with pytest.raises(ValueError, match="n_kv_heads: 3 and tp = 2 must divide one another"):
        spec_for(LLAMA.replace(d_model=48, n_heads=12, n_kv_heads=3), 2, tp=2)
    moe = llmarch.preset("mixtral-tiny")
    assert spec_for(moe, 2, ep=2).ep == 2
    with pytest.raises(ValueError, match="ep must equal dp"):
        spec_for(moe, 4, ep=2)
    with pytest.raises(ValueError, match="moe.n_experts: 4 is not divisible by ep = 3"):
        spec_for(moe, 3, ep=3)


def test_relayouts_keep_each_ranks_heads_together():
    H, G, Dh, tp = 4, 2, 1, 2  # rows: q0 q1 q2 q3 k0 k1 v0 v1
    assert heads_layout(H, G, Dh, tp).tolist() == [0, 1, 4, 6, 2, 3, 5, 7]
    assert halves_layout(4, 2).tolist() == [0, 1, 4, 5, 2, 3, 6, 7]
    order = heads_layout(8, 2, 3, 2)
    r = Relayout({"w": order})
    w = torch.randn(len(order), 5)
    assert torch.equal(r.to_natural("w", r.to_parallel("w", w)), w)
    assert torch.equal(r.to_parallel("other", w), w)
    copies = heads_layout(4, 1, 1, 2)  # one kv head (rows 4, 5) copied on both ranks
    assert copies.tolist() == [0, 1, 4, 5, 2, 3, 4, 5]
    r, w = Relayout({"w": copies}), torch.randn(6, 3)
    assert r.to_parallel("w", w).shape == (8, 3) and torch.equal(r.to_natural("w", r.to_parallel("w", w)), w)


def test_train_verb_with_tensor_parallel_matches_one_process(tmp_path):
    """``llmarch train --nproc 2 --tp 2 --sp`` with one kv head (copied on both ranks; both ranks read the same
    batch of 4, each keeps half of every sequence between the tensor-parallel layers; gradients clipped at 1.0):
    the losses and gradient norms of one process; its checkpoint holds the natural layout (the same weights as one process's),
    sharded by DCP and read back as one model."""
    from llmarch.train import train
    from llmarch.train.metrics import read_metrics
    from tests.test_train_distributed import MODEL_ARGS, losses, torchrun
    from tests.train_util import TINY, settings

    one_kv = TINY.replace(n_kv_heads=1)
    train(one_kv, settings(tmp_path / "one", tmp_path / "cache", steps=4, batch_size=4, eval_every=2))
    torchrun(tmp_path / "tp", tmp_path / "cache", "--tp", "2", "--sp", "--batch-size", "4",
             model_args=MODEL_ARGS + ["--set", "n_kv_heads=1"])
    a, b = losses(read_metrics(tmp_path / "one")), losses(read_metrics(tmp_path / "tp"))
    assert len(a) == len(b) == 6
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-5, (a, b)
    norms = [[r["grad_norm"] for r in read_metrics(tmp_path / run)] for run in ("one", "tp")]
    assert max(abs(x - y) for x, y in zip(*norms)) < 1e-5, norms  # the kv copies counted once
    one = llmarch.train.checkpoints.load_checkpoint(tmp_path / "one" / "checkpoints" / "step_00000004")
    step4 = tmp_path / "tp" / "checkpoints" / "step_00000004"
    assert llmarch.train.checkpoints.is_sharded(step4)  # written by both ranks with DCP
    two = llmarch.checkpoint.load_model(step4).state_dict()
    for k, v in one["model"].items():
        assert (v - two[k]).abs().max() < 1e-4, k


def test_plan_mesh_per_rank_figures(capsys):
    """``llmarch plan --mesh``: tp splits the projections, embedding and head; FSDP2 divides what is left by dp;
    the bad mesh is a one-line error naming the field. (Measured per-rank parameters and Adam state of the
    torchrun checks are compared with these formulas in tests/dist_checks.py.)"""
    import json

    from llmarch.analysis.parallel_plan import mesh_plan, rank_params
    from llmarch.cli import main

    cfg = LLAMA.replace(vocab_size=128)
    assert rank_params(cfg, tp=2, fsdp=False) == (26784 - 160) // 2 + 160  # norms stay replicated
    assert rank_params(cfg, dp=2, tp=2) == rank_params(cfg, tp=2, fsdp=False) // 2
    one, two = mesh_plan(cfg, 16, 4, dp=1), mesh_plan(cfg, 16, 4, dp=1, tp=2)
    assert two["activations"] < one["activations"] and two["comm_tp"] > 0 == one["comm_tp"]
    assert main(["plan", "llama-2-7b", "--mesh", "dp=8,tp=8", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["world"] == 64 and out["params"] < 7e9 / 64 * 1.1
    assert main(["plan", "llama-2-7b", "--mesh", "tp=3"]) != 0
    assert "n_heads: 32 is not divisible by tp = 3" in capsys.readouterr().err
    sp = mesh_plan(cfg, 16, 4, tp=2, sp=True)  # measured in benchmarks/parallel_memory.py
    assert sp["activations"] < two["activations"] and sp["activations_checkpointed"] < sp["activations"]
    assert main(["plan", "llama-2-7b", "--mesh", "dp=2", "--sp"]) != 0
    assert "--sp: sequence parallel needs tp >= 2" in capsys.readouterr().err


def test_train_settings_refuse_meshes_the_loop_cannot_run(tmp_path):
    from llmarch.train import TrainConfig
    from llmarch.train.parallel.apply import mesh_spec

    with pytest.raises(ValueError, match="tp: must be a positive integer"):
        TrainConfig(out=str(tmp_path), tp=0)
    tc = TrainConfig(out=str(tmp_path), seq_len=31, sequence_parallel=True, tp=2, parallel="fsdp")
    with pytest.raises(ValueError, match="sequence_parallel: .* divisible by tp"):
        mesh_spec(LLAMA, 4, tc)
    with pytest.raises(ValueError, match="parallel: .* add --parallel fsdp"):
        mesh_spec(LLAMA, 4, TrainConfig(out=str(tmp_path), tp=2))
    with pytest.raises(ValueError, match="pp: pipeline stages compose with data parallel"):
        mesh_spec(LLAMA, 4, TrainConfig(out=str(tmp_path), pp=2, tp=2))
    with pytest.raises(ValueError, match="microbatches: 3 must divide --batch-size 8"):
        mesh_spec(LLAMA, 2, TrainConfig(out=str(tmp_path), pp=2, microbatches=3))
    with pytest.raises(ValueError, match="pp_schedule: 'zigzag' is not one of"):
        mesh_spec(LLAMA, 2, TrainConfig(out=str(tmp_path), pp=2, pp_schedule="zigzag"))
    with pytest.raises(ValueError, match="n_layers: 2 is not divisible by the 4 stages of pp = 2 with the 'inter"):
        mesh_spec(LLAMA, 2, TrainConfig(out=str(tmp_path), pp=2, pp_schedule="interleaved"))
    with pytest.raises(ValueError, match="pp: .* --grad-accum 1"):
        mesh_spec(LLAMA, 2, TrainConfig(out=str(tmp_path), pp=2, grad_accum=2))
    with pytest.raises(ValueError, match="tie_embeddings"):
        mesh_spec(LLAMA.replace(tie_embeddings=True), 2, TrainConfig(out=str(tmp_path), pp=2))
    assert mesh_spec(LLAMA, 4, TrainConfig(out=str(tmp_path), pp=2)) == MeshSpec(2, 1, 1, 2)
    assert mesh_spec(LLAMA, 4, TrainConfig(out=str(tmp_path), tp=2, parallel="fsdp")) == MeshSpec(2, 2, 1, 1)


def test_sharded_checkpoint_refuses_non_finite_shards():
    """Every rank checks its own shards before a sharded save and all refuse together (counts summed)."""
    from llmarch.train.finite import NonFiniteError, check_shards

    good = {"w": torch.ones(2)}
    check_shards(good, 3, lambda n: n)  # no bad tensor on any rank
    with pytest.raises(NonFiniteError, match="step 3: a weight on another rank holds NaN"):
        check_shards(good, 3, lambda n: n + 1)  # another rank found one
    with pytest.raises(NonFiniteError, match="weight w holds NaN"):
        check_shards({"w": torch.tensor([float("nan")])}, 3, lambda n: n)
