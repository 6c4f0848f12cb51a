"""Rejection-sampling fine-tuning (LLaMA-2, Touvron et al. 2023 §3.2.3): for every prompt sample K candidates
with batched generation, score them with a reward (a reward model or a programmatic verifier), keep the best,
and fine-tune on the kept answers with the SFT loss; several rounds, each sampling from the current model.

The kept answers of round r are written to ``RUN/rs/round_r.jsonl`` and read back on ``--resume``, so a resumed
run trains on the same examples.
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from llmarch.config import ModelConfig
from llmarch.infer.generate import generate
from llmarch.tokenizer import Tokenizer
from llmarch.train import chat_data as cd
from llmarch.train.objectives import OBJECTIVES
from llmarch.train.sft import SFT, encode_rows

log = logging.getLogger(__name__)
Scorer = Callable[[dict, str], float]  # (row, answer) -> reward


@dataclass
class Choice:
    text: str  # the kept (highest-scoring) candidate
    score: float
    scores: list[float]  # every candidate's score, in sampling order


def prompt_of(row: dict) -> list[dict]:
    """The messages of a row's prompt (``prompt``, or every message before the last assistant one)."""
    if "prompt" in row:
        return cd.prompt_messages(row["prompt"])
    messages = cd.conversation(row)
    return messages[:-1] if messages[-1]["role"] == "assistant" else messages


def sample_candidates(model, tok: Tokenizer, prompts: list[list[dict]], k: int, max_new_tokens: int,
                      temperature: float, generator: torch.Generator, batch: int = 32) -> list[list[str]]:
    """K sampled replies per prompt (batched: rows are prompt-major copies, left-padded)."""
    stops = tok.end_of_turn_ids
    pad = tok.pad_id if tok.pad_id is not None else stops[0]
    encoded = [tok.apply_chat_template(p, add_generation_prompt=True)[0] for p in prompts]
    rows = [ids for ids in encoded for _ in range(k)]
    texts = []
    for s in range(0, len(rows), batch):
        chunk = rows[s:s + batch]
        T = max(map(len, chunk))
        ids = torch.full((len(chunk), T), pad, dtype=torch.long)
        mask = torch.zeros(len(chunk), T, dtype=torch.long)
        for i, r in enumerate(chunk):
            ids[i, T - len(r):], mask[i, T - len(r):] = torch.tensor(r), 1
        out = generate(model, ids, max_new_tokens=max_new_tokens, temperature=temperature, attention_mask=mask,
                       eos_token_id=stops[0], stop_sequences=[[i] for i in stops[1:]], pad_token_id=pad,
                       generator=generator)
        for new in out[:, T:].tolist():
            end = next((j for j, t in enumerate(new) if t in stops), len(new))
            texts.append(tok.decode(new[:end], skip_special_tokens=True))
    return [texts[i * k:(i + 1) * k] for i in range(len(prompts))]


def best_of_k(model, tok: Tokenizer, rows: list[dict], score: Scorer, k: int, max_new_tokens: int = 64,
              temperature: float = 1.0, generator: torch.Generator | None = None) -> list[Choice]:
    """For each row: K candidates, each scored; the argmax (the first on ties) is kept."""
    generator = generator or torch.Generator().manual_seed(0)
    candidates = sample_candidates(model, tok, [prompt_of(r) for r in rows], k, max_new_tokens, temperature,
                                   generator)
    out = []
    for row, texts in zip(rows, candidates):
        scores = [float(score(row, t)) for t in texts]
        best = max(range(len(texts)), key=lambda i: (scores[i], -i))
        out.append(Choice(texts[best], scores[best], scores))
    return out


def reward_model_scorer(path: str, tok: Tokenizer) -> Scorer:
    """A scorer from a reward-model checkpoint (scalar head): the score of prompt + answer."""
    from llmarch.checkpoint import load_model
    from llmarch.train.posttrain import model_dir

    rm = load_model(model_dir(path)).eval()

    def score(row: dict, answer: str) -> float:
        ids, _ = tok.apply_chat_template(prompt_of(row) + [{"role": "assistant", "content": answer}])
        with torch.no_grad():
            out = rm(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long))
        return float(out.logits.reshape(-1)[0])
    return score


class RejectionSource(cd.ExampleSource):
    """The kept answers of each round as SFT rows; round r covers samples [r N, (r + 1) N) of the stream and is
    sampled from the model as it is when the round starts."""

    def __init__(self, objective: "RejectionSampling", rows: list, tc, shuffle: bool, name: str, rounds: int):
        self.objective, self.rows, self.tc, self.shuffle_rows, self.name = objective, rows, tc, shuffle, name
        self.rounds = rounds
        self.per_round = math.ceil(tc.steps * tc.batch_size * tc.grad_accum / rounds)
        self.cache: dict[int, cd.ExampleSource] = {}

    def _round(self, r: int) -> cd.ExampleSource:
        if r not in self.cache:
            self.cache[r] = cd.ExampleSource(self.objective.round_rows(self.rows, r, self.name), seed=self.tc.seed + r,
                                             shuffle=self.shuffle_rows, name=self.name)
        return self.cache[r]

    def batch(self, start: int, size: int) -> list:
        return self._round(min(start // self.per_round, self.rounds - 1)).batch(start, size)

    def take(self, start: int, size: int, length: int) -> list:
        return self.batch(start, size)


@OBJECTIVES.register("rs")
class RejectionSampling(SFT):
    """SFT on the best of K sampled answers per prompt, scored by ``verifier`` (a VERIFIERS name) or a reward
    model, resampled each of ``rs_rounds`` rounds."""

    name = "rs"
    model_kind = "decoder"

    @classmethod
    def from_config(cls, tokenizer: Tokenizer, cfg: ModelConfig, nsp: bool = False) -> "RejectionSampling":
        return cls(tokenizer, cfg.vocab_size, nsp)

    def attach(self, model) -> None:
        self.model = model
        self._metrics: dict[str, list[float]] = {}

    def sources(self, splits, tc) -> tuple:
        self.tc, self.packing = tc, tc.packing
        if tc.reward_model is not None:
            self.score = reward_model_scorer(tc.reward_model, self.tokenizer)
        else:
            from llmarch.instructions import VERIFIERS

            if tc.verifier is None:
                raise ValueError("rs: name a scorer: --verifier NAME (e.g. stdlib) or --reward-model DIR")
            self.score = VERIFIERS[tc.verifier]
        return (RejectionSource(self, splits.train, tc, True, f"{tc.data} (train)", tc.rs_rounds),
                RejectionSource(self, splits.val, tc, False, f"{tc.data} (validation)", 1))

    def round_rows(self, rows: list, r: int, name: str) -> list:
        """Round ``r``'s SFT rows: read from RUN/rs/ when a previous (resumed) run wrote them, else sampled."""
        part = "val" if "validation" in name else "train"
        path = Path(self.tc.out) / "rs" / f"{part}_round_{r}.jsonl"
        if path.is_file():
            kept = [(n, row) for n, row in cd.read_jsonl(path)]
        else:
            tc = self.tc
            if tc.rs_prompts is not None and len(rows) > tc.rs_prompts:  # validation: one draw (round 0 only)
                draw = torch.Generator().manual_seed(tc.seed * 104729 + r)  # this round's prompts, in file order
                rows = [rows[i] for i in sorted(torch.randperm(len(rows), generator=draw)[:tc.rs_prompts].tolist())]
            gen = torch.Generator().manual_seed(tc.seed * 7919 + r)
            choices = best_of_k(self.model, self.tokenizer, [row for _, row in rows], self.score, tc.rs_k,
                                tc.rs_max_new_tokens, tc.rs_temperature, gen)
            kept = [(n, {"messages": prompt_of(row) + [{"role": "assistant", "content": c.text}], "score": c.score,
                         "scores": c.scores}) for (n, row), c in zip(rows, choices)]
            if tc.rs_min_score is not None and part == "train":
                good = [k for k in kept if k[1]["score"] >= tc.rs_min_score]
                if not good:
                    log.warning("rs round %d: no candidate scored >= rs_min_score %g; keeping every prompt's best", r,
                                tc.rs_min_score)
                kept = good or kept
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_text("".join(json.dumps(row) + "\n" for _, row in kept))
            tmp.replace(path)
            best = sum(c.score for c in choices) / len(choices)
            mean = sum(sum(c.scores) / len(c.scores) for c in choices) / len(choices)
            log.info("rs round %d (%s): mean best-of-%d score %.3f, mean candidate score %.3f, %d of %d prompts kept",
                     r, part, tc.rs_k, best, mean, len(kept), len(choices))
            self._metrics[f"rs_{part}_best_score"] = [best, 1.0]
            self._metrics[f"rs_{part}_mean_score"] = [mean, 1.0]
        examples = encode_rows(kept, self.encode, self.tc.seq_len + self.extra_tokens, str(path), name)
        return self.rows(examples, self.tc.seq_len + self.extra_tokens)

    def pop_metrics(self) -> dict[str, tuple[float, float]]:
        out = {k: (v[0], v[1]) for k, v in self._metrics.items()}
        self._metrics = {}
        return out


__all__ = ["best_of_k", "sample_candidates", "RejectionSampling", "Choice", "reward_model_scorer", "prompt_of"]
