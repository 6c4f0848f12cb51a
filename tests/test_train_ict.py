"""Dense-retriever training with the inverse cloze task: pairs rebuild their passage, the loss is in-batch
negatives written out, and `llmarch train --objective ict` trains an encoder whose retrieval beats chance."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import llmarch
from llmarch.train.retrieval_objective import InverseCloze, ict_pairs, retrieval_accuracy
from tests.train_util import settings


class Tok:
    def require(self, role):
        return {"cls": 5, "pad": 0}[role]


def test_pairs_split_each_passage_into_question_and_context():
    chunk = torch.arange(100, 132).view(2, 16)
    ids, mask = ict_pairs(chunk, 4, cls_id=5, pad_id=0, generator=torch.Generator().manual_seed(0))
    assert ids.shape == (4, 17) and (ids[:, 0] == 5).all()
    for b in range(2):
        q, c = ids[b, 1:5].tolist(), ids[2 + b, 1:13].tolist()
        assert mask[b].sum() == 5 and mask[2 + b].sum() == 13
        whole = chunk[b].tolist()
        s = whole.index(q[0])
        assert whole[s:s + 4] == q and whole[:s] + whole[s + 4:] == c


def test_kept_passages_hold_their_span():
    chunk = torch.arange(100, 132).view(2, 16)
    ids, mask = ict_pairs(chunk, 4, cls_id=5, pad_id=0, generator=torch.Generator().manual_seed(0), keep_fraction=1.0)
    assert torch.equal(ids[2:, 1:], chunk) and (mask[2:] == 1).all()
    ids, _ = ict_pairs(chunk, 4, cls_id=5, pad_id=0, generator=torch.Generator().manual_seed(0), keep_fraction=0.0)
    assert (ids[2:, -4:] == 0).all()  # spans cut out: the context rows end in padding


def test_ict_loss_is_in_batch_negatives():
    torch.manual_seed(0)
    cfg = llmarch.preset("dpr-tiny").replace(vocab_size=97)
    model = llmarch.build(cfg)
    obj = InverseCloze(Tok(), 97)
    batch = obj.make_batch(torch.randint(6, 97, (3, 20)), torch.Generator().manual_seed(1))
    out = model(**batch.inputs)
    q, c = out.pooled[:3], out.pooled[3:]
    naive = F.cross_entropy(q @ c.T, torch.arange(3), reduction="sum")
    torch.testing.assert_close(obj.loss_sums(out, batch)["retrieval"], naive)
    with pytest.raises(ValueError, match="first_token"):
        lm = llmarch.build(llmarch.preset("bert-tiny").replace(vocab_size=97, head="mlm"))  # no pooled output
        obj.loss_sums(lm(**batch.inputs), batch)


def test_ict_training_separates_a_batch_of_passages():
    """The objective's gradient does what it should: a few steps on one batch make each question retrieve its own
    passage (well above the 1/8 chance)."""
    torch.manual_seed(0)
    cfg = llmarch.preset("dpr-tiny").replace(vocab_size=97, d_model=32, n_layers=2, n_heads=4, d_ff=64, dropout=0.0)
    model = llmarch.build(cfg)
    obj = InverseCloze(Tok(), 97)
    chunks = torch.randint(6, 97, (8, 24))
    gen = torch.Generator()
    before = retrieval_accuracy(model.eval(), chunks, obj, gen.manual_seed(3))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for step in range(40):
        batch = obj.make_batch(chunks, gen.manual_seed(step))
        loss = obj.loss_sums(model(**batch.inputs), batch)["retrieval"] / 8
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = retrieval_accuracy(model.eval(), chunks, obj, gen.manual_seed(3))
    assert after >= 0.75 and after > before, (before, after)


def test_llmarch_train_runs_the_ict_objective(tmp_path):
    cfg = llmarch.preset("dpr-tiny").replace(d_model=32, n_layers=2, n_heads=4, d_ff=64, max_seq_len=64)
    result = llmarch.train.train(cfg, settings(tmp_path / "run", tmp_path / "cache", steps=3, batch_size=4,
                                               objective="ict"))
    assert result.step == 3 and result.val_losses and result.val_losses[-1][1] > 0
