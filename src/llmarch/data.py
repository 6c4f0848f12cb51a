"""Corpora, the train/validation split, a token cache and packing into fixed-length sequences.

The default corpus is the running Python's standard library (``sysconfig``'s ``stdlib`` path, ``*.py``): always
present, ~30 MB, no download. Any folder, glob or file of text works too. Files are split into train and validation
by a hash of their relative path (deterministic, stable when files are added). Each split is tokenised once into a
flat array (documents separated by the eos token) cached as a memory-mapped ``.bin`` keyed by the corpus and the
tokenizer, then cut into chunks of a fixed length that are visited in a seeded order.
"""
from __future__ import annotations

import glob
import hashlib
import json
import logging
import functools
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from llmarch.tokenizer import Tokenizer

log = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    """``$LLMARCH_CACHE`` or ``~/.cache/llmarch``."""
    return Path(os.environ.get("LLMARCH_CACHE") or Path.home() / ".cache" / "llmarch")


def stdlib_files() -> tuple[Path, list[Path]]:
    """The running Python's standard-library sources (site-packages excluded), sorted, and their root."""
    root, files = _stdlib_files()
    return root, list(files)


@functools.lru_cache(maxsize=1)
def _stdlib_files() -> tuple[Path, tuple[Path, ...]]:  # the installation does not change while we run
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(f for f in root.rglob("*.py") if "site-packages" not in f.relative_to(root).parts
                   and "__pycache__" not in f.parts and f.is_file())
    return root, tuple(files)


def corpus_files(source: str | os.PathLike | None = None) -> tuple[Path, list[Path]]:
    """(root, sorted files) of a corpus: None = the standard library; a directory (every file under it); a glob
    pattern (``**`` allowed); or one file."""
    if source is None:
        return stdlib_files()
    text = str(source)
    path = Path(text).expanduser()
    if path.is_dir():
        files = sorted(f for f in path.rglob("*") if f.is_file() and not any(p.startswith(".") for p in
                                                                           f.relative_to(path).parts))
        root = path
    elif path.is_file():
        files, root = [path], path.parent
    elif any(c in text for c in "*?["):
        files = sorted(Path(f) for f in glob.glob(os.path.expanduser(text), recursive=True) if Path(f).is_file())
        root = Path(os.path.commonpath([str(f.parent) for f in files])) if files else Path(".")
    else:
        raise FileNotFoundError(f"--data {text!r}: no such file or directory, and not a glob pattern")
    if not files:
        raise ValueError(f"--data {text!r}: matched no files")
    return root, files


def take_bytes(files: list[Path], max_bytes: int | None) -> list[Path]:
    """The first files (in sorted order) until ``max_bytes`` is reached; all when None."""
    if max_bytes is None:
        return files
    out, total = [], 0
    for f in files:
        if total >= max_bytes:
            break
        out.append(f)
        total += f.stat().st_size
    return out


def is_validation(rel_path: str, val_fraction: float) -> bool:
    """A file's split: the first 8 hex digits of sha1(relative path) as a fraction of 2**32."""
    h = int(hashlib.sha1(rel_path.encode()).hexdigest()[:8], 16)
    return h / 2**32 < val_fraction


def split_files(root: Path, files: list[Path], val_fraction: float) -> tuple[list[Path], list[Path]]:
    """Deterministic train/validation split by file; validation gets at least one file when there are two."""
    check_val_fraction(val_fraction)
    rel = {f: f.relative_to(root).as_posix() if f.is_relative_to(root) else f.as_posix() for f in files}
    val = [f for f in files if is_validation(rel[f], val_fraction)]
    if not val and len(files) > 1:
        val = [min(files, key=lambda f: hashlib.sha1(rel[f].encode()).hexdigest())]
    train = [f for f in files if f not in set(val)]
    if not train:
        raise ValueError(f"the corpus has {len(files)} file(s); need at least 2 to split train/validation by file")
    return train, val


def check_val_fraction(val_fraction: float) -> None:
    if not 0.0 < val_fraction < 1.0:  # also refuses NaN
        raise ValueError(f"val_fraction: must be in (0, 1) (the share of text held out), got {val_fraction}")


@dataclass
class CorpusSplit:
    """Train and validation parts of a corpus: whole files, or (``within`` = the fraction) the last ``within``
    of every file's text for validation and the rest for training, when there are too few files."""

    train_files: list[Path]
    val_files: list[Path]
    within: float | None = None

    def texts(self, part: str) -> list[str]:
        if self.within is None:
            return read_texts(self.train_files if part == "train" else self.val_files)
        halves = [split_text(t, self.within) for t in read_texts(self.train_files)]
        return [h[0 if part == "train" else 1] for h in halves if h[0 if part == "train" else 1]]

    def key(self, part: str) -> str:
        files = self.train_files if part == "train" else self.val_files
        return files_key(files) + ("" if self.within is None else f"-{part}{self.within:g}")


def split_corpus(root: Path, files: list[Path], val_fraction: float) -> CorpusSplit:
    """By file (:func:`split_files`) when there are enough files for ``val_fraction`` (the hash picks some but not
    all of them, or ``len(files) * val_fraction >= 1``); otherwise within every file (one text file works)."""
    check_val_fraction(val_fraction)
    rel = [f.relative_to(root).as_posix() if f.is_relative_to(root) else f.as_posix() for f in files]
    hashed = sum(is_validation(r, val_fraction) for r in rel)
    if 0 < hashed < len(files) or (not hashed and len(files) >= 2 and len(files) * val_fraction >= 1):
        return CorpusSplit(*split_files(root, files, val_fraction))
    return CorpusSplit(files, files, val_fraction)


def split_text(text: str, val_fraction: float) -> tuple[str, str]:
    """(head, tail) of a text with ``val_fraction`` of it in the tail, cut at a line break where there is one."""
    cut = int(len(text) * (1.0 - val_fraction))
    newline = text.find("\n", cut)
    cut = newline + 1 if 0 <= newline < len(text) - 1 else cut
    return text[:cut], text[cut:]


def read_text(path: Path) -> str | None:
    """UTF-8 text of a file (bad bytes replaced), or None for a binary file (contains NUL bytes)."""
    raw = path.read_bytes()
    if b"\0" in raw[:8192]:
        return None
    return raw.decode("utf-8", errors="replace")


def read_texts(files: list[Path]) -> list[str]:
    return [t for t in (read_text(f) for f in files) if t]


def files_key(files: list[Path]) -> str:
    """Hash of the file list with sizes and modification times (a changed file invalidates the cache)."""
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f"{f.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def tokenize_to_file(texts: list[str], tok: Tokenizer, path: Path, batch: int = 256) -> int:
    """Encode documents (eos after each) into a flat uint16/uint32 file, atomically. Returns the token count."""
    dtype = np.uint16 if tok.vocab_size <= 2**16 else np.uint32
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # unique: two runs may fill one cache at once
    n = 0
    with open(tmp, "wb") as fh:
        for i in range(0, len(texts), batch):
            for ids in tok.encode_batch(texts[i:i + batch]):
                if tok.eos_id is not None:
                    ids = ids + [tok.eos_id]
                fh.write(np.asarray(ids, dtype=dtype).tobytes())
                n += len(ids)
    os.replace(tmp, path)
    return n


@dataclass
class TokenSplits:
    """Memory-mapped token arrays of the two splits and where they live."""

    train: np.ndarray
    val: np.ndarray
    directory: Path


def tokenize_corpus(train_files: list[Path] | CorpusSplit, val_files: list[Path] | None, tok: Tokenizer,
                    cache_dir: Path) -> TokenSplits:
    """Tokenise both splits (two file lists, or a :class:`CorpusSplit` and None) once into
    ``cache_dir/<corpus>-<tokenizer>/``; later calls memory-map the cache."""
    split = train_files if isinstance(train_files, CorpusSplit) else CorpusSplit(train_files, val_files or [])
    d = Path(cache_dir) / f"tokens-{split.key('train')}-{split.key('val')}-{tok.content_hash()}"
    meta_path = d / "meta.json"
    if not meta_path.is_file():
        d.mkdir(parents=True, exist_ok=True)
        meta = {"vocab_size": tok.vocab_size, "dtype": "uint16" if tok.vocab_size <= 2**16 else "uint32"}
        for name, files in (("train", split.train_files), ("val", split.val_files)):
            meta[name] = tokenize_to_file(split.texts(name), tok, d / f"{name}.bin")
            meta[f"{name}_files"] = len(files)
        tmp = d / f".meta.json.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(meta, indent=1))
        os.replace(tmp, meta_path)
        log.info("tokenised %d train / %d validation tokens into %s", meta["train"], meta["val"], d)
    meta = json.loads(meta_path.read_text())
    arrays = [np.memmap(d / f"{name}.bin", dtype=meta["dtype"], mode="r", shape=(meta[name],))
              if meta[name] else np.zeros(0, dtype=meta["dtype"]) for name in ("train", "val")]
    return TokenSplits(arrays[0], arrays[1], d)


class PackedSequences:
    """A flat token array cut into ``n`` non-overlapping chunks of ``length`` tokens (documents are packed
    back to back, eos-separated). Sample ``i`` of an endless seeded stream is chunk ``perm_e[i % n]`` of epoch
    ``e = i // n``, so a data position is just a count of samples consumed."""

    def __init__(self, tokens: np.ndarray, length: int, seed: int = 0, shuffle: bool = True, name: str = "the"):
        self.tokens, self.length, self.seed, self.shuffle = tokens, length, seed, shuffle
        self.n = len(tokens) // length
        if self.n == 0:
            fraction = {"training": ", or a smaller --val-fraction", "validation": ", or a larger --val-fraction"}
            raise ValueError(f"{name} split has {len(tokens)} tokens, fewer than one sequence of {length}; use more "
                             f"data (--data, --max-data-mb) or a smaller --seq-len{fraction.get(name, '')}")
        self._perm: tuple[int, torch.Tensor] | None = None

    def __len__(self) -> int:
        return self.n

    def _order(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.n)
        if self._perm is None or self._perm[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = (epoch, torch.randperm(self.n, generator=g))
        return self._perm[1]

    def chunk(self, i: int) -> np.ndarray:
        return np.asarray(self.tokens[i * self.length:(i + 1) * self.length], dtype=np.int64)

    def batch(self, start: int, size: int) -> torch.Tensor:
        """Samples ``start .. start+size-1`` of the stream as a LongTensor [size, length]."""
        rows = []
        for i in range(start, start + size):
            epoch, pos = divmod(i, self.n)
            rows.append(self.chunk(int(self._order(epoch)[pos])))
        return torch.from_numpy(np.stack(rows))

    def take(self, start: int, size: int, length: int) -> torch.Tensor:
        """:meth:`batch` cut to its first ``length`` tokens (the sequence-length curriculum)."""
        return self.batch(start, size)[:, :length]


__all__ = ["corpus_files", "stdlib_files", "split_files", "split_corpus", "CorpusSplit", "split_text", "take_bytes",
           "tokenize_corpus", "PackedSequences", "TokenSplits", "read_texts", "default_cache_dir"]
