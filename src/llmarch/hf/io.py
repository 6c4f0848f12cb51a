"""Load a Hugging Face checkpoint directory into a Model, and save a Model as one transformers can load.

Only safetensors are read (single file or sharded with ``model.safetensors.index.json``); nothing is unpickled.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from llmarch.hf.base import FAMILIES, Family
from llmarch.hf.convert import to_ours, to_theirs
from llmarch.model import Model


def _read_config(path: Path) -> dict:
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{path} has no config.json; is it a Hugging Face model directory?")
    hf = json.loads(cfg_path.read_text())
    if "model_type" not in hf:
        raise ValueError(f"{cfg_path} has no model_type")
    return hf


def family(model_type: str) -> Family:
    if model_type not in FAMILIES:
        raise ValueError(f"model_type {model_type!r} is not supported; supported: {FAMILIES.names()}")
    return FAMILIES[model_type]()


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory (one file or shards listed in the index)."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [path / s for s in shards]
    else:
        files = sorted(path.glob("*.safetensors"))
    if not files:
        bins = sorted(p.name for p in path.glob("*.bin"))
        extra = f" (found {bins}: convert them to safetensors first; pickled weights are never loaded)" if bins else ""
        raise FileNotFoundError(f"{path} has no *.safetensors weights{extra}")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        tensors.update(load_file(str(f)))
    return tensors


def _strip(tensors: dict[str, torch.Tensor], prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    out = {}
    for name, t in tensors.items():
        for p in prefixes:
            if name.startswith(p):
                name = name[len(p):]
                break
        out[name] = t
    return out


def config_from_hf(path: str | os.PathLike):
    """The ModelConfig of a checkpoint directory, from its config.json alone."""
    hf = _read_config(Path(path))
    return family(hf["model_type"]).to_config(hf)


def load(path: str | os.PathLike, dtype: torch.dtype | None = None) -> Model:
    """A Model with the weights of the Hugging Face checkpoint directory ``path``."""
    path = Path(path)
    hf = _read_config(path)
    fam = family(hf["model_type"])
    cfg = fam.to_config(hf)
    with torch.device("cpu"):
        model = Model(cfg)  # torch's default init; every parameter is overwritten below
    expected = {k: v.shape for k, v in model.state_dict().items()}
    tied = model.tied_names()
    for alias in tied:
        expected.pop(alias, None)
    ignore = fam.ignore_for(cfg) + ((r"^lm_head\.weight$",) if cfg.tie_embeddings else ())
    state = to_ours(_strip(read_safetensors(path), fam.prefixes), fam.rules(cfg), cfg.n_layers, expected, ignore)
    for alias, source in tied.items():
        state[alias] = state[source]
    model.load_state_dict(state, strict=True)
    return model.to(dtype) if dtype is not None else model


def pick_family(model: Model, model_type: str | None) -> Family:
    if model.config.retrieval is not None:
        raise ValueError("retrieval: RETRO has no transformers counterpart; save it with "
                         "llmarch.checkpoint.save_model (set retrieval=None to export the base decoder alone)")
    if model_type is not None:
        fam = family(model_type)
        reason = fam.accepts(model.config)
        if reason:
            raise ValueError(f"cannot save as {model_type!r}: {reason}")
        return fam
    reasons = {}
    for name in FAMILIES:
        fam = FAMILIES[name]()
        reason = fam.accepts(model.config)
        if reason is None:
            return fam
        reasons[name] = reason
    raise ValueError("no Hugging Face model type can represent this config exactly: "
                     + "; ".join(f"{k}: {v}" for k, v in reasons.items()))


def save(model: Model, path: str | os.PathLike, model_type: str | None = None, overwrite: bool = False) -> Path:
    """Write ``config.json`` + ``model.safetensors`` that ``transformers`` loads. A non-empty ``path`` is refused
    unless ``overwrite`` (then only model files there are replaced); the files are written beside it first and
    renamed in, so nothing is ever left half-written (:mod:`llmarch.outdir`)."""
    from llmarch.outdir import check_out_dir, staged_dir

    check_out_dir(path, overwrite)
    fam = pick_family(model, model_type)
    cfg = model.config
    ours = {k: v.detach().to("cpu") for k, v in model.state_dict().items()}
    theirs = to_theirs(ours, fam.rules(cfg), cfg.n_layers)
    prefix = fam.model_prefix()
    tensors = {(n if n.startswith(fam.top_level) else prefix + n): t.contiguous() for n, t in theirs.items()}
    hf_cfg = fam.from_config(cfg)
    hf_cfg["dtype"] = str(next(iter(tensors.values())).dtype).replace("torch.", "")
    with staged_dir(path, overwrite) as tmp:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n")
    return Path(path)
