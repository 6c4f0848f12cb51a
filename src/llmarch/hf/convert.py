"""The weight-name engine: rules map our parameter names to checkpoint names (with a ``{layer}`` placeholder)
and name the pure tensor transform each way. Conversion is strict: every checkpoint tensor is used or ignored by
an explicit pattern, every parameter of ours is filled, and shapes are checked with both names in the message."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

Tensor = torch.Tensor


def identity(ts: Sequence[Tensor]) -> Tensor:
    return ts[0]


def one(t: Tensor) -> list[Tensor]:
    return [t]


def transpose(ts: Sequence[Tensor]) -> Tensor:
    """GPT-2's Conv1D stores [in, out]; nn.Linear stores [out, in]."""
    return ts[0].t().contiguous()


def transpose_back(t: Tensor) -> list[Tensor]:
    return [t.t().contiguous()]


def cat_rows(ts: Sequence[Tensor]) -> Tensor:
    """Fuse q/k/v (or gate/up) projections along the output dim."""
    return torch.cat(list(ts), dim=0)


def split_rows(sizes: Sequence[int]) -> Callable[[Tensor], list[Tensor]]:
    def split(t: Tensor) -> list[Tensor]:
        return [p.contiguous() for p in t.split(list(sizes), dim=0)]

    return split


@dataclass(frozen=True)
class Rule:
    """``ours`` <- to_ours(theirs...); theirs <- to_theirs(ours). Names may hold ``{layer}``."""

    ours: str
    theirs: tuple[str, ...]
    to_ours: Callable[[Sequence[Tensor]], Tensor] = identity
    to_theirs: Callable[[Tensor], list[Tensor]] = one
    layers: int | None = None  # how many layers {layer} runs over (None: the model's n_layers)


def rule(ours: str, *theirs: str, to_ours=identity, to_theirs=one, layers: int | None = None) -> Rule:
    return Rule(ours, tuple(theirs), to_ours, to_theirs, layers)


def _expand(rules: Sequence[Rule], n_layers: int) -> list[Rule]:
    out = []
    for r in rules:
        if "{layer}" in r.ours:
            out += [Rule(r.ours.format(layer=i), tuple(t.format(layer=i) for t in r.theirs), r.to_ours, r.to_theirs)
                    for i in range(n_layers if r.layers is None else r.layers)]
        else:
            out.append(r)
    return out


class ConversionError(ValueError):
    """A checkpoint that does not fit the config: lists the missing, unexpected and mis-shaped tensors."""


def to_ours(theirs: dict[str, Tensor], rules: Sequence[Rule], n_layers: int, expected: dict[str, torch.Size],
            ignore: Sequence[str] = (), origin: dict[str, str] | None = None) -> dict[str, Tensor]:
    """Checkpoint tensors -> our state dict. ``expected`` maps our names to shapes; ``ignore`` holds regexes of
    checkpoint names that carry nothing we need (buffers such as rotary tables or causal masks); ``origin`` (the
    file each tensor came from) names the file in shape errors."""
    ours, used, missing, shapes = {}, set(), [], []
    where = (lambda n: f" in {origin[n]}" if n in origin else "") if origin else (lambda n: "")
    for r in _expand(rules, n_layers):
        absent = [t for t in r.theirs if t not in theirs]
        if absent:
            missing += absent
            continue
        used.update(r.theirs)
        if r.ours not in expected:
            raise ConversionError(f"converter rule targets {r.ours!r}, which this model does not have")
        try:
            t = r.to_ours([theirs[n] for n in r.theirs])
        except RuntimeError:  # parts that cannot be fused (a wrong column count)
            shapes.append(" + ".join(f"{n} {tuple(theirs[n].shape)}{where(n)}" for n in r.theirs)
                          + f" cannot form {r.ours} {tuple(expected[r.ours])}")
            continue
        if t.shape != expected[r.ours]:
            shapes.append(" + ".join(f"{n}{where(n)}" for n in r.theirs)
                          + f" {tuple(t.shape)} -> {r.ours} expects {tuple(expected[r.ours])}")
        ours[r.ours] = t
    unexpected = [n for n in theirs if n not in used and not any(re.search(p, n) for p in ignore)]
    unfilled = [n for n in expected if n not in ours]
    problems = []
    if missing:
        problems.append(f"missing from the checkpoint: {missing[:20]}{' ...' if len(missing) > 20 else ''}")
    if unexpected:
        problems.append(f"unexpected in the checkpoint: {unexpected[:20]}{' ...' if len(unexpected) > 20 else ''}")
    if shapes:
        problems.append("shape mismatches: " + "; ".join(shapes[:10]))
    if unfilled and not missing:
        problems.append(f"parameters left unfilled: {unfilled[:20]}")
    if problems:
        raise ConversionError("checkpoint does not match the config: " + " | ".join(problems))
    return ours


def to_theirs(ours: dict[str, Tensor], rules: Sequence[Rule], n_layers: int) -> dict[str, Tensor]:
    """Our state dict -> checkpoint tensors (every rule's source must exist)."""
    out = {}
    for r in _expand(rules, n_layers):
        if r.ours not in ours:
            raise ConversionError(f"model has no parameter {r.ours!r} needed for checkpoint {r.theirs}")
        for name, t in zip(r.theirs, r.to_theirs(ours[r.ours])):
            out[name] = t.contiguous()
    return out
