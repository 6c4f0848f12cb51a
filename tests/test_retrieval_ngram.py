"""The hashed n-gram chunk embedder: an exact duplicate is its own nearest neighbour, a near-duplicate outranks
unrelated chunks, the vectors are the same in another process, and an index records the embedder so that
`embedder_for` and `llmarch index build` rebuild it."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from llmarch.cli import main
from llmarch.retrieval import ChunkIndex, HashedNgramEmbedder, embedder_for

ROOT = Path(__file__).resolve().parents[1]
DIGEST = "import hashlib, numpy as np; from llmarch.retrieval import HashedNgramEmbedder; " \
         "x = np.arange(256).reshape(8, 32) * 7 % 251; " \
         "print(hashlib.sha256(HashedNgramEmbedder(128, 4)(x).tobytes()).hexdigest())"


def chunks(n: int = 200, m: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(1, 256, size=(n, m))


def test_vectors_are_unit_length_and_bag_of_ngrams():
    embed = HashedNgramEmbedder(dim=256, max_n=4)
    x = chunks(20)
    v = embed(x)
    assert v.shape == (20, 256) and v.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    # bag of n-grams: a chunk and its two halves swapped differ only in the n-grams that straddle the cut
    swapped = np.concatenate([x[:, 16:], x[:, :16]], axis=1)
    cos = (embed(swapped) * v).sum(1)
    assert (cos > 0.8).all() and (cos < 1 - 1e-4).all()


def test_duplicate_is_nearest_and_near_duplicate_outranks_unrelated(tmp_path):
    embed = HashedNgramEmbedder(dim=512)
    corpus = chunks(300)
    index = ChunkIndex.create(tmp_path / "idx", dim=embed.dim, chunk_size=32, embedder=embed.meta)
    index.add_embedded(corpus, np.zeros_like(corpus), embed(corpus))
    ids, scores = index.search(embed(corpus[:50]), 1)
    np.testing.assert_array_equal(ids[:, 0], np.arange(50))  # an exact duplicate is its own nearest neighbour
    np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-5)
    near = corpus[:50].copy()
    rng = np.random.default_rng(1)
    for row in near:  # change 3 of 32 tokens
        row[rng.choice(32, 3, replace=False)] = rng.integers(1, 256, 3)
    ids, scores = index.search(embed(near), 2)
    np.testing.assert_array_equal(ids[:, 0], np.arange(50))
    assert (scores[:, 0] > 0.5).all() and (scores[:, 0] > scores[:, 1] + 0.3).all()


def test_deterministic_across_processes():
    import hashlib

    x = np.arange(256).reshape(8, 32) * 7 % 251
    here = hashlib.sha256(HashedNgramEmbedder(128, 4)(x).tobytes()).hexdigest()
    out = subprocess.run([sys.executable, "-c", DIGEST], capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(ROOT / "src"), "PYTHONHASHSEED": "123"})
    assert out.stdout.strip() == here


def test_index_records_the_embedder(tmp_path):
    embed = HashedNgramEmbedder(dim=64, max_n=3, pad_id=0)
    corpus = chunks(40, m=16)
    index = ChunkIndex.create(tmp_path / "idx", dim=64, chunk_size=16, embedder=embed.meta)
    index.add(corpus.reshape(-1), embed)
    again = embedder_for(ChunkIndex.load(tmp_path / "idx"))
    assert isinstance(again, HashedNgramEmbedder) and (again.dim, again.max_n, again.pad_id) == (64, 3, 0)
    np.testing.assert_array_equal(again(corpus), embed(corpus))
    with pytest.raises(ValueError, match="dim"):
        ChunkIndex.create(tmp_path / "bad", dim=32, chunk_size=16, embedder=embed.meta)
    with pytest.raises(ValueError, match="max_n"):
        HashedNgramEmbedder(dim=64, max_n=0)


def test_cli_builds_an_ngram_index_by_default(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.py").write_text("def add(a, b):\n    return a + b\n" * 20 + "class Point:\n    x: int = 0\n" * 10)
    out = tmp_path / "idx"
    assert main(["index", "build", "--data", str(data), "--out", str(out), "--chunk-size", "16",
                 "--ngram-dim", "128", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["dim"] == 128
    index = ChunkIndex.load(out)
    assert index.meta["embedder"] == "ngram" and not (out / "encoder").exists()
    q = index.neighbours(np.arange(5))[:, :16]
    np.testing.assert_allclose(index.search(embedder_for(index)(q), 1)[1][:, 0], 1.0, atol=1e-5)
