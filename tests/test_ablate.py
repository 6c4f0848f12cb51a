"""Ablations: a small study end to end (report with one row per variant, a failed variant reported while the
others run, finished variants reused), the study spec, evaluation past a learned position table, and costs."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import llmarch
from llmarch.ablate import Study, Variant, apply_fields, load_study, runner
from llmarch.ablate.costs import _local
from llmarch.ablate.extrapolate import perplexity_at_lengths
from llmarch.cli import main as cli_main
from llmarch.train.objectives import OBJECTIVES

BASE = ["--preset", "llama-tiny", "--set", "d_model=32", "--set", "n_layers=2", "--set", "d_ff=64",
        "--set", "max_seq_len=64"]
TRAIN = ["--steps", "4", "--seq-len", "32", "--batch-size", "4", "--max-data-mb", "0.2", "--vocab-size", "400",
         "--eval-every", "2", "--eval-batches", "2", "--log-every", "1", "--lr", "3e-3", "--warmup", "1"]


def report_rows(path) -> list[list[str]]:
    """Data rows of the markdown table in report.md."""
    lines = [ln for ln in path.read_text().splitlines() if ln.startswith("| ")]
    return [[c.strip() for c in ln.strip("|").split(" | ")] for ln in lines[1:]]


def test_study_runs_reports_failures_and_reuses_finished_variants(tmp_path, capsys, monkeypatch):
    out, cache = tmp_path / "study", tmp_path / "cache"
    argv = ["ablate", *BASE, "--vary", "norm=rmsnorm,layernorm", "--variant", "bad:n_heads=3,d_ff=64", *TRAIN,
            "--cache-dir", str(cache), "--eval-lengths", "32,64", "--out", str(out), "--no-progress"]
    assert cli_main(argv) == 1  # one variant failed; the study still ran the others
    printed = capsys.readouterr().out
    rows = report_rows(out / "report.md")
    assert [r[0] for r in rows] == ["bad", "norm=rmsnorm", "norm=layernorm"]
    assert rows[0][1].startswith("failed (config): n_heads: must divide d_model")
    assert "n_heads: must divide d_model" in printed
    for r in rows[1:]:
        assert r[1] == "ok" and float(r[7]) > 0 and float(r[9]) > 1 and float(r[10]) > 1  # val loss, ppl@32/64
    results = {n: runner.read_result(out / "variants" / n) for n in ("norm=rmsnorm", "norm=layernorm")}
    for r in results.values():
        assert r["steps"] == 4 and [s for s, _ in r["val_curve"]] == [2, 4] and r["tokens_per_s"] > 0
        assert r["params"] == sum(p.numel() for p in llmarch.build(
            apply_fields(llmarch.preset("llama-tiny"), {"d_model": 32, "n_layers": 2, "d_ff": 64, "max_seq_len": 64,
                                                        "vocab_size": 400, "norm": r["name"].split("=")[1]})
        ).parameters())
        assert r["ppl_at"]["32"] == pytest.approx(r["final_ppl"], rel=1e-5)  # same windows as validation
    assert results["norm=rmsnorm"]["val_curve"] != results["norm=layernorm"]["val_curve"]
    assert (out / "loss_curves.png").stat().st_size > 1000 and (out / "extrapolation.png").is_file()

    # second run: the finished variants are not trained again; the failed one is tried (and fails) again
    stamps = {n: (out / "variants" / n / "run" / "metrics.jsonl").stat().st_mtime_ns for n in results}

    def no_training(*a, **k):
        raise AssertionError("a finished variant was trained again")

    monkeypatch.setattr(runner, "Trainer", no_training)
    assert cli_main(argv) == 1
    printed = capsys.readouterr().out
    assert "reused finished variant(s): norm=rmsnorm, norm=layernorm" in printed
    assert report_rows(out / "report.md") == rows
    assert stamps == {n: (out / "variants" / n / "run" / "metrics.jsonl").stat().st_mtime_ns for n in results}


def test_study_file_and_variant_fields(tmp_path):
    spec = tmp_path / "ffn.yaml"
    spec.write_text("name: ffn\nclaim: SwiGLU beats GELU\npreset: llama-tiny\nset: {d_model: 64, n_layers: 2}\n"
                    "train: {steps: 5, seq_len: 32}\neval_lengths: [32, 64]\nvariants:\n"
                    "  swiglu: {ffn: glu, activation: silu, d_ff: '176'}\n"
                    "  gelu: {ffn: mlp, activation: gelu, d_ff: 256}\n"
                    "  post-nowarm: {norm_placement: post, train.warmup: 0}\n"
                    "vary: {n_kv_heads: [1, 4]}\n")
    study = load_study(spec)
    assert [v.name for v in study.variants] == ["swiglu", "gelu", "post-nowarm", "n_kv_heads=1", "n_kv_heads=4"]
    assert study.eval_lengths == (32, 64) and study.train == {"steps": 5, "seq_len": 32}
    cfg = study.variant_config(study.variants[0])
    assert (cfg.ffn, cfg.d_ff, cfg.d_model) == ("glu", 176, 64)  # string converted to the field's type
    assert study.variant_config(study.variants[3]).kv_heads == 1
    assert study.train_settings(study.variants[2]) == {"steps": 5, "seq_len": 32, "warmup": 0}
    assert apply_fields(cfg, {"rope.theta": "5e5"}).rope.theta == 5e5
    moe = study.variant_config(Variant("moe", {"ffn": "moe", "moe": {"n_experts": 8, "top_k": 2}}))
    assert (moe.ffn, moe.moe.n_experts, moe.moe.top_k) == ("moe", 8, 2)  # fields that must change together
    with pytest.raises(ValueError, match="unknown config field 'experts'"):
        study.variant_config(Variant("moe", {"ffn": "moe", "experts": 8}))
    spec.write_text("preset: llama-tiny\nvariants: {a: {norm: rmsnorm}}\ntrian: {steps: 3}\n")
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['trian'\]"):
        load_study(spec)
    with pytest.raises(ValueError, match="chosen by the ablation runner"):
        Study("llama-tiny", (Variant("a", {}, {"resume": True}),))
    with pytest.raises(ValueError, match="unique"):
        Study("llama-tiny", (Variant("a"), Variant("a")))


def test_longer_lengths_refused_past_a_learned_table():
    torch.manual_seed(0)
    base = llmarch.preset("llama-tiny").replace(d_model=32, n_layers=2, d_ff=64, vocab_size=300, max_seq_len=32)
    tokens = np.random.default_rng(0).integers(0, 300, size=2000).astype(np.uint16)
    obj = OBJECTIVES["causal_lm"](None, 300)  # next-token loss needs no tokenizer
    learned = llmarch.build(base.replace(position="learned"))
    with pytest.raises(ValueError, match="past the learned position table"):
        learned(torch.zeros(1, 64, dtype=torch.long))  # the model itself cannot read 64 tokens
    got = perplexity_at_lengths(learned, obj, tokens, [16, 32, 64, 128], token_budget=256, batch_size=4)
    assert got[64] == got[128] == "n/a: learned table has 32 positions"
    # the perplexity at 16: the mean next-token loss over the first 256 // 16 windows, computed by hand
    windows = torch.from_numpy(tokens[:17 * 16].astype(np.int64)).view(16, 17)
    with torch.no_grad():
        logits = learned(windows[:, :-1]).logits
    want = torch.nn.functional.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten()).exp()
    assert got[16] == pytest.approx(float(want), rel=1e-5)
    alibi = llmarch.build(base.replace(position="alibi"))
    got = perplexity_at_lengths(alibi, obj, tokens, [32, 128], token_budget=256, batch_size=4)
    assert all(isinstance(got[L], float) and got[L] > 1 for L in (32, 128))
    got = perplexity_at_lengths(alibi, obj, tokens[:100], [128], token_budget=256)
    assert got[128].startswith("n/a: the validation split has 100 tokens")


def test_local_costs():
    cfg = llmarch.preset("llama-tiny").replace(d_model=64, n_layers=2, n_heads=4, n_kv_heads=4, d_ff=128,
                                               vocab_size=300)
    mha, gqa = _local(cfg, 32), _local(cfg.replace(n_kv_heads=1), 32)
    assert mha["params"] == sum(p.numel() for p in llmarch.build(cfg).parameters())
    assert mha["kv_bytes_per_token"] == 2 * 2 * 4 * 16 * 2 and gqa["kv_bytes_per_token"] == 2 * 2 * 1 * 16 * 2
    assert mha["attn_flops_per_token"] == 4 * 4 * 16 * 32 * 2
    # causal attention uses (T + 1) / 2T of the T x T matrix; a window of 8 uses far less
    assert mha["attn_flops_useful"] == pytest.approx(mha["attn_flops_per_token"] * 33 / 64)
    sliding = _local(cfg.replace(pattern=("sliding",), window=8), 32)
    assert sliding["attn_flops_useful"] < 0.3 * mha["attn_flops_per_token"]
    assert json.dumps(sliding)  # results are written as JSON
