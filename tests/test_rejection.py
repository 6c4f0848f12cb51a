"""Rejection sampling: K batched candidates per prompt, the argmax-reward one kept, rounds written to the run."""
from __future__ import annotations

import json

import pytest
import torch

import llmarch
from llmarch.checkpoint import load_model
from llmarch.tokenizer import load_tokenizer_for
from llmarch.train import train
from llmarch.train.rejection import best_of_k
from tests.posttrain_util import ft_settings, tiny_model_dir, write_jsonl

ROWS = [{"prompt": f"Count to {i}", "response": "1 2 3"} for i in range(4)]


def test_keeps_the_argmax_reward_candidate(tmp_path):
    base = tiny_model_dir(tmp_path)
    model, tok = load_model(base), load_tokenizer_for(base).with_chat_roles()
    model = llmarch.build(model.config.replace(vocab_size=tok.vocab_size))
    seen = []

    def score(row, text):  # any deterministic reward: here the number of vowels
        seen.append(text)
        return sum(c in "aeiou" for c in text)

    choices = best_of_k(model, tok, ROWS, score, k=4, max_new_tokens=12, temperature=1.0,
                        generator=torch.Generator().manual_seed(0))
    assert len(seen) == 16 and len(choices) == 4
    for i, c in enumerate(choices):
        candidates = seen[4 * i:4 * i + 4]
        assert len(set(candidates)) > 1  # sampled, not four copies
        assert c.scores == [score(None, t) for t in candidates]
        assert c.text == candidates[max(range(4), key=lambda j: (c.scores[j], -j))] and c.score == max(c.scores)
    # the opposite reward keeps another candidate
    worst = best_of_k(model, tok, ROWS, lambda r, t: -score(r, t), k=4, max_new_tokens=12, temperature=1.0,
                      generator=torch.Generator().manual_seed(0))
    assert any(w.text != c.text for w, c in zip(worst, choices))


def test_rs_rounds_train_on_the_loop(tmp_path):
    from llmarch.instructions import VERIFIERS

    if "test_vowels" not in VERIFIERS:
        VERIFIERS.add("test_vowels", lambda row, text: sum(c in "aeiou" for c in text))
    base = tiny_model_dir(tmp_path)
    data = write_jsonl(tmp_path / "prompts.jsonl", ROWS * 2)
    train(llmarch.ModelConfig.from_file(base / "config.json"),
          ft_settings(tmp_path / "run", base, data, objective="rs", steps=4, rs_k=2, rs_rounds=2,
                      rs_max_new_tokens=6, verifier="test_vowels", eval_every=4))
    kept = [json.loads(x) for x in (tmp_path / "run" / "rs" / "train_round_1.jsonl").read_text().splitlines()]
    assert all(r["score"] == max(r["scores"]) and r["messages"][-1]["role"] == "assistant" for r in kept)
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert "rs_train_best_score" in records[0] and records[-1]["step"] == 4


def test_rs_prompts_samples_a_new_subset_each_round(tmp_path):
    from llmarch.instructions import VERIFIERS
    from llmarch.train import TrainConfig

    if "test_vowels" not in VERIFIERS:
        VERIFIERS.add("test_vowels", lambda row, text: sum(c in "aeiou" for c in text))
    rows = [{"prompt": f"Count to {i}", "response": "1 2 3", "split": "train"} for i in range(12)]
    rows += [{"prompt": f"Count down from {i}", "response": "3 2 1", "split": "test"} for i in range(5)]
    base = tiny_model_dir(tmp_path)
    data = write_jsonl(tmp_path / "prompts.jsonl", rows)
    train(llmarch.ModelConfig.from_file(base / "config.json"),
          ft_settings(tmp_path / "run", base, data, objective="rs", steps=4, rs_k=2, rs_rounds=2, rs_prompts=3,
                      rs_max_new_tokens=4, verifier="test_vowels", eval_every=4))
    prompts = []
    for r in (0, 1):
        kept = [json.loads(x) for x in (tmp_path / "run" / "rs" / f"train_round_{r}.jsonl").read_text().splitlines()]
        prompts.append([row["messages"][0]["content"] for row in kept])
    assert [len(p) for p in prompts] == [3, 3] and prompts[0] != prompts[1]  # 3 of 12, drawn again per round
    assert all(p.startswith("Count to ") for p in prompts[0] + prompts[1])
    val = (tmp_path / "run" / "rs" / "val_round_0.jsonl").read_text().splitlines()
    assert len(val) == 3  # validation: one draw of 3 of its 5
    with pytest.raises(ValueError, match="rs_prompts: must be a positive integer"):
        TrainConfig(out=str(tmp_path / "x"), rs_prompts=0)
