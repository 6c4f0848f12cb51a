"""LoRA adapters on any projection, by target name (Hu et al. 2021), independent of the family.

    from llmarch import lora
    lora.apply(model, r=8, alpha=16, dropout=0.0, targets=("q", "v"))  # in place; every base parameter frozen
    lora.merge(model); lora.unmerge(model)                            # fold the update in / out of the weights
    with lora.disabled(model): ...                                     # the base model (DPO's reference)

Targets are listed in :mod:`llmarch.lora.sites`. Fused projections get one adapter per projection (``targets=("q",
"v")`` adapts the q and v rows of ``qkv`` and leaves k alone), which is what PEFT's per-module adapters are, so
:func:`llmarch.hf.save_adapter` writes them in PEFT's format. Quantized bases (int8/int4, ``llmarch.infer.quantize``;
quantize first, then apply) stay frozen while fp32 adapters train: QLoRA-style (Dettmers et al. 2023).
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch
from torch import nn

from llmarch.lora.layers import Adapter, ExpertAdapter, LoRABank, LoRAProjection, adapt, is_adapted, restore
from llmarch.lora.sites import EXPERT_PREFIX, TARGETS, Site, sites


def _check(r: int, alpha: float, dropout: float) -> None:
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ValueError(f"r: the adapter rank must be a positive integer, got {r!r}")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or alpha <= 0:
        raise ValueError(f"alpha: must be a number > 0 (the update is scaled by alpha / r), got {alpha!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout: must be in [0, 1), got {dropout!r}")


def _names(field: str, names: Sequence[str] | str, required: bool = True) -> tuple[str, ...]:
    """Target names from a sequence or a comma-separated string, checked against TARGETS."""
    if isinstance(names, str):
        names = [t for t in names.replace("+", ",").split(",") if t]
    names = tuple(dict.fromkeys(names))
    bad = [t for t in names if t not in TARGETS]
    if (required and not names) or bad:
        raise ValueError(f"{field}: {bad or 'none given'} not allowed; choose from {list(TARGETS)}")
    return names


def _device(module: nn.Module) -> torch.device:
    return next(iter(list(module.parameters(recurse=False)) + list(module.buffers(recurse=False)))).device


def adapted(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(name, module) of every adapted projection or expert bank."""
    return ((name, m) for name, m in model.named_modules() if is_adapted(m))


def _attach(owner: nn.Module, owner_sites: list[Site], targets: tuple[str, ...], r: int, alpha: float,
            dropout: float) -> set[str]:
    """Adapt the sites of one component that carry a target; returns the targets found."""
    found: set[str] = set()
    bank_slots = {s.attr: s.slots for s in owner_sites if s.bank and any(t in targets for t, _ in s.slots)}
    if bank_slots:
        short = {attr: tuple((t[len(EXPERT_PREFIX):], w) for t, w in slots) for attr, slots in bank_slots.items()}
        adapt(owner, LoRABank, short)  # adapters keyed "gate" / "up" / "down" (ModuleDict keys hold no dots)
        for attr, slots in bank_slots.items():
            E, d_in = owner._parameters[attr].shape[:2]
            for t, width in slots:
                if t in targets:
                    owner.adapters[t[len(EXPERT_PREFIX):]] = ExpertAdapter(E, d_in, width, r, alpha,
                                                                          _device(owner))
                    found.add(t)
    for site in owner_sites:
        chosen = [t for t, _ in site.slots if t in targets]
        if site.bank or not chosen:
            continue
        proj = getattr(owner, site.attr) if site.attr else owner
        adapt(proj, LoRAProjection, site.slots)
        for t, width in site.slots:
            if t in targets:
                proj.adapters[t] = Adapter(proj.in_features, width, r, alpha, dropout, _device(proj))
        found.update(chosen)
    return found


def whole_projections(model: nn.Module, names: Sequence[str], require: bool = False) -> dict[str, nn.Module]:
    """name -> projection of every site that is one whole target in ``names`` (the ``trainable`` ones);
    ``require``: each name must match one."""
    out, seen = {}, set()
    for owner_name, owner in model.named_modules():
        for site in sites(owner):
            hit = [t for t, _ in site.slots if t in names]
            seen.update(hit)
            if hit and (site.bank or len(site.slots) > 1):
                raise ValueError(f"trainable: {hit[0]!r} is one slice of a fused projection in "
                                 f"{owner_name or 'the model'}; only whole projections (head, o, down, ...) train "
                                 "in full")
            if hit:
                out[".".join(p for p in (owner_name, site.attr) if p)] = getattr(owner, site.attr) if site.attr \
                    else owner
    if require and set(names) - seen:
        raise ValueError(f"trainable: {sorted(set(names) - seen)} match no projection of this model")
    return out


def apply(model: nn.Module, r: int = 8, alpha: float = 16, dropout: float = 0.0,
          targets: Sequence[str] = ("q", "v"), trainable: Sequence[str] = ()) -> nn.Module:
    """Attach rank-``r`` adapters scaled by ``alpha / r`` to every projection named in ``targets``, with
    ``dropout`` on the adapters' input; freeze every base parameter except those of the whole projections named
    in ``trainable`` (PEFT's ``modules_to_save``, e.g. ``("head",)`` for a new reward score). In place; returns
    ``model``."""
    _check(r, alpha, dropout)
    targets, trainable = _names("targets", targets), _names("trainable", trainable, required=False)
    if settings(model) is not None:
        raise ValueError("lora.apply: this model already has adapters; lora.unload(model) first")
    if dropout > 0 and any(t.startswith(EXPERT_PREFIX) for t in targets):
        raise ValueError("dropout: expert adapters enter the expert weights and take no input dropout; use "
                         "dropout=0 or leave the experts.* targets out")
    full = whole_projections(model, trainable, require=True)  # checked before anything changes
    quantized = [name for name, proj in full.items()
                 if not any(p.is_floating_point() for p in proj.parameters(recurse=False))]
    if quantized:
        raise ValueError(f"trainable: {quantized[0]} is quantized and cannot train in full; leave it out")
    model.requires_grad_(False)
    found: set[str] = set()
    for _, owner in list(model.named_modules()):
        owner_sites = sites(owner)
        if owner_sites:
            found |= _attach(owner, owner_sites, targets, r, alpha, dropout)
    missing = [t for t in targets if t not in found]
    if missing:
        available = sorted({t for _, m in model.named_modules() for s in sites(m) for t, _ in s.slots})
        unload(model)
        raise ValueError(f"targets: {missing} match no projection of this model; it has {available}")
    for proj in full.values():
        for p in proj.parameters(recurse=False):
            p.requires_grad_(p.is_floating_point())
    model.lora_settings = dict(r=r, alpha=alpha, dropout=dropout, targets=list(targets), trainable=list(trainable))
    return model


def settings(model: nn.Module) -> dict | None:
    """dict(r, alpha, dropout, targets, trainable) of the adapters (``lora.apply(m, **settings)`` repeats them),
    or None for a model without."""
    s = getattr(model, "lora_settings", None)
    return dict(s) if s is not None else None


def _shared(model: nn.Module) -> set[int]:
    """ids of parameters that appear under more than one name (a tied head and embedding)."""
    seen: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        seen[id(p)] = seen.get(id(p), 0) + 1
    return {k for k, n in seen.items() if n > 1}


def merge(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (W += (alpha / r) B A); the forward then skips the adapters."""
    shared = _shared(model)
    todo = [(name, m) for name, m in adapted(model) if not m.lora_merged]
    for name, m in todo:
        if id(getattr(m, "weight", None)) in shared:
            raise ValueError(f"merge: {name} shares its weight with another parameter (a head tied to the token "
                             "embedding); merging would change both. Keep it unmerged or untie the embeddings")
    for _, m in todo:
        m.lora_fold(+1.0)
        m.lora_merged = True
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Undo :func:`merge` (W -= (alpha / r) B A; exact up to rounding)."""
    for _, m in adapted(model):
        if m.lora_merged:
            m.lora_fold(-1.0)
            m.lora_merged = False
    return model


@contextlib.contextmanager
def disabled(model: nn.Module):
    """Within the block the model is its base (adapters off; merged ones are folded out and back in after)."""
    mods = [m for _, m in adapted(model)]
    merged = [m for m in mods if m.lora_merged]
    for m in merged:
        m.lora_fold(-1.0)
        m.lora_merged = False
    for m in mods:
        m.lora_enabled = False
    try:
        yield model
    finally:
        for m in mods:
            m.lora_enabled = True
        for m in merged:
            m.lora_fold(+1.0)
            m.lora_merged = True


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """What training changed: the adapters' tensors under their model names
    (``decoder.layers.0.attn.qkv.adapters.q.lora_A``) and the ``trainable`` projections' own weights."""
    out = {f"{name}.adapters.{k}": v.detach() for name, m in adapted(model)
           for k, v in m.adapters.state_dict().items()}
    s = settings(model)
    for name, proj in whole_projections(model, s["trainable"] if s else ()).items():
        out.update({f"{name}.{k}": p.detach() for k, p in proj.named_parameters(recurse=False)})
    return out


def load_adapter_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """Copy tensors from :func:`adapter_state_dict` into a model with the same adapters (resuming a run)."""
    own = adapter_state_dict(model)
    if set(own) != set(state):
        raise ValueError(f"adapter state does not match the model's adapters: missing "
                         f"{sorted(set(own) - set(state))[:5]}, unexpected {sorted(set(state) - set(own))[:5]}")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for k, v in state.items():
            params[k].copy_(v)
    return model


def unload(model: nn.Module) -> nn.Module:
    """Remove every adapter (merged ones stay folded into the weights) and unfreeze the model: a plain model
    again, which ``llmarch.hf.save`` and ``llmarch.checkpoint.save_model`` write as usual."""
    for _, m in list(adapted(model)):
        restore(m)
    model.__dict__.pop("lora_settings", None)
    for p in model.parameters():
        if p.is_floating_point():
            p.requires_grad_(True)
    return model


__all__ = ["TARGETS", "Adapter", "ExpertAdapter", "adapted", "whole_projections", "adapter_state_dict", "apply", "disabled",
           "load_adapter_state_dict", "merge", "settings", "unload", "unmerge"]
