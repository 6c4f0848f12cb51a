"""LoRA adapters in PEFT's format: ``adapter_config.json`` + ``adapter_model.safetensors`` with transformers'
module names (``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``), for the model that
:func:`llmarch.hf.save` writes; and PEFT adapters made on a transformers model, loaded into ours.

The family's weight rules say where each of our output rows lives in the checkpoint: their ``to_theirs``
transform is run once on an index probe (row i, column c holds i * in + c), which gives, per checkpoint module, our
row behind each of its rows and whether it is stored transposed (GPT-2's Conv1D). From that map an adapter moves
exactly either way: one checkpoint module per projection (llama's q_proj) takes that projection's A and B as
they are; a fused one (GPT-2's c_attn, all of q | k | v) takes the adapted projections' A stacked and their B as a
block matrix (rank = the sum, written in ``rank_pattern`` / ``alpha_pattern`` so the scale stays alpha / r); loading
a fused module gives each of our projections its rows of B and the whole A. Same logits, not the same rank.
(Training differs in one way only: PEFT draws one dropout mask per fused module, ours one per projection.)
Expert-bank adapters have no PEFT counterpart here and are refused.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from llmarch import lora
from llmarch.checkpoint import atomic_dir, commit_dir
from llmarch.hf.adapter_layout import adaptable_projections, placements, slot_ranges
from llmarch.hf.convert import _expand
from llmarch.hf.io import checkpoint_name, pick_family
from llmarch.lora.layers import Adapter, LoRABank, LoRAProjection, adapt
from llmarch.lora.sites import TARGETS

PEFT_PREFIX = "base_model.model."
LORA_KEY = re.compile(r"^(.*)\.(lora_A|lora_B)\.weight$")


def save_adapter(model, path: str | os.PathLike, model_type: str | None = None) -> Path:
    """Write the model's adapters in PEFT's format for the transformers model ``llmarch.hf.save`` writes."""
    s = lora.settings(model)
    if s is None:
        raise ValueError("save_adapter: the model has no adapters; lora.apply(model, ...) first")
    banks = [n for n, m in lora.adapted(model) if isinstance(m, LoRABank)]
    if banks:
        raise ValueError(f"save_adapter: expert adapters ({banks[0]}, ...) have no PEFT counterpart here; "
                         "leave the experts.* targets out to export")
    if any(m.lora_merged for _, m in lora.adapted(model)):
        raise ValueError("save_adapter: the adapters are merged into the weights; lora.unmerge(model) first")
    fam = pick_family(model, model_type)
    mods = dict(lora.adapted(model))
    scale = s["alpha"] / s["r"]
    tensors, ranks, alphas, modules, transposed = {}, {}, {}, [], False
    for name, places in placements(model, fam, list(mods)).items():
        m = mods[name]
        for place in places:
            touched = [(t, lo, hi) for t, lo, hi in slot_ranges(m.lora_slots)
                       if t in m.adapters and bool(((place.rows >= lo) & (place.rows < hi)).any())]
            if not touched:
                continue
            A = torch.cat([m.adapters[t].lora_A.detach().float() for t, _, _ in touched])  # [rank, in]
            B = A.new_zeros(len(place.rows), A.shape[0])  # [n, rank]
            col = 0
            for t, lo, hi in touched:
                a, sel = m.adapters[t], (place.rows >= lo) & (place.rows < hi)
                B[sel, col:col + a.r] = a.lora_B.detach().float()[place.rows[sel] - lo] * (a.scaling / scale)
                col += a.r
            key = PEFT_PREFIX + place.theirs
            tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"] = A.contiguous(), B
            modules.append(place.theirs)
            transposed |= place.transposed
            if A.shape[0] != s["r"]:
                ranks[re.escape(place.theirs)] = A.shape[0]
                alphas[re.escape(place.theirs)] = scale * A.shape[0]
    saved = _full_weights(model, fam, s["trainable"], tensors)
    config = dict(peft_type="LORA", task_type="CAUSAL_LM" if model.config.head == "lm" else None, r=s["r"],
                  lora_alpha=s["alpha"], lora_dropout=s["dropout"], target_modules=sorted(modules),
                  fan_in_fan_out=transposed, bias="none", rank_pattern=ranks, alpha_pattern=alphas,
                  modules_to_save=saved or None, init_lora_weights=True, use_rslora=False, use_dora=False,
                  inference_mode=True, base_model_name_or_path=None, layers_to_transform=None, layers_pattern=None)
    path = Path(path)
    tmp = atomic_dir(path)
    save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
    (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    commit_dir(tmp, path)
    return path


def _full_weights(model, fam, trainable, tensors: dict) -> list[str]:
    """The ``trainable`` projections' own weights, in checkpoint layout, as PEFT's ``modules_to_save``."""
    cfg = model.config
    rules = {r.ours: r for r in _expand(fam.rules(cfg), cfg.n_layers)}
    modules = []
    for name, proj in lora.whole_projections(model, trainable).items():
        for k, p in proj.named_parameters(recurse=False):
            rule = rules.get(f"{name}.{k}")
            if rule is None:
                raise ValueError(f"save_adapter: trainable {name}.{k} has no place in the {fam.model_type} checkpoint")
            for theirs, t in zip(rule.theirs, rule.to_theirs(p.detach().float())):
                tensors[PEFT_PREFIX + checkpoint_name(fam, theirs)] = t.contiguous()
                modules.append(checkpoint_name(fam, theirs).rsplit(".", 1)[0])
    return sorted(set(modules))


def _load_full_weights(model, fam, full: dict[str, torch.Tensor], path) -> list[str]:
    """Copy PEFT ``modules_to_save`` weights into our projections; returns their targets (now trainable)."""
    cfg = model.config
    projections, params, found = adaptable_projections(model), dict(model.named_parameters()), []
    for r in _expand(fam.rules(cfg), cfg.n_layers):
        names = [checkpoint_name(fam, t) for t in r.theirs]
        if not any(n in full for n in names):
            continue
        owner = r.ours.rsplit(".", 1)[0]
        if owner not in projections or any(n not in full for n in names):
            raise ValueError(f"{path}: modules_to_save weights {names} do not fill a whole projection here")
        with torch.no_grad():
            params[r.ours].copy_(r.to_ours([full.pop(n) for n in names]))
        params[r.ours].requires_grad_(True)
        found.append(projections[owner][1][0][0])
    if full:
        raise ValueError(f"{path}: unexpected tensors {sorted(full)[:5]}; only lora_A / lora_B weights and "
                         "whole projections (modules_to_save) load here")
    return found


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: the first key that matches the end of the module name."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _read(path: Path) -> tuple[dict, dict[str, dict[str, torch.Tensor]]]:
    cfg_file, weights = path / "adapter_config.json", path / "adapter_model.safetensors"
    if not cfg_file.is_file() or not weights.is_file():
        raise FileNotFoundError(f"{path}: a PEFT adapter needs adapter_config.json and adapter_model.safetensors")
    config = json.loads(cfg_file.read_text())
    for field, ok in (("peft_type", config.get("peft_type") == "LORA"), ("use_dora", not config.get("use_dora")),
                      ("bias", config.get("bias", "none") == "none"), ("lora_bias", not config.get("lora_bias"))):
        if not ok:
            raise ValueError(f"{cfg_file}: {field}={config.get(field)!r} is not supported; plain LoRA adapters "
                             "(peft_type LORA, no DoRA, no bias terms) load here")
    modules: dict[str, dict[str, torch.Tensor]] = {}
    full: dict[str, torch.Tensor] = {}  # modules_to_save: whole weights
    for key, t in load_file(str(weights)).items():
        name = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
        m = LORA_KEY.match(name)
        if m is None:
            full[name] = t
        else:
            modules.setdefault(m.group(1), {})[m.group(2)] = t
    return config, modules, full


def load_adapter(model, path: str | os.PathLike, model_type: str | None = None):
    """Load a PEFT LoRA adapter (made by peft on the transformers model, or by :func:`save_adapter`) into
    ``model``: adapters are attached where the file has them (or replaced, when ``lora.apply`` made them) and the
    base is frozen. Returns ``model``."""
    config, modules, full = _read(Path(path))
    fam = pick_family(model, model_type)
    projections = adaptable_projections(model)
    known = {checkpoint_name(fam, t[:-len(".weight")]): name for r in _expand(fam.rules(model.config),
                                                                           model.config.n_layers)
             for t in r.theirs if t.endswith(".weight") and r.ours[:-len(".weight")] in projections
             for name in [r.ours[:-len(".weight")]]}
    strays = sorted(set(modules) - set(known))
    if strays:
        raise ValueError(f"{path}: adapter modules {strays[:5]} are not projections of this model")
    names = sorted({known[mod] for mod in modules})
    rslora = bool(config.get("use_rslora"))
    loaded: dict[tuple[str, str], Adapter] = {}
    for name, places in placements(model, fam, names).items():
        proj, slots = projections[name]
        for t, lo, hi in slot_ranges(slots):
            parts = [(p, modules[p.theirs]) for p in places if p.theirs in modules
                     and bool(((p.rows >= lo) & (p.rows < hi)).any())]
            if not parts:
                continue
            A = torch.cat([w["lora_A"].float() for _, w in parts])
            B, col, scale = A.new_zeros(hi - lo, A.shape[0]), 0, None
            for p, w in parts:
                rank = w["lora_A"].shape[0]
                alpha = _pattern_value(config.get("alpha_pattern"), p.theirs, config.get("lora_alpha", 8))
                s_j = alpha / (rank ** 0.5 if rslora else rank)
                scale = s_j if scale is None else scale
                sel = (p.rows >= lo) & (p.rows < hi)
                B[p.rows[sel] - lo, col:col + rank] = w["lora_B"].float()[sel] * (s_j / scale)
                col += rank
            a = Adapter(proj.in_features, hi - lo, A.shape[0], scale * A.shape[0], config.get("lora_dropout", 0.0))
            with torch.no_grad():
                a.lora_A.copy_(A)
                a.lora_B.copy_(B)
            loaded[(name, t)] = a
    _install(model, projections, loaded, config)
    trainable = _load_full_weights(model, fam, full, path)
    model.lora_settings["trainable"] = sorted(set(model.lora_settings.get("trainable", [])) | set(trainable),
                                              key=TARGETS.index)
    return model


def _install(model, projections, loaded: dict[tuple[str, str], Adapter], config: dict) -> None:
    """Put the loaded adapters in place: on a model without adapters, attach them; on one with, replace the same
    set of adapters (a mismatch is an error, not a silent mix)."""
    existing = {(n, t) for n, m in lora.adapted(model) for t in m.adapters} if lora.settings(model) else None
    if existing is not None and existing != set(loaded):
        raise ValueError(f"load_adapter: the file's adapters differ from the model's: the model has "
                         f"{sorted(existing - set(loaded))[:4]} that the file lacks, the file has "
                         f"{sorted(set(loaded) - existing)[:4]} that the model lacks")
    if existing is None:
        model.requires_grad_(False)
    for (name, t), a in loaded.items():
        proj, slots = projections[name]
        if not isinstance(proj, LoRAProjection):
            adapt(proj, LoRAProjection, slots)
        ref = next(iter(list(proj.parameters(recurse=False)) + list(proj.buffers(recurse=False))))
        proj.adapters[t] = a.to(ref.device)
    if existing is None:
        targets = sorted({t for _, t in loaded}, key=TARGETS.index)
        model.lora_settings = dict(r=int(config.get("r", 8)), alpha=config.get("lora_alpha", 8),
                                   dropout=float(config.get("lora_dropout", 0.0)), targets=targets, trainable=[])
