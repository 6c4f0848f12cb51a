"""llmarch's own model directory: ``config.json`` (ModelConfig fields) + ``model.safetensors`` (+ ``manifest.json``),
written atomically without touching a user's other files (:mod:`llmarch.outdir`) and verified on every load.
Training checkpoints (optimizer, RNG, data position) build on this in ``llmarch.train``."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from llmarch.config import ModelConfig
from llmarch.manifest import MANIFEST, CheckpointError, read_json_object, verify_manifest, write_manifest
from llmarch.model import Model, build
from llmarch.outdir import fsync_path, fsync_tree, staged_dir


def state_for_saving(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """State dict with shared (tied) tensors stored once: safetensors refuses aliases."""
    seen: dict[int, str] = {}
    out = {}
    for name, t in model.state_dict().items():
        key = t.data_ptr()
        if key in seen and t.numel():
            continue
        seen[key] = name
        out[name] = t.detach().cpu().contiguous()
    return out


def atomic_dir(path: Path) -> Path:
    """A fresh temporary sibling directory; finish with :func:`commit_dir`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp.", dir=path.parent))


def commit_dir(tmp: Path, path: Path) -> None:
    """Move ``tmp`` into place as ``path`` (its files and directory fsynced first); an existing ``path`` is replaced
    only once ``tmp`` is complete. For directories llmarch owns (checkpoints); user-facing outputs use
    :func:`llmarch.outdir.staged_dir`."""
    fsync_tree(tmp)
    if path.exists():
        old = path.with_name(f".{path.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)
    fsync_path(path.parent)


def save_model(model: Model, path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write an llmarch model directory; a non-empty ``path`` is refused unless ``overwrite`` (then only our model
    files there are replaced)."""
    with staged_dir(path, overwrite) as tmp:
        save_file(state_for_saving(model), str(tmp / "model.safetensors"), metadata={"format": "llmarch"})
        model.config.to_file(tmp / "config.json")
        write_manifest(tmp)
    return Path(path)


def is_llmarch_dir(path: Path) -> bool:
    cfg = path / "config.json"
    if not cfg.is_file():
        return False
    return "model_type" not in read_json_object(cfg, "config")


def load_model(path: str | os.PathLike, dtype: torch.dtype | None = None) -> Model:
    """Load an llmarch model directory (or a Hugging Face one, recognised by ``model_type`` in config.json). A
    LoRA run's checkpoint comes back as a plain model with its adapters merged into the base weights."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} has no config.json; expected an llmarch or Hugging Face model directory")
    if (path / MANIFEST).is_file():  # a training checkpoint or a saved model: refuse torn or altered files
        verify_manifest(path)
    try:
        return _load(path, dtype)
    except (ValueError, FileNotFoundError):  # already a message (CheckpointError is a ValueError)
        raise
    except Exception as e:  # a crafted or foreign file: name it instead of a traceback from deep inside a reader
        raise CheckpointError(f"{path} cannot be loaded: {type(e).__name__}: {e}") from e


def _load(path: Path, dtype: torch.dtype | None) -> Model:
    if not is_llmarch_dir(path):
        from llmarch import hf

        return hf.load(path, dtype=dtype)
    if (path / "quantization.json").is_file():  # written by `llmarch convert --quantize`
        from llmarch.infer.quantize import load_quantized

        return load_quantized(path)
    from llmarch.train.merge import load_merged, lora_spec

    spec = lora_spec(path)
    if spec is not None:  # a LoRA run's checkpoint (base + adapters): merged, as `llmarch merge` writes it
        model = load_merged(path, spec)
        model.loaded_from = path
        return model.to(dtype) if dtype is not None else model
    cfg = ModelConfig.from_file(path / "config.json")
    weights = path / "model.safetensors"
    model = build(cfg)
    if not weights.is_file() and (path / "sharded").is_dir():  # a sharded training checkpoint: consolidate here
        from llmarch.train.parallel.dcp import read_model_state

        verify_manifest(path / "sharded")
        state = read_model_state(path / "sharded", model)
    elif not weights.is_file():
        raise FileNotFoundError(f"{path} has no model.safetensors")
    else:
        state = load_file(str(weights))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(model.tied_names())
    missing = [m for m in missing if m not in tied]
    if missing or unexpected:
        raise ValueError(f"{weights} does not match {path / 'config.json'}: missing {missing[:10]}, "
                         f"unexpected {unexpected[:10]}")
    model.loaded_from = path  # where llmarch.hf.save finds the tokenizer files to carry
    return model.to(dtype) if dtype is not None else model
