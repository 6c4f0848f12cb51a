"""Retrieval benchmark: faiss index build and query throughput (flat vs ivf vs hnsw, with recall@10 against the
exact flat search), frozen-encoder chunk embedding throughput, and the RETRO training-step / forward overhead over
its base decoder (same decoder weights, neighbours given). transformers has no RETRO, so there is no HF column.

    PYTHONPATH=src python benchmarks/retrieval.py [--quick] [--threads 2]

Writes benchmarks/results/retrieval.json.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import limits, median_time, print_table, write_results  # noqa: E402

import llmarch  # noqa: E402
from llmarch.model import Model  # noqa: E402
from llmarch.retrieval import ChunkIndex, EncoderEmbedder  # noqa: E402


def index_rows(n: int, dim: int, n_queries: int, repeats: int) -> list[dict]:
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((256, dim)).astype(np.float32)  # clustered data, like real embeddings
    vecs = centers[rng.integers(0, 256, n)] + 0.5 * rng.standard_normal((n, dim)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    queries = vecs[rng.integers(0, n, n_queries)] + 0.1 * rng.standard_normal((n_queries, dim)).astype(np.float32)
    rows, exact = [], None
    for kind, opts in (("flat", {}), ("ivf", dict(nprobe=8)), ("hnsw", dict(hnsw_m=32))):
        with tempfile.TemporaryDirectory() as tmp:
            index = ChunkIndex.create(Path(tmp) / "i", dim=dim, chunk_size=4, kind=kind, **opts)
            tokens = np.zeros((n, 4), dtype=np.int32)
            t0 = time.perf_counter()
            index.add_embedded(tokens, tokens, vecs)  # train (ivf) + add + write to disk
            build = time.perf_counter() - t0
            t, _ = median_time(lambda: index.search(queries, 10), repeats=repeats)
            ids = index.search(queries, 10)[0]
        exact = ids if exact is None else exact
        recall = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, exact)]))
        rows.append(dict(kind=kind, vectors=n, dim=dim, build_s=build, build_vec_per_s=n / build,
                         query_per_s=n_queries / t, recall_at_10=recall))
    return rows


def embed_row(n_chunks: int, chunk: int, repeats: int) -> dict:
    torch.manual_seed(0)
    embed = EncoderEmbedder(llmarch.build(llmarch.preset("bert-tiny").replace(dropout=0.0, attn_dropout=0.0)))
    ids = np.random.default_rng(0).integers(0, 1024, (n_chunks, chunk))
    t, _ = median_time(lambda: embed(ids), repeats=repeats)
    return dict(encoder="bert-tiny (mean pool)", chunk=chunk, chunks_per_s=n_chunks / t)


def retro_rows(batch: int, seq: int, repeats: int) -> list[dict]:
    cfg = llmarch.preset("retro-tiny").replace(max_seq_len=seq)
    r = cfg.retrieval
    torch.manual_seed(0)
    retro = llmarch.build(cfg)
    base = Model(cfg.replace(retrieval=None))
    base.load_state_dict({k: v for k, v in retro.state_dict().items()
                          if ".cross" not in k and not k.startswith("neighbour_encoder")})
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq + 1))
    nb = torch.randint(0, cfg.vocab_size, (batch, seq // r.chunk_size, r.n_neighbours, r.neighbour_len))

    def step(model, **kw):
        logits = model(tokens[:, :-1], **kw).logits
        F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()

    rows = []
    for mode in ("train step", "forward"):
        times = {}
        for name, model, kw in (("base", base, {}), ("retro", retro, dict(neighbours=nb))):
            if mode == "forward":
                with torch.no_grad():
                    times[name], _ = median_time(lambda: model(tokens[:, :-1], **kw), repeats=repeats)
            else:
                times[name], _ = median_time(lambda: step(model, **kw), repeats=repeats)
        rows.append(dict(mode=mode, batch=batch, seq=seq, base_ms=times["base"] * 1e3,
                         retro_ms=times["retro"] * 1e3, retro_over_base=times["retro"] / times["base"]))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smaller sizes, fewer repeats")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    n, repeats = (20_000, 3) if args.quick else (100_000, 5)
    machine_limits = limits()
    idx = index_rows(n, 128, 1000, repeats)
    print_table([[r["kind"], r["vectors"], r["build_s"], r["build_vec_per_s"], r["query_per_s"], r["recall_at_10"]]
                 for r in idx], ["index", "vectors", "build s", "build vec/s", "query/s", "recall@10"])
    emb = embed_row(512, 64, repeats)
    print(f"\nchunk embedding: {emb['encoder']}, {emb['chunk']}-token chunks: {emb['chunks_per_s']:.0f} chunks/s\n")
    retro = retro_rows(8, 256, repeats)
    print_table([[r["mode"], r["batch"], r["seq"], r["base_ms"], r["retro_ms"], r["retro_over_base"]] for r in retro],
                ["retro-tiny", "batch", "seq", "base ms", "retro ms", "retro/base"])
    path = write_results("retrieval", dict(settings=vars(args), limits=machine_limits, index=idx, embedding=emb,
                                           retro=retro, note="taken on a shared, loaded 2-core machine"))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
