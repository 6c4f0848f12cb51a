"""Preference objectives: the DPO loss equals the formula written out, the reward loss is Bradley-Terry on the
last real token, and both train on the loop with their metrics logged."""
from __future__ import annotations

import json
import math

import torch

import llmarch
from llmarch.model import ModelOutput
from llmarch.tokenizer import load_tokenizer_for
from llmarch.train import chat_data as cd
from llmarch.train import train
from llmarch.train.preference import DPO, Reward
from tests.posttrain_util import PREF_ROWS, ft_settings, tiny_model_dir, write_jsonl


def pairs_of(tok, rows):
    out = []
    for row in rows:
        c, r = (tok.apply_chat_template(m) for m in cd.preference(row))
        out.append((cd.Row(c[0], c[1], [1] * len(c[0])), cd.Row(r[0], r[1], [1] * len(r[0]))))
    return out


def response_logp(model, ids: list[int], mask: list[int]) -> float:
    """log p of the masked-in tokens, one token at a time (the naive definition)."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()
    return sum(torch.log_softmax(logits[t - 1], -1)[ids[t]].item() for t in range(1, len(ids)) if mask[t])


def test_dpo_loss_equals_the_formula(tmp_path):
    base = tiny_model_dir(tmp_path)
    tok = load_tokenizer_for(base).with_chat_roles()
    cfg = llmarch.ModelConfig.from_file(base / "config.json").replace(vocab_size=tok.vocab_size)
    torch.manual_seed(0)
    policy = llmarch.build(cfg).eval()
    dpo = DPO(tok, tok.vocab_size)
    dpo.beta = 0.5
    dpo.attach(policy)  # the reference is a frozen copy of the starting point
    reference = dpo.reference
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    pairs = pairs_of(tok, PREF_ROWS[:3])
    batch = dpo.make_batch(pairs, torch.Generator())
    loss = dpo.loss_sums(policy(**batch.inputs), batch)["dpo"].item()
    metrics = dpo.pop_metrics()
    expected, margins = 0.0, []
    for c, r in pairs:
        chosen = 0.5 * (response_logp(policy, c.ids, c.mask) - response_logp(reference, c.ids, c.mask))
        rejected = 0.5 * (response_logp(policy, r.ids, r.mask) - response_logp(reference, r.ids, r.mask))
        expected += -math.log(1 / (1 + math.exp(-(chosen - rejected))))
        margins.append(chosen - rejected)
    assert abs(loss - expected) < 1e-4 and abs(loss) > 1e-3
    assert abs(metrics["reward_margin"][0] - sum(margins)) < 1e-4 and metrics["accuracy"][1] == 3
    assert metrics["accuracy"][0] == sum(m > 0 for m in margins)


class LastTokenScore(torch.nn.Module):
    """A stand-in of the scalar head contract: logits [B, 1] read at the last real token."""

    def __init__(self, vocab):
        super().__init__()
        self.table = torch.nn.Embedding(vocab, 1)

    def forward(self, input_ids, attention_mask):
        last = attention_mask.sum(-1) - 1
        score = self.table(input_ids)[torch.arange(len(input_ids)), last]  # [B, 1]
        return ModelOutput(score, score, torch.zeros(()))


def test_reward_loss_is_bradley_terry_on_the_last_real_token(tmp_path):
    tok = load_tokenizer_for(tiny_model_dir(tmp_path)).with_chat_roles()
    rm = Reward(tok, tok.vocab_size)
    torch.manual_seed(0)
    model = LastTokenScore(tok.vocab_size)
    pairs = pairs_of(tok, PREF_ROWS[:4])
    batch = rm.make_batch(pairs, torch.Generator())
    loss = rm.loss_sums(model(**batch.inputs), batch)["reward"].item()
    expected = 0.0
    for c, r in pairs:  # the score of the last token of each whole conversation (the end-of-turn token)
        sc, sr = model.table.weight[c.ids[-1], 0].item(), model.table.weight[r.ids[-1], 0].item()
        expected += math.log1p(math.exp(-(sc - sr)))
    assert abs(loss - expected) < 1e-5
    assert rm.pop_metrics()["accuracy"][1] == 4


def test_dpo_trains_on_the_loop(tmp_path):
    base = tiny_model_dir(tmp_path)
    data = write_jsonl(tmp_path / "pref.jsonl", PREF_ROWS)
    train(llmarch.ModelConfig.from_file(base / "config.json"),
          ft_settings(tmp_path / "run", base, data, objective="dpo", steps=4, lr=1e-2))
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {"accuracy", "reward_chosen", "reward_rejected", "reward_margin", "val_accuracy"} <= set(records[-1])
    assert records[0]["loss"] == records[0]["loss"] and abs(records[0]["loss"] - math.log(2)) < 1e-4  # policy = ref
    assert records[-1]["reward_margin"] > records[0]["reward_margin"]


def test_reward_model_trains_on_the_loop(tmp_path):
    base = tiny_model_dir(tmp_path)
    data = write_jsonl(tmp_path / "pref.jsonl", PREF_ROWS)
    result = train(llmarch.ModelConfig.from_file(base / "config.json"),
                   ft_settings(tmp_path / "run", base, data, objective="reward", steps=2))
    assert (result.config.head, result.config.n_labels) == ("last_token", 1)
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {"accuracy", "reward_margin", "val_accuracy"} <= set(records[-1])
