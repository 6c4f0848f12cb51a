"""Writing an output directory without ever losing what a user put there.

Every verb that writes a model directory (``convert``, ``hf.save``, ``save_model``, quantized models) goes
through :func:`staged_dir`:

- an existing non-empty ``OUT`` (or a file at ``OUT``) is refused unless ``overwrite=True``;
- the files are written into a temporary directory beside ``OUT``, fsynced, then renamed into ``OUT`` one by one
  (each rename is atomic); with ``overwrite`` only llmarch's own model files in ``OUT`` are replaced or removed
  (:data:`MODEL_FILES`: config, weights, manifest, tokenizer files, generation config; and ``*.safetensors``),
  everything else there is left alone;
- on any error the temporary directory is removed and ``OUT`` is as it was; a writer killed outright (no
  chance to clean up) leaves its temporary directory, named after its host and process, which the next write
  to the same ``OUT`` on that host removes once that process is gone.
"""
from __future__ import annotations

import contextlib
import glob
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Iterator

from llmarch.model_files import CARRIED

# the files a model directory is made of: replaced (or removed when the new model has no such file) on overwrite
MODEL_FILES = frozenset({"config.json", "model.safetensors", "model.safetensors.index.json", "manifest.json",
                         "quantization.json", "adapter_config.json", *CARRIED})


def fsync_path(path: Path) -> None:
    """Flush a file or a directory entry table to disk (a no-op where the OS cannot open directories)."""
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if path.is_dir() else 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    """fsync every file under ``path``, then the directories themselves (children before parents)."""
    for root, dirs, files in os.walk(path, topdown=False):
        for name in files:
            fsync_path(Path(root) / name)
        fsync_path(Path(root))


def check_out_dir(out: str | os.PathLike, overwrite: bool = False, what: str = "output directory") -> Path:
    """``out`` resolved, after refusing a file there or a non-empty directory without ``overwrite``."""
    path = Path(out).expanduser()
    resolved = path.resolve()
    if path.exists() and not path.is_dir():
        raise ValueError(f"{what} {path} is a file, not a directory; choose another path (nothing was written)")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise ValueError(f"{what} {path} already exists and is not empty; choose a new path or pass --overwrite "
                         "(which replaces only llmarch's model files there)")
    if resolved.parent == resolved and overwrite:
        raise ValueError(f"{what} {path} is the filesystem root; choose a directory")
    return resolved


def _ours(path: Path) -> bool:
    return path.is_file() and (path.name in MODEL_FILES or path.name.endswith(".safetensors"))


def publish(tmp: Path, out: Path) -> None:
    """Move the finished files of ``tmp`` into ``out`` (created when missing); removes ``tmp``."""
    fsync_tree(tmp)
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, out)  # the whole directory appears at once
        fsync_path(out.parent)
        return
    new = {p.name for p in tmp.iterdir()}
    for old in out.iterdir():  # a stale model file of ours would mix with the new ones (e.g. old shards)
        if old.name not in new and _ours(old):
            old.unlink()
    for name in sorted(new, key=lambda n: n == "config.json"):  # config.json last: it marks a model directory
        target = out / name
        if target.is_dir() and not (tmp / name).is_dir():
            raise ValueError(f"{target} is a directory; llmarch writes a file of that name (nothing was replaced)")
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(tmp / name, target)
    fsync_path(out)
    shutil.rmtree(tmp, ignore_errors=True)


def _staging_prefix(path: Path, pid: int | None = None) -> str:
    """The name a staging directory for ``path`` starts with: it carries the host and the writing process."""
    host = "".join(c if c.isalnum() or c in "-_" else "_" for c in socket.gethostname()) or "host"
    return f".{path.name or 'out'}.tmp.{host}.{os.getpid() if pid is None else pid}."


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):  # someone else's process, or a platform that cannot tell: keep its files
        return True
    return True


def remove_stale_staging(path: Path) -> list[Path]:
    """Remove the staging directories for ``path`` that a killed writer on this host left beside it (its process
    is gone); those of live processes, other hosts and anything else are left alone. Returns what was removed."""
    head = _staging_prefix(path, 0)[:-2]  # ".NAME.tmp.HOST."
    removed = []
    for entry in path.parent.glob(glob.escape(head) + "*"):
        pid = entry.name[len(head):].split(".", 1)[0]
        if entry.is_dir() and not entry.is_symlink() and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


@contextlib.contextmanager
def staged_dir(out: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """``with staged_dir(OUT) as tmp: write files into tmp`` -> they land in OUT (see the module docstring)."""
    path = check_out_dir(out, overwrite)
    parent = path.parent
    parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(path)
    tmp = Path(tempfile.mkdtemp(prefix=_staging_prefix(path), dir=parent))
    try:
        yield tmp
        publish(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


__all__ = ["staged_dir", "check_out_dir", "publish", "fsync_path", "fsync_tree", "remove_stale_staging",
           "MODEL_FILES"]
