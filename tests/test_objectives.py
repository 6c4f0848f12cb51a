"""Objectives on tensors: causal shift, MLM masking statistics, NSP pairs, T5 span corruption round trip."""
from __future__ import annotations

import pytest
import torch

import llmarch
from llmarch import data
from llmarch.tokenizer import train_tokenizer
from llmarch.train.masking import IGNORE, mlm_mask, nsp_pairs, span_corrupt, span_plan, span_restore
from llmarch.train.objectives import default_objective, objective_for


@pytest.fixture(scope="module")
def tok():
    _, files = data.stdlib_files()
    return train_tokenizer(data.read_texts(data.take_bytes(files, 100_000)), vocab_size=500)


def cfg(name: str, **changes) -> llmarch.ModelConfig:
    return llmarch.preset(name, vocab_size=500, **changes)


def test_causal_shift(tok):
    obj = objective_for(None, cfg("llama-tiny"), tok)
    chunk = torch.arange(20).view(2, 10)
    b = obj.make_batch(chunk, torch.Generator())
    assert torch.equal(b.inputs["input_ids"], chunk[:, :-1]) and torch.equal(b.labels["lm"], chunk[:, 1:])
    assert b.counts == {"lm": 18}


def test_mlm_statistics(tok):
    g = torch.Generator().manual_seed(0)
    special = torch.tensor(sorted(tok.special_ids))
    ids = torch.randint(0, tok.vocab_size, (64, 512), generator=g)
    ids[:, ::7] = tok.eos_id  # plenty of special tokens in the text
    ids[:, 3::11] = tok.sentinel_ids[0]
    out, labels = mlm_mask(ids, tok.mask_id, special, tok.vocab_size, g)
    is_special = torch.isin(ids, special)
    selected = labels != IGNORE
    assert not (selected & is_special).any()  # never a special token
    assert torch.equal(out[is_special], ids[is_special])
    assert torch.equal(labels[selected], ids[selected]) and torch.equal(out[~selected], ids[~selected])
    rate = selected.sum() / (~is_special).sum()
    n = int(selected.sum())
    masked = (out[selected] == tok.mask_id).sum() / n
    kept = (out[selected] == ids[selected]).sum() / n
    replaced = 1 - masked - kept
    assert abs(rate - 0.15) < 0.005, rate
    assert abs(masked - 0.8) < 0.015 and abs(kept - 0.1) < 0.015 and abs(replaced - 0.1) < 0.015
    replacements = out[selected & (out != tok.mask_id) & (out != ids)]
    assert not torch.isin(replacements, special).any()  # random tokens are never specials either
    # dynamic: a second draw masks other positions
    _, labels2 = mlm_mask(ids, tok.mask_id, special, tok.vocab_size, g)
    assert not torch.equal(labels, labels2)


def test_nsp_pairs(tok):
    g = torch.Generator().manual_seed(0)
    chunks = torch.arange(4000, 4000 + 16 * 21).view(16, 21)
    ids, types, is_random = nsp_pairs(chunks, tok.cls_id, tok.sep_id, g)
    assert ids.shape == (16, 24) and types.shape == (16, 24)
    assert (ids[:, 0] == tok.cls_id).all() and (ids[:, 11] == tok.sep_id).all() and (ids[:, -1] == tok.sep_id).all()
    assert (types[:, :12] == 0).all() and (types[:, 12:] == 1).all()
    for r in range(16):
        follows = torch.equal(ids[r, 12:-1], chunks[r, 10:])
        assert follows == (is_random[r] == 0)
    assert 0 < is_random.sum() < 16


def test_mlm_objective_with_nsp(tok):
    obj = objective_for("mlm", cfg("bert-tiny"), tok, nsp=True)
    b = obj.make_batch(torch.randint(100, 400, (4, 32)), torch.Generator().manual_seed(1))
    assert set(b.inputs) == {"input_ids", "token_type_ids"} and set(b.labels) == {"lm", "nsp"}
    assert b.counts["nsp"] == 4 and b.counts["lm"] == int((b.labels["lm"] != IGNORE).sum())


def test_span_corruption_round_trip(tok):
    g = torch.Generator().manual_seed(0)
    text = data.read_texts(data.stdlib_files()[1][:3])[0]
    ids = torch.tensor(tok.encode(text)[:8 * 128]).view(8, 128)
    inputs, targets = span_corrupt(ids, tok.sentinel_ids, tok.eos_id, g)
    n_noise, n_spans = span_plan(128)
    assert (n_noise, n_spans) == (19, 6)
    assert inputs.shape == (8, 128 - n_noise + n_spans + 1) and targets.shape == (8, n_noise + n_spans + 1)
    for r in range(8):
        sentinels_in = [t for t in inputs[r].tolist() if t in tok.sentinel_ids]
        assert sentinels_in == tok.sentinel_ids[:n_spans]  # each span -> the next sentinel, in order
        assert targets[r, 0] == tok.sentinel_ids[0] and targets[r, -1] == tok.eos_id
        assert span_restore(inputs[r], targets[r], tok.sentinel_ids) == ids[r].tolist()
    assert tok.decode(sum((span_restore(inputs[r], targets[r], tok.sentinel_ids) for r in range(8)), [])) == \
        tok.decode(ids.flatten().tolist())
    # mean span length 3 and 15 % noise, over many draws
    lengths = []
    for _ in range(200):
        inp, tgt = span_corrupt(ids[:1], tok.sentinel_ids, tok.eos_id, g)
        marks = [i for i, t in enumerate(tgt[0].tolist()) if t in tok.sentinel_ids] + [tgt.shape[1] - 1]
        lengths += [b - a - 1 for a, b in zip(marks, marks[1:])]
    assert min(lengths) >= 1 and abs(sum(lengths) / len(lengths) - 19 / 6) < 1e-9


def test_span_objective_batch(tok):
    obj = objective_for(None, cfg("t5-tiny", decoder_start_token_id=7), tok)
    b = obj.make_batch(torch.randint(100, 400, (2, 64)), torch.Generator().manual_seed(0))
    dec, tgt = b.inputs["decoder_input_ids"], b.labels["lm"]
    assert (dec[:, 0] == 7).all() and torch.equal(dec[:, 1:], tgt[:, :-1])  # the config's start token
    with pytest.raises(ValueError, match="sentinel tokens"):
        span_corrupt(torch.zeros(1, 4096, dtype=torch.long), tok.sentinel_ids, tok.eos_id, torch.Generator())


def test_objective_kind_checks(tok):
    with pytest.raises(ValueError, match="trains encoder models"):
        objective_for("mlm", cfg("llama-tiny"), tok)
    with pytest.raises(ValueError, match="unknown objective"):
        objective_for("nope", cfg("llama-tiny"), tok)
    with pytest.raises(ValueError, match="nsp"):
        objective_for("causal_lm", cfg("llama-tiny"), tok, nsp=True)
    with pytest.raises(ValueError, match="nsp: next-sentence prediction needs a head with NSP logits"):
        objective_for("mlm", cfg("roberta-tiny"), tok, nsp=True)
    with pytest.raises(ValueError, match="nothing pre-trains kind 'encoder' with head 'classification'"):
        objective_for(None, cfg("bert-tiny", head="classification", n_labels=3), tok)


@pytest.mark.parametrize("name,expected", [("llama-tiny", ("causal_lm", False)), ("bert-tiny", ("mlm", True)),
                                           ("roberta-tiny", ("mlm", False)), ("t5-tiny", ("span", False)),
                                           ("t5-v1.1-tiny", ("span", False)), ("transformer-tiny", ("span", False))])
def test_default_objective_follows_head_and_kind(tok, name, expected):
    assert default_objective(cfg(name)) == expected
    obj = objective_for(None, cfg(name), tok)
    assert (obj.name, getattr(obj, "nsp", False)) == expected
    assert objective_for(obj.name, cfg(name), tok, nsp=False).__dict__.get("nsp", False) is False
