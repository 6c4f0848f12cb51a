"""End to end: `llmarch index build` / `info` on a small text directory, and a few steps of the RETRO-vs-base
comparison (examples/retro_vs_base.py) on the standard-library corpus: the pipeline runs and retrieval changes
the RETRO model's predictions."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import torch

from llmarch.cli import main
from llmarch.retrieval import ChunkIndex, embedder_for

ROOT = Path(__file__).resolve().parents[1]


def test_index_build_and_info(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.py").write_text("def add(a, b):\n    return a + b\n" * 20)
    (data / "b.py").write_text("class Point:\n    x: int = 0\n    y: int = 0\n" * 10)
    out = tmp_path / "idx"
    assert main(["index", "build", "--data", str(data), "--out", str(out), "--chunk-size", "16",
                 "--encoder-preset", "dpr-tiny", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["files"] == 2 and info["chunks"] == info["tokens"] // 16 and info["dim"] == 64
    index = ChunkIndex.load(out)
    raw = (data / "a.py").read_bytes() + b"\n" + (data / "b.py").read_bytes() + b"\n"
    assert bytes(index.neighbours(np.array([3]))[0, :16].astype(np.uint8)) == raw[48:64]
    embed = embedder_for(index)  # the stored frozen encoder embeds queries exactly like the chunks
    chunks = index.neighbours(np.arange(5))[:, :16]
    np.testing.assert_allclose(index.search(embed(chunks), 1)[1][:, 0], 1.0, atol=1e-5)  # itself (or a copy)
    assert main(["index", "info", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["count"] == info["chunks"]
    assert main(["index", "build", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "x")]) == 2
    assert main(["index", "build", "--data", str(data), "--out", str(out)]) == 2  # already holds an index


def test_retro_vs_base_pipeline_runs_and_retrieval_matters(tmp_path):
    spec = importlib.util.spec_from_file_location("retro_vs_base", ROOT / "examples" / "retro_vs_base.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    torch.manual_seed(0)
    res = example.run(steps=2, train_bytes=30_000, val_bytes=2_000, batch=2, seq=64, d_model=32,
                      workdir=str(tmp_path))
    assert res["chunks_indexed"] == 30_000 // 32
    assert np.isfinite(res["base_val_loss"]) and np.isfinite(res["retro_val_loss"])
    assert res["params_retro"] > res["params_base"]
    assert res["retro_val_loss"] != res["retro_val_loss_retrieval_off"]  # the neighbours change predictions
