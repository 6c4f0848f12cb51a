"""Expert-load statistics of an MoE training run: tokens routed to each expert per MoE layer, summed over the
training forwards since the last write, written to ``RUN/expert_load.json`` in the format ``llmarch plot experts``
reads: ``{"tokens_per_expert": [[per expert] per layer], "layers": [name per layer], "dropped_fraction": [per
layer], "kept_per_expert": [...], "step": s, "forwards": n}``. Counts are per process (rank 0 writes its own)."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from torch import nn

from llmarch.nn.moe import moe_layers

EXPERT_LOAD_FILE = "expert_load.json"


def layer_label(name: str) -> str:
    """A module name such as ``module.decoder.layers.3.ffn`` -> ``decoder.3``."""
    name = re.sub(r"^(module\.|_orig_mod\.|_fsdp_wrapped_module\.)+", "", name)
    return name.replace(".layers.", ".").removesuffix(".ffn")


class ExpertLoad:
    """Accumulates each MoE layer's ``tokens_per_expert`` (before capacity) and ``kept_per_expert`` on the device
    after every training forward (no host sync) and writes the totals on request."""

    def __init__(self, model: nn.Module):
        self.layers = moe_layers(model)
        self.routed: list[torch.Tensor] | None = None
        self.kept: list[torch.Tensor] | None = None
        self.forwards = 0

    def __bool__(self) -> bool:
        return bool(self.layers)

    def update(self) -> None:
        """Add the routing of the last forward of every MoE layer."""
        stats = [m.stats() for _, m in self.layers]
        if not stats or not all(stats):
            return
        routed, kept = [s["tokens_per_expert"] for s in stats], [s["kept_per_expert"] for s in stats]
        if self.routed is None:
            self.routed, self.kept = routed, kept
        else:
            self.routed = [a + b for a, b in zip(self.routed, routed)]
            self.kept = [a + b for a, b in zip(self.kept, kept)]
        self.forwards += 1

    def write(self, run_dir: str | os.PathLike, step: int) -> Path | None:
        """Write the totals since the last write atomically, then start counting again. None if nothing ran."""
        if self.routed is None:
            return None
        routed = [t.tolist() for t in self.routed]
        kept = [t.tolist() for t in self.kept]
        dropped = [1.0 - sum(k) / max(sum(r), 1.0) for r, k in zip(routed, kept)]
        data = dict(tokens_per_expert=routed, layers=[layer_label(n) for n, _ in self.layers],
                    dropped_fraction=dropped, kept_per_expert=kept, step=step, forwards=self.forwards)
        path = Path(run_dir) / EXPERT_LOAD_FILE
        tmp = path.with_name(f".{EXPERT_LOAD_FILE}.tmp")
        tmp.write_text(json.dumps(data) + "\n")
        os.replace(tmp, path)
        self.reset()
        return path

    def reset(self) -> None:
        self.routed = self.kept = None
        self.forwards = 0
