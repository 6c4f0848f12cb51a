"""Supervised fine-tuning: packed rows equal each conversation alone, loss only on masked-in tokens, truncation
that never drops an answer silently, bad rows named by file and line, and a run from a pretrained directory."""
from __future__ import annotations

import json

import pytest
import torch

import llmarch
from llmarch.train import chat_data as cd
from llmarch.train import train
from llmarch.train.masking import IGNORE
from llmarch.train.sft import SFT
from tests.posttrain_util import SFT_ROWS, ft_settings, tiny_model_dir, write_jsonl


@pytest.mark.parametrize("preset", ["llama-tiny", "gpt2-tiny", "bloom-tiny"])  # rope, learned positions, alibi
def test_packed_rows_equal_each_conversation_alone(preset):
    cfg = llmarch.preset(preset).replace(d_model=32, n_layers=2, n_heads=4, d_ff=64, max_seq_len=64, vocab_size=97)
    if cfg.kv_heads != cfg.n_heads:
        cfg = cfg.replace(n_kv_heads=2)
    torch.manual_seed(0)
    model = llmarch.build(cfg).eval()
    g = torch.Generator().manual_seed(1)
    docs = [torch.randint(0, 97, (n,), generator=g) for n in (7, 12, 5)]
    row = torch.cat(docs)[None]
    ids = torch.cat([torch.full((len(d),), i + 1) for i, d in enumerate(docs)])[None]
    with torch.no_grad():
        packed = model(row, document_ids=ids).logits[0]
        alone = torch.cat([model(d[None]).logits[0] for d in docs])
        plain = model(row).logits[0]  # without document ids, later documents see earlier ones
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=0)
    assert (plain[7:] - alone[7:]).abs().max() > 1e-3


def test_masked_out_tokens_get_no_gradient(tmp_path):
    base = tiny_model_dir(tmp_path)
    tok = llmarch.tokenizer.load_tokenizer_for(base).with_chat_roles()
    model = llmarch.build(llmarch.ModelConfig.from_file(base / "config.json").replace(vocab_size=tok.vocab_size))
    sft = SFT(tok, tok.vocab_size)
    examples = [tok.apply_chat_template(cd.conversation(r)) for r in SFT_ROWS[:3]]
    rows = cd.pack(examples, 200, packing=True)
    assert len(rows) == 1 and max(rows[0].docs) == 3
    batch = sft.make_batch(rows, torch.Generator())
    out = model(**batch.inputs)
    out.logits.retain_grad()
    sft.loss_sums(out, batch)["lm"].backward()
    labels = batch.labels["lm"][0]
    grad_rows = out.logits.grad[0].abs().sum(-1)
    assert (grad_rows[labels == IGNORE] == 0).all() and (grad_rows[labels != IGNORE] > 0).all()
    trained = tok.decode(labels[labels != IGNORE].tolist())
    assert trained == "0.<|end|>2.<|end|>4.<|end|>"  # only the answers and their end-of-turn tokens
    # no label crosses a packing boundary: the first token of a conversation is never a target of the one before
    docs = batch.inputs["document_ids"][0]
    boundary = torch.nonzero(docs[1:] != docs[:-1])[:, 0]
    assert (labels[boundary] == IGNORE).all()


def test_truncation_keeps_an_answer_and_counts_cuts(caplog):
    cuts = cd.Cuts()
    ids, mask = list(range(20)), [0] * 15 + [1] * 5
    kept = cd.fit(ids, mask, 10, cuts, "line 3")
    assert kept == (list(range(10, 20)), [0] * 5 + [1] * 5)  # the start has no answer: keep the end
    kept = cd.fit(list(range(20)), [0, 1] + [0] * 18, 10, cuts, "line 4")
    assert kept[0] == list(range(10))  # the start keeps an answer
    assert cd.fit([1, 2], [0, 0], 10, cuts, "line 5") is None
    assert (cuts.rows, cuts.tokens, cuts.dropped) == (2, 20, 1)
    with caplog.at_level("WARNING"):
        cuts.report("data.jsonl")
    assert "truncated 2" in caplog.text and "dropped 1" in caplog.text and "line 3" in caplog.text


def test_bad_rows_name_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(SFT_ROWS[0]) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:2"):
        cd.read_jsonl(bad)
    bad.write_text(json.dumps(SFT_ROWS[0]) + "\n" + json.dumps({"text": "x"}) + "\n")
    tok = llmarch.tokenizer.load_tokenizer_for(tiny_model_dir(tmp_path)).with_chat_roles()
    from llmarch.train.sft import encode_rows

    with pytest.raises(ValueError, match=r"bad\.jsonl:2: expected 'messages'"):
        encode_rows(cd.read_jsonl(bad), SFT(tok, tok.vocab_size).encode, 100, str(bad))


def test_sft_run_from_pretrained_dir(tmp_path):
    base = tiny_model_dir(tmp_path)
    data = write_jsonl(tmp_path / "sft.jsonl", SFT_ROWS)
    result = train(llmarch.ModelConfig.from_file(base / "config.json"),
                   ft_settings(tmp_path / "run", base, data, objective="sft", steps=6))
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["loss"] < records[0]["loss"] and "val_loss" in records[-1]
    assert result.config.vocab_size == 300 + 4  # the chat role tokens were added
    ckpt = result.checkpoint
    tok = llmarch.tokenizer.load_tokenizer_for(ckpt)
    assert tok.chat_template is not None and (ckpt / "tokenizer_config.json").is_file()
    # the starting weights were used: the base embedding rows are unchanged at step 0 -> near after 6 steps
    from safetensors.torch import load_file

    start = load_file(str(base / "model.safetensors"))["embed.tokens.weight"]
    end = load_file(str(ckpt / "model.safetensors"))["embed.tokens.weight"]
    assert (end[:300] - start).abs().max() < 0.1


def test_seq2seq_sft_is_text_to_text(tmp_path):
    base = tiny_model_dir(tmp_path, "t5-tiny")
    rows = [{"prefix": "translate: ", "prompt": f"two plus {i}", "response": f"{i + 2}"} for i in range(12)]
    data = write_jsonl(tmp_path / "s2s.jsonl", rows)
    cfg = llmarch.ModelConfig.from_file(base / "config.json")
    tok = llmarch.tokenizer.load_tokenizer_for(base)
    sft = SFT.from_config(tok, cfg)
    ids, mask = sft.encode(rows[3])
    batch = sft.make_batch(cd.pack([(ids, mask)], 100, packing=False), torch.Generator())
    assert tok.decode(batch.inputs["input_ids"][0].tolist()) == "translate: two plus 3<eos>"
    labels = batch.labels["lm"][0]
    assert tok.decode(labels.tolist()) == "5<eos>" and batch.counts["lm"] == len(labels)
    assert batch.inputs["decoder_input_ids"][0, 0] == cfg.decoder_start_token_id
    result = train(cfg, ft_settings(tmp_path / "run", base, data, objective="sft", steps=3))
    assert result.config.vocab_size == cfg.vocab_size  # no chat tokens for text-to-text
