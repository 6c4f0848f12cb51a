"""llmarch's own model directory: ``config.json`` (ModelConfig fields) + ``model.safetensors``, written atomically.
Training checkpoints (optimizer, RNG, data position) build on this in ``llmarch.train``."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from llmarch.config import ModelConfig
from llmarch.model import Model, build


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
    """Move ``tmp`` into place as ``path``; an existing ``path`` is replaced only once ``tmp`` is complete."""
    if path.exists():
        old = path.with_name(f".{path.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)


def save_model(model: Model, path: str | os.PathLike) -> Path:
    path = Path(path)
    tmp = atomic_dir(path)
    save_file(state_for_saving(model), str(tmp / "model.safetensors"), metadata={"format": "llmarch"})
    model.config.to_file(tmp / "config.json")
    commit_dir(tmp, path)
    return path


def is_llmarch_dir(path: Path) -> bool:
    cfg = path / "config.json"
    return cfg.is_file() and "model_type" not in json.loads(cfg.read_text())


def load_model(path: str | os.PathLike, dtype: torch.dtype | None = None) -> Model:
    """Load an llmarch model directory (or a Hugging Face one, recognised by ``model_type`` in config.json)."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} has no config.json; expected an llmarch or Hugging Face model directory")
    if not is_llmarch_dir(path):
        from llmarch import hf

        return hf.load(path, dtype=dtype)
    if (path / "quantization.json").is_file():  # written by `llmarch convert --quantize`
        from llmarch.infer.quantize import load_quantized

        return load_quantized(path)
    cfg = ModelConfig.from_file(path / "config.json")
    weights = path / "model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"{path} has no model.safetensors")
    model = build(cfg)
    state = load_file(str(weights))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(model.tied_names())
    missing = [m for m in missing if m not in tied]
    if missing or unexpected:
        raise ValueError(f"{weights} does not match {path / 'config.json'}: missing {missing[:10]}, "
                         f"unexpected {unexpected[:10]}")
    model.loaded_from = path  # where llmarch.hf.save finds the tokenizer files to carry
    return model.to(dtype) if dtype is not None else model
