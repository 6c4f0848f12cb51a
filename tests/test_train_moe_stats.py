"""MoE training logs its routing: the aux loss is in the loss and the log, metrics.jsonl carries moe_metrics, and
RUN/expert_load.json (tokens per expert per layer since the last log) feeds `llmarch plot experts`."""
from __future__ import annotations

import json
import math

import pytest

import llmarch
from llmarch.cli import main
from llmarch.train import train
from llmarch.train.metrics import read_metrics
from tests.train_util import settings  # noqa: F401  (fixture)

E, K = 4, 2
CFG = llmarch.preset("mixtral-tiny").replace(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=32,
                                             max_seq_len=64, moe=dict(n_experts=E, top_k=K, capacity_factor=0.5))


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def test_moe_run_logs_load_and_plot_reads_it(tmp_path, cache):
    run = tmp_path / "run"
    tc = settings(run, cache, steps=3, eval_every=3, log_every=1, batch_size=4, seq_len=32)
    train(CFG, tc)
    records = read_metrics(run)
    assert [r["step"] for r in records] == [1, 2, 3]
    for r in records:
        assert r["aux_loss"] > 0  # balance loss, added to the training loss
        assert 0 < r["moe_dropped_fraction"] < 1 and r["moe_max_load_ratio"] >= 1.0
        assert set(r) >= {"moe_load_entropy", "moe_router_entropy", "moe_balance_loss", "moe_z_loss"}
    load = json.loads((run / "expert_load.json").read_text())
    assert load["layers"] == ["decoder.0", "decoder.1"] and load["step"] == 3 and load["forwards"] == 1
    tokens = tc.batch_size * tc.seq_len  # one step of one micro-batch since the previous log
    for routed, kept, dropped in zip(load["tokens_per_expert"], load["kept_per_expert"], load["dropped_fraction"]):
        assert len(routed) == E and sum(routed) == tokens * K
        capacity = math.ceil(0.5 * tc.seq_len * K / E)  # per sequence and expert
        assert all(k <= min(r, capacity * tc.batch_size) for r, k in zip(routed, kept))
        assert abs(dropped - (1 - sum(kept) / sum(routed))) < 1e-9 and dropped > 0
    assert main(["plot", "experts", "--checkpoint", str(run), "-o", str(tmp_path / "x.png")]) == 0
    assert (tmp_path / "x.png").stat().st_size > 1000


def test_dense_run_writes_no_expert_load(tmp_path, cache):
    run = tmp_path / "run"
    train(CFG.replace(ffn="glu", moe=None), settings(run, cache, steps=1, eval_every=1))
    assert not (run / "expert_load.json").exists()
    assert not any(k.startswith("moe_") for r in read_metrics(run) for k in r)
