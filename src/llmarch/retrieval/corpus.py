"""A byte-level corpus for retrieval demos and the ``llmarch index build`` verb: text files under a path (default:
the running Python's standard library sources) as one stream of UTF-8 byte ids (vocabulary 256), split by file so
validation text is never indexed. The shared data pipeline (``llmarch.data``) supersedes this for training."""
from __future__ import annotations

import random
import sysconfig
from pathlib import Path

import numpy as np


def text_files(path: str | Path | None = None, pattern: str = "*.py") -> list[Path]:
    """Files matching ``pattern`` under ``path`` (a directory, or one file), sorted; default: the stdlib sources."""
    root = Path(path) if path is not None else Path(sysconfig.get_paths()["stdlib"])
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise FileNotFoundError(f"--data {root}: no such file or directory")
    files = sorted(p for p in root.rglob(pattern) if p.is_file() and "site-packages" not in p.parts)
    if not files:
        raise FileNotFoundError(f"--data {root}: no files match {pattern!r}")
    return files


def byte_stream(files: list[Path], max_bytes: int | None = None) -> np.ndarray:
    """The files' bytes concatenated (a newline between files) as uint8 ids, cut at ``max_bytes``."""
    parts, total = [], 0
    for f in files:
        data = f.read_bytes() + b"\n"
        parts.append(np.frombuffer(data, dtype=np.uint8))
        total += len(data)
        if max_bytes is not None and total >= max_bytes:
            break
    stream = np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint8)
    return stream[:max_bytes] if max_bytes is not None else stream


def split_files(files: list[Path], val_fraction: float, seed: int = 0) -> tuple[list[Path], list[Path]]:
    """A seeded shuffle of the files into (train, validation) by whole files."""
    files = list(files)
    random.Random(seed).shuffle(files)
    n_val = max(1, int(len(files) * val_fraction))
    return files[n_val:], files[:n_val]


__all__ = ["byte_stream", "split_files", "text_files"]
