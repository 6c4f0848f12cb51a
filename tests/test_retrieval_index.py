"""The faiss chunk index: chunking with continuations, exact (flat) search equal to brute force in numpy and torch,
ivf with every cell probed equal to flat, exclusion ranges, memmapped tokens and a save/load round trip."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import llmarch
from llmarch.retrieval import ChunkIndex, EncoderEmbedder, chunk_stream


@pytest.fixture(scope="module")
def embedder():
    torch.manual_seed(0)
    cfg = llmarch.preset("bert-tiny").replace(vocab_size=300, d_model=32, n_heads=4, d_ff=64, dropout=0.0,
                                              attn_dropout=0.0, head="mlm")
    return EncoderEmbedder(llmarch.build(cfg))


def stream(n: int, seed: int = 0) -> np.ndarray:
    """A token stream with repeats, so some chunks have close neighbours."""
    rng = np.random.default_rng(seed)
    base = rng.integers(1, 300, size=n)
    half = min(256, n // 2)
    base[n // 2:n // 2 + half] = base[:half]
    return base


def test_chunks_and_continuations():
    toks = np.arange(1, 11 * 4 + 3)  # 11 chunks of 4 and a tail of 2
    chunks, following = chunk_stream(toks, 4, pad_id=0)
    assert chunks.shape == (11, 4) and following.shape == (11, 4)
    assert chunks[3].tolist() == [13, 14, 15, 16] and following[3].tolist() == [17, 18, 19, 20]
    assert following[-1].tolist() == [45, 46, 0, 0]  # the tail, padded


def assert_top_k(ids, scores, brute, largest: bool = True, tol: float = 1e-5):
    """The returned ids carry the brute-force top-k scores, in order (equal scores may come in any order), and the
    returned scores are the brute-force scores of those ids."""
    k = ids.shape[1]
    want = -np.sort(-brute, axis=1)[:, :k] if largest else np.sort(brute, axis=1)[:, :k]
    got = np.take_along_axis(brute, ids, 1)
    np.testing.assert_allclose(got, want, atol=tol, rtol=0)
    np.testing.assert_allclose(scores, got, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_flat_search_equals_brute_force(tmp_path, embedder, metric):
    toks = stream(64 * 40)
    index = ChunkIndex.create(tmp_path / "idx", dim=embedder.dim, chunk_size=64, kind="flat", metric=metric)
    assert index.add(toks, embedder, batch_size=16) == 40
    chunks, _ = chunk_stream(toks, 64)
    db = embedder(chunks)  # [C, D]
    queries = embedder(chunk_stream(stream(64 * 7, seed=3), 64)[0])
    ids, scores = index.search(queries, k=5)
    if metric == "ip":
        brute = queries.astype(np.float64) @ db.T.astype(np.float64)  # numpy
    else:
        brute = (torch.cdist(torch.from_numpy(queries).double(), torch.from_numpy(db).double()) ** 2).numpy()  # torch
    assert_top_k(ids, scores, brute, largest=metric == "ip")


def test_ivf_probing_every_cell_equals_flat(tmp_path, embedder):
    toks = stream(64 * 120)
    flat = ChunkIndex.create(tmp_path / "flat", dim=embedder.dim, kind="flat")
    flat.add(toks, embedder)
    ivf = ChunkIndex.create(tmp_path / "ivf", dim=embedder.dim, kind="ivf", nlist=3, nprobe=3)
    ivf.add(toks, embedder)
    hnsw = ChunkIndex.create(tmp_path / "hnsw", dim=embedder.dim, kind="hnsw", hnsw_m=16)
    hnsw.add(toks, embedder)
    q = embedder(chunk_stream(toks, 64)[0][:30])
    brute = q @ embedder(chunk_stream(toks, 64)[0]).T
    assert_top_k(*flat.search(q, 4), brute)
    assert_top_k(*ivf.search(q, 4), brute)  # every cell probed: exact
    top1 = hnsw.search(q, 1)[1][:, 0]
    assert (np.abs(top1 - brute.max(1)) < 1e-5).mean() >= 0.9  # approximate, but finds (a copy of) itself


def test_exclusion_ranges_and_neighbour_tokens(tmp_path, embedder):
    toks = stream(64 * 30)
    index = ChunkIndex.create(tmp_path / "idx", dim=embedder.dim)
    index.add(toks, embedder)
    chunks, following = chunk_stream(toks, 64)
    own = np.arange(5, 11)  # chunks with no exact copy in the stream
    q = embedder(chunks[own])
    ids, _ = index.search(q, 3)
    assert ids[:, 0].tolist() == own.tolist()  # each chunk's best match is itself
    exclude = np.stack([own - 1, own + 2], axis=1)
    ids_x, scores_x = index.search(q, 3, exclude=exclude)
    assert not ((ids_x >= exclude[:, :1]) & (ids_x < exclude[:, 1:])).any()
    brute = q @ embedder(chunks).T
    for row, i in enumerate(own):
        brute[row, i - 1:i + 2] = -np.inf
    assert_top_k(ids_x, scores_x, brute)
    nb = index.neighbours(ids_x)  # [6, 3, 128]: chunk + continuation
    assert nb.shape == (6, 3, 128)
    np.testing.assert_array_equal(nb[2, 1], np.concatenate([chunks[ids_x[2, 1]], following[ids_x[2, 1]]]))
    assert (index.neighbours(np.array([-1])) == 0).all()


def test_save_load_and_add(tmp_path, embedder):
    toks = stream(64 * 20)
    index = ChunkIndex.create(tmp_path / "idx", dim=embedder.dim, kind="ivf", nlist=2, nprobe=2)
    index.add(toks[:64 * 12], embedder)
    index.add(toks[64 * 12:], embedder)
    again = ChunkIndex.load(tmp_path / "idx")
    assert len(again) == 20 and again.meta["kind"] == "ivf"
    q = embedder(chunk_stream(toks, 64)[0][::3])
    np.testing.assert_array_equal(again.search(q, 3)[0], index.search(q, 3)[0])
    np.testing.assert_array_equal(again.neighbours(np.array([13]))[0, :64], toks[13 * 64:14 * 64])


def test_errors(tmp_path, embedder):
    with pytest.raises(ValueError, match="kind"):
        ChunkIndex.create(tmp_path / "a", dim=8, kind="lsh")
    index = ChunkIndex.create(tmp_path / "b", dim=embedder.dim + 1)
    with pytest.raises(ValueError, match="search"):
        index.search(np.zeros((1, embedder.dim + 1)), 1)
    with pytest.raises(ValueError, match="dim"):
        index.add(stream(256), embedder)
    with pytest.raises(ValueError, match="already holds"):
        ChunkIndex.create(tmp_path / "b", dim=4)
