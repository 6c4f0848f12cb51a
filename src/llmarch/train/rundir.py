"""The training run directory (``--out``): one run at a time, and nothing half-made left behind.

- ``RUN/.lock`` is held with an OS file lock (``fcntl.flock``) for the whole run; the kernel releases it when the
  process ends, even by ``kill -9``. A second ``llmarch train`` into the same directory is refused with the
  holder's pid, host and start time (written in the lock file).
- A run that fails before any checkpoint is committed removes what it created: the directory itself when it made
  it, else only the entries that were not there before (a user's files are never touched). A run with a
  committed checkpoint keeps it, so ``--resume`` can continue.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import time
from pathlib import Path

log = logging.getLogger(__name__)
LOCK_FILE = ".lock"


class RunLocked(ValueError):
    """Another process is training into the same run directory."""


class RunDirectory:
    """``with RunDirectory(out, main=is_rank0): train...`` (a no-op on the other ranks of a torchrun job)."""

    def __init__(self, out: str | os.PathLike, main: bool = True):
        self.path = Path(out)
        self.main = main
        self.created = False
        self.before: set[str] = set()
        self._fh = None

    def __enter__(self) -> "RunDirectory":
        if not self.main:
            return self
        if self.path.exists() and not self.path.is_dir():
            raise ValueError(f"--out {self.path} is a file; choose a directory")
        try:  # atomic: of two runs started together only one "created" the directory
            self.path.mkdir(parents=True)
            self.created = True
        except FileExistsError:
            self.created = False
        had_lock = (self.path / LOCK_FILE).exists()
        self._lock()  # refused: nothing is removed (the directory may be the other run's)
        self.before = {p.name for p in self.path.iterdir()} - ({LOCK_FILE} if not had_lock else set())
        return self

    def _lock(self) -> None:
        import fcntl

        fh = open(self.path / LOCK_FILE, "a+")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fh.seek(0)
            holder = fh.read().strip() or "{}"
            fh.close()
            try:
                h = json.loads(holder)
                who = f"pid {h.get('pid')} on {h.get('host')}, started {h.get('started')}"
            except json.JSONDecodeError:
                who = "another process"
            raise RunLocked(f"--out {self.path} is in use by another llmarch train ({who}); wait for it to finish "
                            "or choose another --out") from None
        fh.seek(0)
        fh.truncate()
        fh.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                             "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}) + "\n")
        fh.flush()
        self._fh = fh

    def __exit__(self, kind, exc, tb) -> None:
        if not self.main:
            return
        try:
            if kind is not None and not self._has_checkpoint():
                self._remove_created()
        finally:
            if self._fh is not None:
                self._fh.close()  # releases the lock

    def _has_checkpoint(self) -> bool:
        from llmarch.train.checkpoints import list_checkpoints

        return bool(list_checkpoints(self.path))

    def _remove_created(self) -> None:
        if self.created:
            shutil.rmtree(self.path, ignore_errors=True)
            log.info("removed %s: the run stopped before its first checkpoint", self.path)
            return
        for p in self.path.iterdir():  # the lock file too when this run made it (unlinking keeps our lock)
            if p.name not in self.before:
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


__all__ = ["RunDirectory", "RunLocked", "LOCK_FILE"]
