"""Where each output row of our adaptable projections lives in a family's checkpoint layout, found by running the
family's ``to_theirs`` weight transform on an index probe (row i, column c holds i * in + c): per checkpoint module,
the row of ours behind each of its rows, and whether the module is stored [in, out] (GPT-2's Conv1D)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from llmarch.hf.convert import _expand
from llmarch.hf.io import checkpoint_name
from llmarch.lora.sites import sites


@dataclass
class Placement:
    """Checkpoint module ``theirs`` holds our projection ``ours``'s output rows ``rows`` [n], in its own order."""

    ours: str
    theirs: str
    rows: torch.Tensor
    transposed: bool


def rows_of(t: torch.Tensor, d_in: int) -> tuple[torch.Tensor | None, bool]:
    """Our row behind each row of a probe piece, and whether the piece is stored [in, out]."""
    for piece, transposed in ((t, False), (t.T, True)):
        if t.dim() == 2 and piece.shape[1] == d_in:
            cols, rows = piece % d_in, piece // d_in
            if torch.equal(cols, torch.arange(d_in).expand_as(cols)) and torch.equal(rows, rows[:, :1].expand_as(rows)):
                return rows[:, 0], transposed
    return None, False


def adaptable_projections(model) -> dict[str, tuple[torch.nn.Module, tuple]]:
    """Every adaptable Linear-like projection: name -> (module, slots). Expert banks have no PEFT counterpart."""
    out = {}
    for owner_name, owner in model.named_modules():
        for site in sites(owner):
            if site.bank:
                continue
            name = ".".join(p for p in (owner_name, site.attr) if p)
            out[name] = (getattr(owner, site.attr) if site.attr else owner, site.slots)
    return out


def placements(model, fam, names) -> dict[str, list[Placement]]:
    """Placements of our projections ``names`` in the checkpoint layout of family ``fam``."""
    cfg, projections = model.config, adaptable_projections(model)
    rules = {r.ours: r for r in _expand(fam.rules(cfg), cfg.n_layers)}
    probes: dict = {}
    out: dict[str, list[Placement]] = {}
    for name in names:
        proj, _ = projections[name]
        rule = rules.get(f"{name}.weight")
        if rule is None:
            raise ValueError(f"adapter: {name} has no weight of its own in the {fam.model_type} checkpoint (a head "
                             "tied to the embedding, or a quantized head); leave its target out")
        key = (rule.to_theirs, proj.out_features, proj.in_features)
        if key not in probes:
            probe = torch.arange(proj.out_features * proj.in_features).view(proj.out_features, proj.in_features)
            probes[key] = [rows_of(t, proj.in_features) for t in rule.to_theirs(probe)]
        out[name] = []
        for theirs, (rows, transposed) in zip(rule.theirs, probes[key]):
            if rows is None:
                raise ValueError(f"adapter: {fam.model_type} stores {theirs} with its input dim rearranged; a "
                                 "LoRA update cannot be moved there exactly")
            out[name].append(Placement(name, checkpoint_name(fam, theirs[:-len(".weight")]), rows, transposed))
    return out


def slot_ranges(slots) -> list[tuple[str, int, int]]:
    ranges, start = [], 0
    for target, width in slots:
        ranges.append((target, start, start + width))
        start += width
    return ranges
