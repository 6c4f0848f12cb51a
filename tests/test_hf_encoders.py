"""Parity with transformers for the encoder families (BERT, RoBERTa): MLM / NSP / classification logits on padded
batches with token types, position ids by HF's rules, save round trips. The HF reference is built from our config
by the production translator and loaded with llmarch.hf.load."""
from __future__ import annotations

import pytest
import torch
import transformers

import llmarch
from tests.hf_util import TOL, assert_same_weights, make_hf_model



SMALL = dict(vocab_size=211, d_model=48, n_layers=2, n_heads=4, d_ff=96, dropout=0.0, attn_dropout=0.0)
CASES = {  # name: (model_type, transformers class, config)
    "bert-pretraining": ("bert", "BertForPreTraining", llmarch.preset("bert-tiny").replace(**SMALL, max_seq_len=40)),
    "bert-mlm-untied": ("bert", "BertForMaskedLM", llmarch.preset("bert-tiny").replace(
        **SMALL, max_seq_len=40, head="mlm", tie_embeddings=False, type_vocab_size=3)),
    "bert-classification": ("bert", "BertForSequenceClassification", llmarch.preset("bert-tiny").replace(
        **SMALL, max_seq_len=40, head="classification", n_labels=3)),
    "roberta-mlm": ("roberta", "RobertaForMaskedLM", llmarch.preset("roberta-tiny").replace(**SMALL, max_seq_len=42)),
    "roberta-classification": ("roberta", "RobertaForSequenceClassification", llmarch.preset("roberta-tiny").replace(
        **SMALL, max_seq_len=42, head="classification", n_labels=4)),
}


def padded(cfg, lengths=(14, 9, 3), left: bool = False, seed: int = 1):
    """ids [B, T] padded with pad_token_id, the mask, and token types (0 for the first half of each row, 1 after)."""
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.randint(3, cfg.vocab_size, (len(lengths), T), generator=g)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    types = torch.zeros(len(lengths), T, dtype=torch.long)
    for i, n in enumerate(lengths):
        real = slice(T - n, T) if left else slice(0, n)
        mask[i, real] = 1
        types[i, real.start + n // 2: real.stop] = min(1, cfg.type_vocab_size - 1)
    return ids.masked_fill(mask == 0, cfg.pad_token_id), mask, types


def max_diff_at(a, b, mask):
    real = mask.bool()
    return (a[real] - b[real]).abs().max().item()


@pytest.fixture(params=sorted(CASES), scope="module")
def pair(request, tmp_path_factory):
    model_type, cls, cfg = CASES[request.param]
    tmp = tmp_path_factory.mktemp(request.param)
    hf_model, path = make_hf_model(cfg, model_type, tmp, model_class=cls)
    ours = llmarch.hf.load(path).eval()
    return request.param, model_type, cls, cfg, hf_model, ours, tmp


def compare(name, cfg, hf_model, ours, left=False):
    ids, mask, types = padded(cfg, left=left)
    kw = dict(token_type_ids=types) if cfg.type_vocab_size > 1 else {}
    with torch.no_grad():
        mine = ours(ids, attention_mask=mask, **kw)
        theirs = hf_model(input_ids=ids, attention_mask=mask, **kw)
    if cfg.head == "classification":
        diff = (mine.logits - theirs.logits).abs().max().item()
    else:
        ref = theirs.prediction_logits if cfg.head == "pretraining" else theirs.logits
        diff = max_diff_at(mine.logits, ref, mask)
    assert diff <= TOL[torch.float32], f"{name}: logits differ by {diff:.3g}"
    if cfg.head == "pretraining":
        nsp = (mine.nsp_logits - theirs.seq_relationship_logits).abs().max().item()
        assert nsp <= TOL[torch.float32], f"{name}: NSP logits differ by {nsp:.3g}"
    return mine


def test_config_round_trips(pair):
    _, _, _, cfg, _, ours, _ = pair
    assert ours.config == cfg


def test_logits_match_on_padded_batch_with_token_types(pair):
    name, _, _, cfg, hf_model, ours, _ = pair
    out = compare(name, cfg, hf_model, ours)
    if cfg.head == "pretraining":
        assert out.nsp_logits.shape == (3, 2) and out.pooled.shape == (3, cfg.d_model)


def test_roberta_positions_follow_hf_rule_with_left_padding(tmp_path):
    """RoBERTa counts positions over non-pad tokens from pad_token_id + 1, so left padding matches HF too."""
    model_type, cls, cfg = CASES["roberta-mlm"]
    hf_model, path = make_hf_model(cfg, model_type, tmp_path, model_class=cls)
    ours = llmarch.hf.load(path).eval()
    ids, mask, _ = padded(cfg, left=True)
    expected = hf_model.roberta.embeddings.create_position_ids_from_input_ids(ids, cfg.pad_token_id)
    assert torch.equal((mask.cumsum(-1) - 1 + cfg.position_offset)[mask.bool()], expected[mask.bool()])
    compare("roberta-left", cfg, hf_model, ours, left=True)


def test_save_reloads_in_transformers(pair):
    name, model_type, cls, cfg, _, ours, tmp = pair
    out = llmarch.hf.save(ours, tmp / "saved")
    reloaded = getattr(transformers, cls).from_pretrained(out, dtype=torch.float32).eval()
    assert reloaded.config.model_type == model_type
    compare(name + "-saved", cfg, reloaded, ours)
    again = llmarch.hf.load(out)
    assert again.config == cfg
    assert_same_weights(ours, again)


def test_mlm_checkpoint_with_nsp_weights_loads(tmp_path):
    """Released BERT checkpoints labelled BertForMaskedLM still hold the pooler and NSP head: they load as MLM."""
    cfg = CASES["bert-pretraining"][2]
    hf_model, path = make_hf_model(cfg, "bert", tmp_path, model_class="BertForPreTraining")
    import json

    hf = json.loads((path / "config.json").read_text())
    hf["architectures"] = ["BertForMaskedLM"]
    (path / "config.json").write_text(json.dumps(hf))
    ours = llmarch.hf.load(path).eval()
    assert ours.config.head == "mlm"
    ids, mask, types = padded(cfg)
    with torch.no_grad():
        diff = max_diff_at(ours(ids, attention_mask=mask, token_type_ids=types).logits,
                           hf_model(input_ids=ids, attention_mask=mask, token_type_ids=types).prediction_logits, mask)
    assert diff <= TOL[torch.float32]
