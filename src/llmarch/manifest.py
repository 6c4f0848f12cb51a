"""``manifest.json``: the size and sha256 of every file of an llmarch directory (a model or a training
checkpoint), written last; every load checks it, so a torn or bit-flipped file is refused with its name."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

MANIFEST = "manifest.json"


class CheckpointError(ValueError):
    """A checkpoint or model directory that is incomplete, corrupt or unreadable."""


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_json_object(path: Path, what: str, error: type[ValueError] = ValueError) -> dict:
    """The JSON object in ``path``; ``error`` naming ``what`` (the reader's context) when it is not one."""
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{what}: {path} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise error(f"{what}: {path} does not hold a JSON object")
    return data


def write_manifest(directory: Path) -> None:
    """Record every file of ``directory`` (not sub-directories) in ``manifest.json``."""
    files = sorted(p.name for p in directory.iterdir() if p.is_file() and p.name != MANIFEST)
    manifest = {name: {"bytes": (directory / name).stat().st_size, "sha256": sha256(directory / name)}
                for name in files}
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=1))


def verify_manifest(path: Path, required: tuple[str, ...] = ()) -> None:
    """Raise :class:`CheckpointError` naming what is wrong unless every file the manifest of ``path`` lists is
    present with its size and sha256 (and the ``required`` names are listed)."""
    manifest_file = path / MANIFEST
    if not manifest_file.is_file():
        raise CheckpointError(f"checkpoint {path} is incomplete: it has no {MANIFEST} (the save was interrupted)")
    manifest = read_json_object(manifest_file, f"checkpoint {path} is corrupt", CheckpointError)
    for name in required:
        if name not in manifest:
            raise CheckpointError(f"checkpoint {path} is incomplete: {MANIFEST} does not list {name}")
    for name, meta in manifest.items():
        if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
            raise CheckpointError(f"checkpoint {path} is corrupt: {MANIFEST} lists {name!r}, not a file name")
        if not isinstance(meta, dict) or not isinstance(meta.get("bytes"), int) \
                or not isinstance(meta.get("sha256"), str):
            raise CheckpointError(f"checkpoint {path} is corrupt: the {MANIFEST} entry of {name} needs an integer "
                                  "'bytes' and a 'sha256' string")
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"checkpoint {path} is incomplete: {name} is missing")
        if f.stat().st_size != meta["bytes"]:
            raise CheckpointError(f"checkpoint {path} is corrupt: {name} has {f.stat().st_size} bytes, the manifest "
                                  f"says {meta['bytes']}")
        if sha256(f) != meta["sha256"]:
            raise CheckpointError(f"checkpoint {path} is corrupt: {name} does not match its sha256 in {MANIFEST}")


__all__ = ["MANIFEST", "CheckpointError", "read_json_object", "sha256", "write_manifest", "verify_manifest"]
