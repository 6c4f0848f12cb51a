"""Training checkpoints: ``RUN/checkpoints/step_NNNNNNNN/`` holds

- ``config.json`` + ``model.safetensors`` (an llmarch model directory: ``llmarch generate`` reads it) and
  ``tokenizer.json``;
- ``optimizer.pt`` (name-keyed tensors and numbers, read back with ``torch.load(weights_only=True)``);
- ``rng.safetensors`` (every rank's generator states), ``state.json`` (step, data position, schedule, settings);
- ``manifest.json`` last: the size and sha256 of every other file.

A sharded run (FSDP2, tensor, expert or pipeline parallel on several processes) writes ``sharded/`` instead of
``model.safetensors`` and ``optimizer.pt``: every rank's shards in DCP's safetensors layout (with its own
manifest), never gathered on one rank; it resumes on any mesh or one process (:mod:`llmarch.train.parallel.dcp`),
and ``llmarch convert`` / ``generate`` read it as a model directory.

A checkpoint is written in a temporary directory, fsynced and renamed into place, so a crash leaves the previous
one intact; one whose manifest is missing or does not match its files, or whose files cannot be read, is refused
with the reason, and ``--resume`` falls back to the newest good one. Only the last ``keep_last`` are kept.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from llmarch.checkpoint import atomic_dir, commit_dir
from llmarch.config import ModelConfig
from llmarch.manifest import CheckpointError, verify_manifest, write_manifest
from llmarch.tokenizer import TOKENIZER_FILE, Tokenizer

log = logging.getLogger(__name__)
SUBDIR = "checkpoints"
PREFIX = "step_"
REQUIRED = ("model.safetensors", "config.json", "optimizer.pt", "rng.safetensors", "state.json")
SHARDED = "sharded"  # the DCP shards of a sharded run, in place of model.safetensors + optimizer.pt
SHARDED_REQUIRED = ("config.json", "rng.safetensors", "state.json")
STATE_KEYS = ("step", "consumed", "schedule", "train")


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Committed checkpoint directories of a run, oldest first."""
    d = Path(run_dir) / SUBDIR
    if not d.is_dir():
        return []
    found = [p for p in d.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def save_checkpoint(run_dir: str | os.PathLike, step: int, config: ModelConfig, model_state: dict,
                    optimizer_state: dict, rng: dict[str, torch.Tensor], state: dict, tokenizer: Tokenizer,
                    keep_last: int = 3) -> Path:
    """Write checkpoint ``step`` atomically, verify it, then delete all but the newest ``keep_last``."""
    path = Path(run_dir) / SUBDIR / f"{PREFIX}{step:08d}"
    for stale in path.parent.glob(f".{PREFIX}*.tmp.*"):  # left by a crash during an earlier save
        shutil.rmtree(stale, ignore_errors=True)
    tmp = atomic_dir(path)
    try:
        weights = {k: v.detach().cpu().contiguous() for k, v in model_state.items()}
        save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "llmarch"})
        config.to_file(tmp / "config.json")
        tokenizer.save(tmp / TOKENIZER_FILE)
        torch.save(optimizer_state, tmp / "optimizer.pt")
        save_file({k: v.contiguous() for k, v in rng.items()}, str(tmp / "rng.safetensors"))
        (tmp / "state.json").write_text(json.dumps(state, indent=1, sort_keys=True))
        write_manifest(tmp)
        commit_dir(tmp, path)  # fsyncs the files and the directory before the rename
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return _finish(run_dir, path, keep_last)


def _finish(run_dir, path: Path, keep_last: int) -> Path:
    verify(path)
    for old in list_checkpoints(run_dir)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    log.info("saved checkpoint %s", path)
    return path


def save_sharded_checkpoint(run_dir: str | os.PathLike, step: int, config: ModelConfig, write_shards,
                            rng: dict[str, torch.Tensor], state: dict, tokenizer: Tokenizer, keep_last: int = 3,
                            main: bool = True) -> Path | None:
    """Checkpoint ``step`` of a sharded run; collective (every rank calls it). ``write_shards(dir)`` writes this
    rank's shards into the staged directory; rank 0 (``main``) then adds config, tokenizer, RNG states, state and
    manifests, and renames the whole into place. Returns the path on rank 0."""
    import torch.distributed as dist

    path = Path(run_dir) / SUBDIR / f"{PREFIX}{step:08d}"
    tmp = path.with_name(f".{path.name}.tmp.sharded")  # one name every rank knows
    if main:
        for stale in path.parent.glob(f".{PREFIX}*.tmp.*"):
            shutil.rmtree(stale, ignore_errors=True)
        (tmp / SHARDED).mkdir(parents=True)
    dist.barrier()
    write_shards(tmp / SHARDED)
    dist.barrier()
    if not main:
        return None
    try:
        config.to_file(tmp / "config.json")
        tokenizer.save(tmp / TOKENIZER_FILE)
        save_file({k: v.contiguous() for k, v in rng.items()}, str(tmp / "rng.safetensors"))
        (tmp / "state.json").write_text(json.dumps(state, indent=1, sort_keys=True))
        write_manifest(tmp / SHARDED)
        write_manifest(tmp)
        commit_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return _finish(run_dir, path, keep_last)


def is_sharded(path: Path) -> bool:
    return (Path(path) / SHARDED).is_dir()


def verify(path: Path) -> None:
    """Raise :class:`CheckpointError` naming what is wrong if ``path`` is not a complete, intact checkpoint."""
    if is_sharded(path):
        verify_manifest(path, SHARDED_REQUIRED)
        verify_manifest(path / SHARDED)
    else:
        verify_manifest(path, REQUIRED)


def latest_good(run_dir: str | os.PathLike) -> Path | None:
    """The newest checkpoint that verifies and whose model files parse (config, safetensors header); bad ones are
    reported (warning) and skipped. None if there is none; a CheckpointError when none is usable."""
    return _newest(run_dir, readable)[0]


def readable(path: Path) -> Path:
    """``path`` after checking its manifest and that its config and weights header parse (cheap: no tensors)."""
    from safetensors import safe_open

    verify(path)
    try:
        ModelConfig.from_file(path / "config.json")
        for f in sorted((path / SHARDED).glob("*.safetensors")) if is_sharded(path) else [path / "model.safetensors"]:
            with safe_open(str(f), "pt") as fh:
                fh.keys()
    except Exception as e:  # noqa: BLE001 - a crafted file that passes its hash
        raise CheckpointError(f"checkpoint {path} cannot be read: {type(e).__name__}: {e}") from None
    return path


def _newest(run_dir: str | os.PathLike, check) -> tuple[Path, object] | tuple[None, None]:
    """(path, check(path)) of the newest checkpoint ``check`` accepts, warning about each one it refuses."""
    found = list_checkpoints(run_dir)
    errors = []
    for path in reversed(found):
        try:
            return path, check(path)
        except CheckpointError as e:
            log.warning("%s; using an earlier checkpoint", e)
            errors.append(str(e))
    if found:
        raise CheckpointError(f"no usable checkpoint in {Path(run_dir) / SUBDIR}: " + "; ".join(errors))
    return None, None


def load_checkpoint(path: Path) -> dict:
    """Read a verified checkpoint: weights, optimizer state, rng tensors, state (dict), config. A file that
    passes its hash but cannot be read (crafted, or written by something else) is a :class:`CheckpointError`."""
    verify(path)
    try:
        sharded = is_sharded(path)  # weights and optimizer state are read by the run, onto its mesh
        loaded = {"model": None if sharded else load_file(str(path / "model.safetensors")),
                  "optimizer": None if sharded else torch.load(path / "optimizer.pt", weights_only=True,
                                                               map_location="cpu"),
                  "sharded": path / SHARDED if sharded else None,
                  "rng": load_file(str(path / "rng.safetensors")),
                  "state": json.loads((path / "state.json").read_text()),
                  "config": ModelConfig.from_file(path / "config.json")}
    except Exception as e:  # noqa: BLE001 - any reader's failure is a bad checkpoint, reported by name
        raise CheckpointError(f"checkpoint {path} cannot be read: {type(e).__name__}: {e}") from None
    state = loaded["state"]
    missing = [k for k in STATE_KEYS if not isinstance(state, dict) or k not in state]
    if missing or not (sharded or isinstance(loaded["optimizer"], dict)):
        raise CheckpointError(f"checkpoint {path} is not a training checkpoint: state.json lacks {missing}"
                              if missing else f"checkpoint {path}: optimizer.pt does not hold a state dict")
    return loaded


def load_for_resume(run_dir: str | os.PathLike) -> tuple[Path, dict] | tuple[None, None]:
    """The newest checkpoint of a run that verifies and reads, loaded; unusable ones are reported (warning) and
    the one before is tried. (None, None) when the run has none; a CheckpointError when none is usable."""
    return _newest(run_dir, load_checkpoint)


def find_resume(run_dir: Path, resume: bool, log_here: bool = True) -> tuple[Path | None, dict | None]:
    """The checkpoint a run continues from and its contents: (None, None) for a fresh run (refused if the
    directory already has checkpoints), else the newest usable one ((None, None) when there is none yet)."""
    if not resume:
        if list_checkpoints(run_dir):
            raise ValueError(f"{run_dir} already has checkpoints; pass --resume to continue that run or choose a new "
                             "--out")
        return None, None
    found, loaded = load_for_resume(run_dir)
    if log_here:
        if found is None:
            log.warning("--resume: %s has no checkpoint yet; starting from step 0", run_dir)
        else:
            log.info("resuming from %s", found)
    return found, loaded


def tied_aliases(model: torch.nn.Module) -> set[str]:
    """Names under which an already-listed parameter appears again (tied weights); they are stored once."""
    seen, aliases = set(), set()
    for name, p in model.named_parameters(remove_duplicate=False):
        (aliases.add(name) if id(p) in seen else seen.add(id(p)))
    return aliases


def resolve_model_dir(path: str | os.PathLike) -> Path:
    """A model directory itself, or the newest good checkpoint of a training run directory."""
    path = Path(path)
    if (path / "config.json").is_file():
        return path
    found = latest_good(path)
    if found is None:
        raise FileNotFoundError(f"{path} is neither a model directory (config.json) nor a training run with "
                                f"checkpoints under {path / SUBDIR}")
    return found


__all__ = ["save_checkpoint", "save_sharded_checkpoint", "is_sharded", "SHARDED", "load_checkpoint", "load_for_resume", "latest_good", "list_checkpoints", "verify",
           "readable", "resolve_model_dir", "find_resume", "tied_aliases", "CheckpointError"]
