"""A chunk index for retrieval (Borgeaud et al. 2022, sec. 2.3): a token stream is cut into chunks of m tokens,
each chunk is embedded by a frozen encoder and stored in a faiss index, and the chunk tokens with their
continuations (the next m tokens of the stream) live on disk as numpy memmaps, so a search returns token ids.

Directory layout: ``meta.json`` (sizes, index kind, metric, chunk count), ``chunks.i32`` and ``continuations.i32``
(raw int32 [C, m], read as memmaps), ``index.faiss`` (faiss's own format; nothing is unpickled). ``meta.json`` is
written last and its count is the truth, so an interrupted ``add`` leaves a readable index.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Callable

import numpy as np

log = logging.getLogger(__name__)

INDEX_KINDS = ("flat", "ivf", "hnsw")
METRICS = ("ip", "l2")
Embed = Callable[[np.ndarray], np.ndarray]  # chunk ids [N, m] -> float32 vectors [N, dim]


def chunk_stream(tokens: np.ndarray, chunk_size: int, pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Cut a 1-D token stream into C = len // m chunks [C, m] and their continuations [C, m] (the m tokens after
    each chunk; the tail of the stream is padded with ``pad_id``)."""
    tokens = np.asarray(tokens).reshape(-1)
    C = len(tokens) // chunk_size
    chunks = tokens[:C * chunk_size].reshape(C, chunk_size).astype(np.int32)
    tail = np.full(chunk_size, pad_id, dtype=np.int32)
    rest = tokens[C * chunk_size:]  # fewer than m tokens
    tail[:len(rest)] = rest
    following = np.concatenate([tokens[chunk_size:C * chunk_size].astype(np.int32), tail])
    return chunks, following.reshape(C, chunk_size)


def _faiss():
    try:
        import faiss
    except ImportError:  # pragma: no cover - faiss is a declared extra
        raise ImportError("retrieval needs faiss: pip install 'llmarch[retrieval]' (faiss-cpu)") from None
    return faiss


class ChunkIndex:
    """Chunks of ``chunk_size`` tokens embedded into ``dim`` dims. ``kind``: flat (exact), ivf (inverted lists,
    ``nlist`` cells, ``nprobe`` visited per query) or hnsw (graph with ``hnsw_m`` links). ``metric``: ip (inner
    product; embedders normalise, so this is cosine) or l2. Use :meth:`create` or :meth:`load`."""

    def __init__(self, path: Path, meta: dict, index) -> None:
        self.path, self.meta, self.index = path, meta, index
        self._mm: dict[str, np.memmap] = {}

    # --- construction ---------------------------------------------------------------------------------------
    @classmethod
    def create(cls, path: str | os.PathLike, dim: int, chunk_size: int = 64, kind: str = "flat", metric: str = "ip",
               nlist: int | None = None, nprobe: int = 8, hnsw_m: int = 32, pad_id: int = 0,
               encoder: str = "", pool: str = "mean", embedder: dict | None = None) -> "ChunkIndex":
        """An empty index in directory ``path`` (created; must not already hold an index). ``encoder`` names the
        frozen encoder (a model directory relative to ``path`` when it is stored there) and ``pool`` its pooling;
        ``embedder`` is a model-free embedder's description (``HashedNgramEmbedder.meta``), recorded instead."""
        if kind not in INDEX_KINDS:
            raise ValueError(f"kind: {kind!r} is not allowed; choose one of {list(INDEX_KINDS)}")
        if metric not in METRICS:
            raise ValueError(f"metric: {metric!r} is not allowed; choose one of {list(METRICS)}")
        for name, v in (("dim", dim), ("chunk_size", chunk_size), ("nprobe", nprobe), ("hnsw_m", hnsw_m)):
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name}: must be a positive integer, got {v!r}")
        if embedder is not None and embedder.get("dim", dim) != dim:
            raise ValueError(f"dim: {dim} differs from the embedder's dim {embedder['dim']}; pass dim=embed.dim")
        path = Path(path)
        if (path / "meta.json").exists():
            raise ValueError(f"{path} already holds an index; load it with ChunkIndex.load or pick a new --out")
        path.mkdir(parents=True, exist_ok=True)
        for name in ("chunks.i32", "continuations.i32"):
            (path / name).write_bytes(b"")
        meta = dict(dim=dim, chunk_size=chunk_size, kind=kind, metric=metric, nlist=nlist, nprobe=nprobe,
                    hnsw_m=hnsw_m, pad_id=pad_id, count=0, encoder=encoder, pool=pool, embedder="encoder")
        meta.update(embedder or {})
        index = cls(path, meta, None)
        index.save()
        return index

    def _new_faiss(self, n_train: int):
        faiss, m = _faiss(), self.meta
        metric = faiss.METRIC_INNER_PRODUCT if m["metric"] == "ip" else faiss.METRIC_L2
        if m["kind"] == "flat":
            return faiss.IndexFlatIP(m["dim"]) if m["metric"] == "ip" else faiss.IndexFlatL2(m["dim"])
        if m["kind"] == "hnsw":
            return faiss.IndexHNSWFlat(m["dim"], m["hnsw_m"], metric)
        if m["nlist"] is None:  # ~4 sqrt(N) cells, but at least 39 training points per cell (faiss's advice)
            m["nlist"] = max(1, min(int(4 * np.sqrt(n_train)), n_train // 39))
        quantizer = faiss.IndexFlatIP(m["dim"]) if m["metric"] == "ip" else faiss.IndexFlatL2(m["dim"])
        index = faiss.IndexIVFFlat(quantizer, m["dim"], m["nlist"], metric)
        index.nprobe = m["nprobe"]
        self._quantizer = quantizer  # the IVF index refers to it; keep the Python object alive
        return index

    def add(self, tokens: np.ndarray, embed: Embed, batch_size: int = 512) -> int:
        """Chunk a 1-D token stream, embed every chunk with ``embed`` and append it. Returns the chunks added.
        An ivf index is trained on the first stream it is given."""
        chunks, following = chunk_stream(tokens, self.meta["chunk_size"], self.meta["pad_id"])
        if not len(chunks):
            return 0
        vecs = np.concatenate([np.asarray(embed(chunks[i:i + batch_size]), dtype=np.float32)
                               for i in range(0, len(chunks), batch_size)])
        return self.add_embedded(chunks, following, vecs)

    def add_embedded(self, chunks: np.ndarray, following: np.ndarray, vecs: np.ndarray) -> int:
        """Append chunks [N, m], their continuations [N, m] and their vectors [N, dim] (already embedded)."""
        vecs = np.ascontiguousarray(vecs, dtype=np.float32)
        if chunks.shape != following.shape or chunks.shape[1:] != (self.chunk_size,):
            raise ValueError(f"chunks {chunks.shape} and continuations {following.shape} must both be "
                             f"[N, {self.chunk_size}]")
        if vecs.shape != (len(chunks), self.meta["dim"]):
            raise ValueError(f"chunk vectors have shape {vecs.shape}; expected {(len(chunks), self.meta['dim'])} "
                             "(one dim-sized vector per chunk): check the index dim matches the encoder width")
        if self.index is None:
            self.index = self._new_faiss(len(vecs))
            if not self.index.is_trained:
                self.index.train(vecs)
        self.index.add(vecs)
        with open(self.path / "chunks.i32", "ab") as f:
            f.write(chunks.astype(np.int32).tobytes())
        with open(self.path / "continuations.i32", "ab") as f:
            f.write(following.astype(np.int32).tobytes())
        self.meta["count"] += len(chunks)
        self._mm.clear()
        self.save()
        return len(chunks)

    # --- queries --------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.meta["count"]

    @property
    def chunk_size(self) -> int:
        return self.meta["chunk_size"]

    def _tokens(self, name: str) -> np.ndarray:
        if name not in self._mm:
            self._mm[name] = np.memmap(self.path / f"{name}.i32", dtype=np.int32, mode="r",
                                       shape=(len(self), self.chunk_size))
        return self._mm[name]

    def search(self, queries: np.ndarray, k: int, exclude: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` best chunks per query vector [Q, dim]: ids [Q, k] (int64, -1 where fewer exist) and scores
        [Q, k] (inner products, or squared L2 distances). ``exclude`` [Q, 2] holds a half-open chunk-id range
        [lo, hi) per query that must not be returned (the query's own text during training)."""
        if self.index is None or not len(self):
            raise ValueError(f"{self.path}: the index is empty; add chunks before searching")
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.meta["dim"]:
            raise ValueError(f"queries have shape {queries.shape}; expected [Q, {self.meta['dim']}]")
        extra = 0 if exclude is None else int((exclude[:, 1] - exclude[:, 0]).clip(min=0).max(initial=0))
        scores, ids = self.index.search(queries, min(k + extra, len(self)))
        if exclude is not None:
            drop = (ids >= exclude[:, :1]) & (ids < exclude[:, 1:])
            order = np.argsort(drop, axis=1, kind="stable")  # kept results first, their order preserved
            ids, scores = np.take_along_axis(ids, order, 1), np.take_along_axis(scores, order, 1)
            ids = np.where(np.take_along_axis(drop, order, 1), -1, ids)
        ids, scores = ids[:, :k], scores[:, :k]
        if ids.shape[1] < k:  # fewer chunks than k
            ids = np.pad(ids, ((0, 0), (0, k - ids.shape[1])), constant_values=-1)
            scores = np.pad(scores, ((0, 0), (0, k - scores.shape[1])))
        return ids.astype(np.int64), scores

    def neighbours(self, ids: np.ndarray) -> np.ndarray:
        """Chunk ids [...] -> tokens [..., 2m]: each chunk followed by its continuation (id -1: all ``pad_id``)."""
        ids = np.asarray(ids)
        safe = np.where(ids < 0, 0, ids).reshape(-1)
        out = np.concatenate([self._tokens("chunks")[safe], self._tokens("continuations")[safe]], axis=1)
        out[ids.reshape(-1) < 0] = self.meta["pad_id"]
        return out.reshape(*ids.shape, 2 * self.chunk_size)

    # --- persistence ----------------------------------------------------------------------------------------
    def save(self) -> None:
        """Write the faiss index and meta.json (each to a temporary file renamed into place)."""
        if self.index is not None:
            tmp = self.path / "index.faiss.tmp"
            _faiss().write_index(self.index, str(tmp))
            os.replace(tmp, self.path / "index.faiss")
        tmp = self.path / "meta.json.tmp"
        tmp.write_text(json.dumps(self.meta, indent=2) + "\n")
        os.replace(tmp, self.path / "meta.json")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ChunkIndex":
        path = Path(path)
        if not (path / "meta.json").is_file():
            raise FileNotFoundError(f"{path} has no meta.json; build an index with `llmarch index build`")
        meta = json.loads((path / "meta.json").read_text())
        index = _faiss().read_index(str(path / "index.faiss")) if (path / "index.faiss").is_file() else None
        if index is not None and index.ntotal != meta["count"]:
            raise ValueError(f"{path}: index.faiss holds {index.ntotal} vectors but meta.json counts "
                             f"{meta['count']} chunks; rebuild the index")
        if index is not None and meta["kind"] == "ivf":
            _faiss().extract_index_ivf(index).nprobe = meta["nprobe"]
        return cls(path, meta, index)


__all__ = ["ChunkIndex", "INDEX_KINDS", "METRICS", "chunk_stream"]
