"""Training the encoder and encoder-decoder presets end to end: MLM (+ NSP through the pretraining head) on BERT and
RoBERTa, span corruption on T5 with the config's decoder start token; activation checkpointing on both kinds; the
CLI picks the objective from the config."""
from __future__ import annotations

import logging

import pytest
import torch

import llmarch
from llmarch.train import loop, train
from llmarch.train.masking import IGNORE
from llmarch.train.metrics import read_metrics
from llmarch.train.objectives import ce_sum, objective_for
from llmarch.train.optim import enable_activation_checkpointing
from llmarch.train.samples import span_after_sentinel
from tests.train_util import settings  # noqa: F401  (fixture)


RUN = dict(steps=40, batch_size=8, eval_every=4, eval_batches=4, lr=5e-3, warmup=4)  # ~2 s per preset


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def spy_batches(monkeypatch) -> list:
    """Record every batch the loop's objective makes."""
    seen = []
    original = loop.Trainer._forward

    def forward(self, batch):
        seen.append(batch)
        return original(self, batch)

    monkeypatch.setattr(loop.Trainer, "_forward", forward)
    return seen


@pytest.mark.parametrize("name", ["bert-tiny", "roberta-tiny"])
def test_encoder_presets_train_with_mlm(tmp_path, cache, monkeypatch, caplog, name):
    """Must show: loss falls on a small run for an encoder (MLM). bert-tiny's pretraining head adds NSP."""
    seen = spy_batches(monkeypatch)
    with caplog.at_level(logging.INFO):
        result = train(llmarch.preset(name), settings(tmp_path / "run", cache, samples=1, **RUN))
    vals = [v for _, v in result.val_losses]
    assert vals[-1] < vals[0] - 0.4 and vals[-1] < min(vals[:3]), vals
    records = read_metrics(tmp_path / "run")
    nsp = name == "bert-tiny"  # the default objective follows the head: pretraining -> mlm + nsp
    assert ("loss_nsp" in records[0]) == nsp and ("loss_lm" in records[0]) == nsp
    batch = seen[0]
    assert set(batch.inputs) == ({"input_ids", "token_type_ids"} if nsp else {"input_ids"})
    assert batch.inputs["input_ids"].shape == (8, 32) and batch.counts["lm"] > 0
    if nsp:
        assert set(batch.labels["nsp"].tolist()) == {0, 1} and batch.counts["nsp"] == 8
        r = records[0]
        assert r["loss"] == pytest.approx(r["loss_lm"] + r["loss_nsp"])
        assert 0.3 < r["loss_nsp"] < 1.2  # about ln 2 before it learns: the NSP term reaches the logits
    assert result.samples == [] and "samples: skipped (an encoder" in caplog.text


def test_nsp_logits_and_labels_of_the_pretraining_head(tmp_path, cache):
    """out.nsp_logits is [B, 2] and the NSP loss is cross-entropy of label 1 = random next (BERT's convention)."""
    from llmarch.tokenizer import load_tokenizer

    train(llmarch.preset("bert-tiny"), settings(tmp_path / "run", cache, steps=1, eval_every=1))
    tok = load_tokenizer(tmp_path / "run")
    cfg = llmarch.preset("bert-tiny", vocab_size=tok.vocab_size)
    obj = objective_for(None, cfg, tok)
    batch = obj.make_batch(torch.randint(300, tok.vocab_size, (4, 32)), torch.Generator().manual_seed(0))
    model = llmarch.build(cfg).eval()
    out = model(**batch.inputs)
    assert out.nsp_logits.shape == (4, 2) and out.logits.shape == (4, 32, tok.vocab_size)
    sums = obj.loss_sums(out, batch)
    labels = batch.labels["nsp"]
    picked = out.nsp_logits.log_softmax(-1).gather(1, labels[:, None]).squeeze(1)
    torch.testing.assert_close(sums["nsp"], -picked.sum())
    torch.testing.assert_close(sums["lm"], ce_sum(out.logits, batch.labels["lm"]))
    types = batch.inputs["token_type_ids"]
    assert (types[:, 0] == 0).all() and (types[:, -1] == 1).all()
    assert (batch.labels["lm"][batch.inputs["input_ids"] == tok.cls_id] == IGNORE).all()


@pytest.mark.parametrize("name", ["t5-tiny"])
def test_encoder_decoder_preset_trains_with_span_corruption(tmp_path, cache, monkeypatch, name):
    """Must show: loss falls on a small run for an encoder-decoder (span corruption); samples go through the
    encoder and come back as the first span."""
    seen = spy_batches(monkeypatch)
    result = train(llmarch.preset(name), settings(tmp_path / "run", cache, samples=1, sample_tokens=6, **RUN))
    vals = [v for _, v in result.val_losses]
    assert vals[-1] < vals[0] - 0.4 and vals[-1] < min(vals[:3]), vals
    cfg = result.config
    assert cfg.vocab_size == 400 and cfg.decoder_start_token_id == cfg.pad_token_id == 0 and cfg.eos_token_id == 2
    batch = seen[0]
    dec, tgt = batch.inputs["decoder_input_ids"], batch.labels["lm"]
    assert (dec[:, 0] == cfg.decoder_start_token_id).all() and torch.equal(dec[:, 1:], tgt[:, :-1])
    assert batch.inputs["input_ids"].shape[1] < 32 and (tgt[:, -1] == cfg.eos_token_id).all()
    assert len(result.samples) == 1 and result.samples[0][0]  # (prompt, span) from the first validation file
    assert span_after_sentinel([40, 7, 8, 41, 9], [40, 41]) == [7, 8]


@pytest.mark.parametrize("name", ["t5-tiny", "bert-tiny"])
def test_activation_checkpointing_on_encoder_kinds(name):
    """Same loss and gradients with per-block checkpointing; T5's relative bias is built in the first block of
    each stack and shared, so a recomputation must rebuild it as the first run did."""
    cfg = llmarch.preset(name, dropout=0.1)
    torch.manual_seed(0)
    model, ref = llmarch.build(cfg), llmarch.build(cfg)
    ref.load_state_dict(model.state_dict())
    assert enable_activation_checkpointing(model) == cfg.n_layers + (cfg.n_decoder_layers or cfg.n_layers) * (
        cfg.kind == "encoder_decoder")
    g = torch.Generator().manual_seed(1)
    kw = {"input_ids": torch.randint(3, cfg.vocab_size, (2, 16), generator=g)}
    if cfg.kind == "encoder_decoder":
        kw["decoder_input_ids"] = torch.randint(3, cfg.vocab_size, (2, 7), generator=g)
    losses = []
    for m in (model, ref):
        torch.manual_seed(2)  # the same dropout masks; checkpointing replays the RNG in the recomputation
        losses.append(m(**kw).logits.float().square().mean())
        losses[-1].backward()
    torch.testing.assert_close(losses[0], losses[1], rtol=0, atol=0)
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=n)


def test_cli_trains_presets_with_their_vocabulary_and_objective(tmp_path, cache, capsys):
    from llmarch.checkpoint import load_model
    from llmarch.cli import main
    from llmarch.tokenizer import load_tokenizer
    from llmarch.train.checkpoints import resolve_model_dir

    common = ["--steps", "2", "--seq-len", "32", "--batch-size", "2", "--max-data-mb", "0.2", "--vocab-size", "400",
              "--cache-dir", str(cache), "--eval-every", "2", "--samples", "1", "--sample-tokens", "4",
              "--no-progress"]
    assert main(["train", "--preset", "bert-tiny", "--out", str(tmp_path / "bert")] + common) == 0
    assert "loss_nsp" in read_metrics(tmp_path / "bert")[-1]
    assert main(["train", "--preset", "bert-tiny", "--no-nsp", "--out", str(tmp_path / "bert2")] + common) == 0
    assert "loss_nsp" not in read_metrics(tmp_path / "bert2")[-1]
    assert main(["train", "--preset", "t5-tiny", "--out", str(tmp_path / "t5")] + common) == 0
    out = capsys.readouterr().out
    assert out.count("trained to step 2") == 3 and out.count("--- sample ---") == 1  # t5 only
    prompt = "def f(x):<extra_id_0>"
    assert main(["generate", "--checkpoint", str(tmp_path / "t5"), "--prompt", prompt, "--max-new-tokens", "3",
                 "--temperature", "0"]) == 0
    tok, model = load_tokenizer(tmp_path / "t5"), load_model(resolve_model_dir(tmp_path / "t5"))
    ids = llmarch.generate(model, torch.tensor([tok.encode(prompt)]), max_new_tokens=3, eos_token_id=tok.eos_id)
    assert capsys.readouterr().out == tok.decode(ids[0, 1:].tolist()) + "\n"  # without the decoder start token
    assert main(["train", "--preset", "t5-tiny", "--objective", "mlm", "--out", str(tmp_path / "x")] + common) == 2
    assert "'mlm' trains encoder models" in capsys.readouterr().err
