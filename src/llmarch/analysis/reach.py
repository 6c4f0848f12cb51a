"""How far back information can travel through a stack whose attention is local. With a sliding window of W keys
per layer, one layer moves information at most W - 1 positions; L such layers move it L·(W - 1), which Mistral 7B
(Jiang et al. 2023, sec. 2) rounds to L × W ≈ 32 × 4096 = 131k tokens. A layer that sees every earlier key (a
dense or a strided/global sparse layer within its context) reaches the whole context at once."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Reach:
    tokens: int  # the farthest earlier token whose information can arrive at the last position
    per_layer: list[int | None]  # each layer's lookback: keys before the query it sees (None = all in context)
    paper_form: int | None  # L × W when every layer has the same window W (the Mistral paper's figure)
    limited_by_context: bool  # the context (max_seq_len) is smaller than the layers' combined reach

    def describe(self) -> str:
        if all(w is None for w in self.per_layer):
            return f"{self.tokens:,} tokens (every layer sees its whole context)"
        note = f"; L × W = {self.paper_form:,} as papers state it" if self.paper_form else ""
        cap = " (capped by the context)" if self.limited_by_context else ""
        return f"{self.tokens:,} tokens{cap}: the layers' lookbacks (W − 1 each) added up{note}"


def effective_reach(cfg) -> Reach:
    """The decoder stack's (or the encoder's) reach, from each layer's pattern lookback."""
    from llmarch.nn.patterns import build_pattern

    n_layers = cfg.n_decoder_layers or cfg.n_layers if cfg.kind == "encoder_decoder" else cfg.n_layers
    lookbacks = [build_pattern(cfg.layer_pattern(i), window=cfg.window, sparse=cfg.sparse).lookback
                 for i in range(n_layers)]
    if any(w is None for w in lookbacks):
        reach, combined = cfg.max_seq_len, cfg.max_seq_len
    else:
        combined = sum(lookbacks)  # a sliding layer of window W looks back W - 1 keys
        reach = min(combined, cfg.max_seq_len)
    windows = set(lookbacks)
    paper = n_layers * (lookbacks[0] + 1) if len(windows) == 1 and None not in windows else None
    return Reach(reach, lookbacks, paper, combined > cfg.max_seq_len)
