"""Folding a LoRA run into a full model directory (``llmarch merge RUN OUT``): rebuild the base, re-apply the
run's adapters, load the checkpoint, ``lora.merge`` (W + B A · alpha / r), and save the plain model's weights
under the base names. A full fine-tuning run is copied as it is."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from safetensors.torch import load_file

from llmarch.checkpoint import load_model, save_model
from llmarch.config import ModelConfig
from llmarch.model import Model, build
from llmarch.tokenizer import load_tokenizer_for
from llmarch.train.checkpoints import resolve_model_dir
from llmarch.train.posttrain import parse_lora

log = logging.getLogger(__name__)


def base_tensor(model: torch.nn.Module, name: str, shape: torch.Size) -> torch.Tensor:
    """The tensor of ``model`` that plays base parameter ``name`` (e.g. ``...attn.qkv.weight``): the same name,
    or, when an adapter wraps the layer, the one non-adapter tensor of that shape inside the wrapper."""
    state = model.state_dict()
    if name in state and state[name].shape == shape:
        return state[name]
    module_name, _, leaf = name.rpartition(".")
    inner = model.get_submodule(module_name)
    found = [t for n, t in inner.state_dict().items() if n.split(".")[-1] == leaf and "lora" not in n.lower()
             and t.shape == shape]
    if len(found) != 1:
        raise ValueError(f"merge: cannot find the merged weight of {name} in the adapted model ({len(found)} "
                         "candidates)")
    return found[0]


def plain_copy(adapted: torch.nn.Module, cfg: ModelConfig) -> Model:
    """A model without adapters holding ``adapted``'s (merged) base weights."""
    plain = build(cfg)
    state = {name: base_tensor(adapted, name, t.shape) for name, t in plain.state_dict().items()
             if name not in plain.tied_names()}
    plain.load_state_dict(state, strict=False)
    return plain


def lora_spec(ckpt: Path) -> str | None:
    """The LoRA settings a training checkpoint was written with (``state.json``'s ``train.lora``), or None."""
    state_file = Path(ckpt) / "state.json"
    if not state_file.is_file():
        return None
    spec = json.loads(state_file.read_text()).get("train", {}).get("lora")
    return spec if isinstance(spec, str) and spec else None


def load_merged(ckpt: Path, spec: str) -> Model:
    """A LoRA run's checkpoint (base + adapter weights) as a plain model with the adapters merged in."""
    from llmarch import lora

    cfg = ModelConfig.from_file(ckpt / "config.json")
    adapted = build(cfg)
    lora.apply(adapted, **parse_lora(spec))
    missing, unexpected = adapted.load_state_dict(load_file(str(ckpt / "model.safetensors")), strict=False)
    missing = [m for m in missing if m not in adapted.tied_names()]
    if missing or unexpected:
        raise ValueError(f"{ckpt} does not fit its LoRA settings {spec!r}: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    lora.merge(adapted)
    return plain_copy(adapted, cfg)


def merge_run(run: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Write ``out``: the run's newest good checkpoint with its adapters merged (or copied when it has none)."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"merge: {out} already exists and is not an empty directory; choose a new OUT")
    ckpt = resolve_model_dir(run)
    if lora_spec(ckpt) is None:
        log.info("merge: %s has no LoRA adapters (a full fine-tuning run); copying it", ckpt)
    model = load_model(ckpt)  # a LoRA checkpoint comes back merged (load_merged)
    save_model(model, out)
    load_tokenizer_for(ckpt).save(out)
    return out


__all__ = ["load_merged", "lora_spec", "merge_run", "plain_copy"]
