"""Load a Hugging Face checkpoint directory into a Model, and save a Model as one transformers can load.

Only safetensors are read (single file or sharded with ``model.safetensors.index.json``); nothing is unpickled.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from llmarch.hf.base import FAMILIES, Family
from llmarch.hf.convert import ConversionError, to_ours, to_theirs
from llmarch.hf.files import keys_behind, read_config, read_weights
from llmarch.model import Model, model_class
from llmarch.model_files import carry_model_files, write_tokenizer_config


def _read_config(path: Path) -> dict:
    return read_config(path)


def family(model_type: str) -> Family:
    if model_type not in FAMILIES:
        raise ValueError(f"model_type {model_type!r} is not supported; supported: {FAMILIES.names()}")
    return FAMILIES[model_type]()


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory (one file or shards listed in the index)."""
    return read_weights(Path(path))[0]


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
    return _translate(Path(path))[1]


def _translate(path: Path):
    """(family, ModelConfig) of ``path/config.json``; any problem is a ConversionError naming the file."""
    hf = _read_config(path)
    fam = family(hf["model_type"])
    try:
        return fam, fam.score_head_from_hf(hf, fam.to_config(hf))
    except ConversionError:
        raise
    except ValueError as e:  # our field's check: name the config.json key(s) it came from too
        raise ConversionError(f"{path / 'config.json'}: {e}{keys_behind(str(e), hf)}") from None
    except (TypeError, KeyError, IndexError, AttributeError, ZeroDivisionError) as e:  # a field of an odd shape
        raise ConversionError(f"{path / 'config.json'}: cannot translate this config ({type(e).__name__}: {e}); "
                              "a field is missing or has an unexpected value") from None


def load(path: str | os.PathLike, dtype: torch.dtype | None = None) -> Model:
    """A Model with the weights of the Hugging Face checkpoint directory ``path``."""
    path = Path(path)
    fam, cfg = _translate(path)
    tensors, origin = read_weights(path)
    theirs = fam.rename(_strip(tensors, fam.prefixes))
    origin = {k: origin[n] for n, k in zip(tensors, theirs)}
    cfg = fam.tie_from_weights(cfg, theirs)  # transformers decides tying with the checkpoint in hand
    with torch.device("cpu"):
        model = model_class(cfg)(cfg)  # torch's default init; every parameter is overwritten below
    expected = {k: v.shape for k, v in model.state_dict().items()}
    tied = model.tied_names()
    for alias in tied:
        expected.pop(alias, None)
    ignore = fam.ignore_for(cfg) + ((r"^lm_head\.weight$",) if getattr(cfg, "tie_embeddings", False) else ())
    try:
        state = to_ours(theirs, fam.rules(cfg), cfg.n_layers, expected, ignore, origin)
    except ConversionError as e:
        raise ConversionError(f"{path}: {e}") from None
    for alias, source in tied.items():
        state[alias] = state[source]
    model.load_state_dict(state, strict=True)
    model.loaded_from = path  # where save() finds the tokenizer files to carry
    return model.to(dtype) if dtype is not None else model


def pick_family(model: Model, model_type: str | None) -> Family:
    if getattr(model.config, "retrieval", None) is not None:
        raise ValueError("retrieval: RETRO has no transformers counterpart; save it with "
                         "llmarch.checkpoint.save_model (set retrieval=None to export the base decoder alone)")
    if model_type is not None:
        fam = family(model_type)
        reason = fam.fits(model.config)
        if reason:
            raise ValueError(f"cannot save as {model_type!r}: {reason}")
        return fam
    reasons = {}
    for name in FAMILIES:
        fam = FAMILIES[name]()
        reason = fam.fits(model.config)
        if reason is None:
            return fam
        reasons[name] = reason
    raise ValueError("no Hugging Face model type can represent this config exactly: "
                     + "; ".join(f"{k}: {v}" for k, v in reasons.items()))


def checkpoint_name(fam: Family, name: str) -> str:
    """A rule's checkpoint name as written in the file: with the model prefix, except for the heads."""
    return name if name.startswith(fam.top_level) else fam.model_prefix() + name


def save(model: Model, path: str | os.PathLike, model_type: str | None = None,
         files_from: str | os.PathLike | None = None, overwrite: bool = False) -> Path:
    """Write ``config.json`` + ``model.safetensors`` that ``transformers`` loads, with the tokenizer files and
    ``generation_config.json`` of ``files_from`` (default: the directory the model was loaded from, if any; see
    :mod:`llmarch.model_files`). A non-empty ``path`` is refused unless ``overwrite`` (then only model files there
    are replaced); the files are written beside it first and renamed in, so nothing is ever left half-written and
    nothing else is touched (:mod:`llmarch.outdir`)."""
    from llmarch.outdir import check_out_dir, staged_dir

    if getattr(model, "quantization", None):
        raise ValueError(f"hf.save: the model is quantized ({model.quantization['mode']}), which transformers' "
                         "checkpoints do not hold; save it with llmarch.infer.save_quantized, or save the "
                         "full-precision model")
    check_out_dir(path, overwrite)
    fam = pick_family(model, model_type)
    cfg = model.config
    ours = {k: v.detach().to("cpu") for k, v in model.state_dict().items()}
    theirs = to_theirs(ours, fam.rules(cfg), cfg.n_layers)
    tensors = {checkpoint_name(fam, n): t.contiguous() for n, t in theirs.items()}
    hf_cfg = fam.score_head_to_hf(cfg, fam.from_config(cfg))
    hf_cfg["dtype"] = str(next(iter(tensors.values())).dtype).replace("torch.", "")
    files_from = files_from if files_from is not None else getattr(model, "loaded_from", None)
    with staged_dir(path, overwrite) as tmp:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n")
        if files_from is not None:
            carry_model_files(files_from, tmp)
            write_tokenizer_config(tmp)
    return Path(path)
