"""DPR: parity with transformers' DPRQuestionEncoder / DPRContextEncoder (pooled [CLS] output on a padded batch with
token types, fp32 <= 1e-4), save round trips that reload in transformers, dot-product scores and the in-batch
negatives loss against a naive computation."""
from __future__ import annotations

import json

import pytest
import torch
import transformers

import llmarch
from llmarch.retrieval.dpr import DPR, in_batch_negatives_loss
from tests.hf_util import TOL, make_hf_model

CFG = llmarch.preset("dpr-tiny").replace(vocab_size=211, d_model=48, n_layers=2, n_heads=4, d_ff=96, max_seq_len=40,
                                         dropout=0.0, attn_dropout=0.0)
ROLES = {"question": ("dpr", "DPRQuestionEncoder"), "context": ("dpr-context", "DPRContextEncoder")}


def padded(lengths=(14, 9, 3), seed: int = 1):
    """Right-padded ids [B, T], the mask, and token types (1 on the second half of each row)."""
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.randint(3, CFG.vocab_size, (len(lengths), T), generator=g)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    types = torch.zeros(len(lengths), T, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
        types[i, n // 2:n] = 1
    return ids.masked_fill(mask == 0, CFG.pad_token_id), mask, types


@pytest.fixture(params=sorted(ROLES), scope="module")
def pair(request, tmp_path_factory):
    model_type, cls = ROLES[request.param]
    tmp = tmp_path_factory.mktemp(request.param)
    hf_model, path = make_hf_model(CFG, model_type, tmp, model_class=cls)
    return request.param, hf_model, llmarch.hf.load(path).eval(), path, tmp


def pooled_diff(hf_model, ours) -> float:
    ids, mask, types = padded()
    with torch.no_grad():
        theirs = hf_model(input_ids=ids, attention_mask=mask, token_type_ids=types).pooler_output
        mine = ours(ids, attention_mask=mask, token_type_ids=types)
    assert mine.pooled.shape == theirs.shape == (3, CFG.d_model)
    assert torch.equal(mine.pooled, mine.logits)
    return (mine.pooled - theirs).abs().max().item()


def test_pooled_output_matches_transformers(pair):
    role, hf_model, ours, path, _ = pair
    prefix = {"question": "question_encoder.bert_model.", "context": "ctx_encoder.bert_model."}[role]
    assert all(k.startswith(prefix) for k in hf_model.state_dict())  # the checkpoint really has this role's names
    assert ours.config.head == "first_token" and ours.config == CFG
    assert pooled_diff(hf_model, ours) <= TOL[torch.float32]


def test_save_reloads_in_transformers(pair):
    role, hf_model, ours, _, tmp = pair
    model_type, cls = ROLES[role]
    out = llmarch.hf.save(ours, tmp / "saved", model_type=model_type)
    assert json.loads((out / "config.json").read_text())["architectures"] == [cls]
    reloaded = getattr(transformers, cls).from_pretrained(out, dtype=torch.float32).eval()
    assert reloaded.config.model_type == "dpr"
    assert pooled_diff(reloaded, ours) <= TOL[torch.float32]
    again = llmarch.hf.load(out)
    assert again.config == CFG
    for (k, a), b in zip(ours.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), k


def test_dpr_scores_and_in_batch_negatives_loss(tmp_path):
    q_hf, q_dir = make_hf_model(CFG, "dpr", tmp_path / "q", model_class="DPRQuestionEncoder")
    c_hf, c_dir = make_hf_model(CFG, "dpr-context", tmp_path / "c", seed=5, model_class="DPRContextEncoder")
    dpr = DPR.from_hf(q_dir, c_dir).eval()
    ids, mask, types = padded()
    c_ids, c_mask, c_types = padded((11, 13, 6, 9), seed=2)  # 3 positives + 1 hard negative
    with torch.no_grad():
        q = dpr.encode_questions(ids, mask, types)
        c = dpr.encode_contexts(c_ids, c_mask, c_types)
        want = (q_hf(input_ids=ids, attention_mask=mask, token_type_ids=types).pooler_output
                @ c_hf(input_ids=c_ids, attention_mask=c_mask, token_type_ids=c_types).pooler_output.T)
    scores = DPR.scores(q, c)
    assert scores.shape == (3, 4)
    assert (scores - want).abs().max() <= 1e-3 * want.abs().max()
    naive = sum(-torch.log(torch.exp(scores[i]) / torch.exp(scores[i]).sum())[i] for i in range(3)) / 3
    torch.testing.assert_close(in_batch_negatives_loss(q, c), naive, rtol=1e-5, atol=1e-5)
    pos = torch.tensor([2, 0, 1])
    naive_pos = sum(-torch.log_softmax(scores[i], 0)[pos[i]] for i in range(3)) / 3
    torch.testing.assert_close(in_batch_negatives_loss(q, c, pos), naive_pos, rtol=1e-5, atol=1e-5)


def test_dpr_errors():
    with pytest.raises(ValueError, match="first_token"):
        DPR(llmarch.build(llmarch.preset("bert-tiny")), llmarch.build(llmarch.preset("dpr-tiny")))
    with pytest.raises(ValueError, match="contexts"):
        in_batch_negatives_loss(torch.zeros(3, 4), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="projection_dim"):
        llmarch.hf.FAMILIES["dpr"]().to_config(dict(json.loads(json.dumps(
            llmarch.hf.FAMILIES["dpr"]().from_config(CFG))), projection_dim=16))
