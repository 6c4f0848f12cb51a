"""Example data for post-training: JSONL rows -> conversations -> token ids with a loss mask -> rows of one or
several packed conversations, visited in a seeded order like :class:`~llmarch.data.PackedSequences`.

Rows (one JSON object per line): ``{"messages": [{"role", "content"}, ...]}``, ``{"prompt", "response"}`` and,
for preferences, ``{"prompt", "chosen", "rejected"}``; a prompt may be a string or a messages list. A bad row is a
ValueError naming the file and the line. Truncation never drops an answer silently: a conversation longer than
the row keeps its start if an answer survives there, else its end; every cut is counted and logged.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from llmarch.data import PackedSequences
from llmarch.train.masking import IGNORE

log = logging.getLogger(__name__)


def read_jsonl(path: str | os.PathLike) -> list[tuple[int, dict]]:
    """(line number, object) of every non-blank line; a ValueError naming the file and line of a bad one."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--data {path}: no such file (expected JSONL: one JSON object per line)")
    rows = []
    with open(path, encoding="utf-8", errors="replace") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e.msg}); expected one JSON object per line") from None
            if not isinstance(obj, dict):
                raise ValueError(f"{path}:{n}: expected a JSON object, got {type(obj).__name__}")
            rows.append((n, obj))
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


def prompt_messages(prompt) -> list[dict]:
    """A prompt (text, or a messages list) as messages."""
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def conversation(row: dict) -> list[dict]:
    """The messages of an SFT row: ``messages``, or ``prompt`` + ``response``."""
    if "messages" in row:
        return row["messages"]
    if "prompt" in row and "response" in row:
        return prompt_messages(row["prompt"]) + [{"role": "assistant", "content": row["response"]}]
    raise ValueError(f"expected 'messages' or 'prompt' + 'response', got keys {sorted(row)}")


def preference(row: dict) -> tuple[list[dict], list[dict]]:
    """(chosen conversation, rejected conversation) of a preference row."""
    if not {"prompt", "chosen", "rejected"} <= set(row):
        raise ValueError(f"expected 'prompt', 'chosen' and 'rejected', got keys {sorted(row)}")
    prompt = prompt_messages(row["prompt"])
    return ([*prompt, {"role": "assistant", "content": row["chosen"]}],
            [*prompt, {"role": "assistant", "content": row["rejected"]}])


@dataclass
class Cuts:
    """What truncation removed: rows cut, tokens cut, trained tokens cut, rows dropped (nothing trained left)."""

    rows: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    dropped: int = 0
    where: list[str] = field(default_factory=list)

    def report(self, name: str) -> None:
        if self.rows or self.dropped:
            log.warning("%s: truncated %d conversation(s) (%d tokens, %d of them trained on), dropped %d with no "
                        "answer left; first: %s", name, self.rows, self.tokens, self.trained_tokens, self.dropped,
                        ", ".join(self.where[:5]))


def fit(ids: list[int], mask: list[int], limit: int, cuts: Cuts, where: str) -> tuple[list[int], list[int]] | None:
    """ids/mask cut to ``limit`` tokens: the start when it keeps a trained token, else the end. None (counted as
    dropped) when nothing trained remains."""
    if len(ids) > limit:
        keep = slice(0, limit) if any(mask[:limit]) else slice(len(ids) - limit, len(ids))
        cuts.rows += 1
        cuts.tokens += len(ids) - limit
        cuts.trained_tokens += sum(mask) - sum(mask[keep])
        cuts.where.append(where)
        ids, mask = ids[keep], mask[keep]
    if not any(mask):
        cuts.dropped += 1
        cuts.where.append(where)
        return None
    return ids, mask


@dataclass
class Row:
    """One training row: tokens [L], loss mask [L] (1 = trained on), document ids [L] (1, 2, ... per packed
    conversation)."""

    ids: list[int]
    mask: list[int]
    docs: list[int]


def pack(examples: list[tuple[list[int], list[int]]], limit: int, packing: bool) -> list[Row]:
    """Examples into rows of at most ``limit`` tokens: one per row, or (``packing``) greedily appended in order
    while they fit."""
    rows: list[Row] = []
    for ids, mask in examples:
        last = rows[-1] if rows else None
        if packing and last is not None and len(last.ids) + len(ids) <= limit:
            doc = last.docs[-1] + 1
            last.ids += ids
            last.mask += mask
            last.docs += [doc] * len(ids)
        else:
            rows.append(Row(list(ids), list(mask), [1] * len(ids)))
    return rows


def right_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Lists of ids -> right-padded ids [B, L] and their mask [B, L] (1 = real)."""
    L = max(len(x) for x in seqs)
    ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), L, dtype=torch.long)
    for i, x in enumerate(seqs):
        ids[i, :len(x)], mask[i, :len(x)] = torch.tensor(x, dtype=torch.long), 1
    return ids, mask


def collate(rows: list[Row], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded tensors [B, L]: ids (padding ``pad_id``), mask (0 on padding), docs (0 on padding)."""
    return {"ids": right_pad([r.ids for r in rows], pad_id)[0], "mask": right_pad([r.mask for r in rows], 0)[0],
            "docs": right_pad([r.docs for r in rows], 0)[0]}


def causal_targets(t: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Model inputs and next-token labels of collated rows: position t predicts token t+1 when that token is
    trained on and belongs to the same conversation (never across a packing boundary)."""
    ids, mask, docs = t["ids"], t["mask"], t["docs"]
    same = docs[:, 1:] == docs[:, :-1]
    labels = ids[:, 1:].masked_fill(~((mask[:, 1:] == 1) & same), IGNORE)
    return {"input_ids": ids[:, :-1], "document_ids": docs[:, :-1]}, labels


class ExampleSource(PackedSequences):
    """A list of items (rows, or preference pairs) as an endless seeded stream: sample ``i`` is item
    ``perm_e[i % n]`` of epoch ``e``; ``batch`` returns a list of items."""

    def __init__(self, items: list, seed: int = 0, shuffle: bool = True, name: str = "data"):
        if not items:
            raise ValueError(f"{name}: no examples left (too few rows, or all dropped by truncation); add rows or "
                             "raise --seq-len")
        self.items, self.n, self.seed, self.shuffle, self._perm = items, len(items), seed, shuffle, None

    def chunk(self, i: int):
        return self.items[i]

    def batch(self, start: int, size: int) -> list:
        return [self.chunk(int(self._order(divmod(i, self.n)[0])[i % self.n])) for i in range(start, start + size)]

    def take(self, start: int, size: int, length: int) -> list:
        return self.batch(start, size)  # rows keep their own lengths


def is_validation_row(line: int, val_fraction: float) -> bool:
    """A row's split: a hash of its line number (deterministic, independent of the other rows)."""
    return int(hashlib.sha1(f"line{line}".encode()).hexdigest()[:8], 16) / 2**32 < val_fraction


def split_rows(rows: list[tuple[int, dict]], val_fraction: float) -> tuple[list, list]:
    """(train, validation) rows: by each row's ``split`` field when every row has one ("test" = held out, as
    ``llmarch data instructions`` writes), else by a hash of the line; validation gets at least one row."""
    if all(r[1].get("split") in ("train", "test") for r in rows):
        val = [r for r in rows if r[1]["split"] == "test"]
    else:
        val = [r for r in rows if is_validation_row(r[0], val_fraction)]
    if not val and len(rows) > 1:
        val = [rows[-1]]
    held = {r[0] for r in val}
    train = [r for r in rows if r[0] not in held]
    if not train:
        raise ValueError(f"--data has {len(rows)} row(s); need at least 2 to split train/validation")
    return train, val


__all__ = ["read_jsonl", "conversation", "preference", "prompt_messages", "fit", "pack", "collate",
           "causal_targets", "right_pad", "ExampleSource", "split_rows", "Row", "Cuts"]
