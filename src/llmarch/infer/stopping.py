"""Per-row stop conditions for batched generation: an end-of-sequence id, token sequences and strings."""
from __future__ import annotations

from typing import Callable, Sequence

import torch


class Stopper:
    """Tracks which rows are finished. A row finishes when it emits ``eos_token_id``, when its generated tokens
    end with one of ``stop_sequences`` (lists of ids), or when the decoded generated text contains one of
    ``stop_strings`` (needs ``decode``: list of ids -> str). The stopping tokens stay in the output."""

    def __init__(self, batch: int, eos_token_id: int | None = None,
                 stop_sequences: Sequence[Sequence[int]] | None = None,
                 stop_strings: Sequence[str] | None = None, decode: Callable[[list[int]], str] | None = None,
                 device: torch.device | str | None = None):
        if stop_strings and decode is None:
            raise ValueError("stop_strings need decode= (a function from token ids to text, e.g. tokenizer.decode)")
        self.eos = eos_token_id
        self.sequences = [list(s) for s in (stop_sequences or []) if len(s)]
        self.strings = [s for s in (stop_strings or []) if s]
        self.decode = decode
        self.done = torch.zeros(batch, dtype=torch.bool, device=device)
        self.generated: list[list[int]] = [[] for _ in range(batch)]

    @property
    def active(self) -> bool:
        """Whether any condition can stop a row (otherwise generation always runs max_new_tokens)."""
        return self.eos is not None or bool(self.sequences) or bool(self.strings)

    def update(self, tokens: torch.Tensor) -> torch.Tensor:
        """Record this step's tokens [B] (of rows not yet done); returns the updated ``done`` [B]."""
        finished = self.done.clone()
        if self.eos is not None:
            finished |= tokens == self.eos
        if self.sequences or self.strings:
            for row, tok in enumerate(tokens.tolist()):
                if self.done[row]:
                    continue
                gen = self.generated[row]
                gen.append(tok)
                if any(gen[-len(s):] == s for s in self.sequences if len(gen) >= len(s)):
                    finished[row] = True
                elif self.strings:
                    text = self.decode(gen)
                    finished[row] = finished[row] or any(s in text for s in self.strings)
        self.done = finished
        return finished

    def all_done(self) -> bool:
        return bool(self.done.all())
