"""Fusion-in-Decoder: the fused forward equals running the decoder by hand over the concatenation of each passage's
separately encoded (unpadded) states; one passage reduces to the plain encoder-decoder; passage order does not
matter (cross-attention has no positions); cached generation equals greedy decoding by recomputation."""
from __future__ import annotations

import pytest
import torch

import llmarch
from llmarch.nn.cache import CrossMemory
from llmarch.retrieval.fid import fid_encode, fid_forward, fid_generate, fid_inputs

CFG = llmarch.preset("fid-tiny").replace(vocab_size=97, dropout=0.0)
QUESTIONS = [[5, 6, 7], [8, 9]]
PASSAGES = [[[11, 12, 13, 14, 15], [16, 17], [18, 19, 20, 21]], [[22, 23, 24], [25, 26, 27, 28, 29, 30], [31]]]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return llmarch.build(CFG).eval()


def batch():
    rows = [fid_inputs(q, ps, max_len=10, pad_id=CFG.pad_token_id, sep=[1]) for q, ps in zip(QUESTIONS, PASSAGES)]
    T = max(r[0].shape[1] for r in rows)
    ids = torch.stack([torch.nn.functional.pad(r[0], (0, T - r[0].shape[1]), value=CFG.pad_token_id) for r in rows])
    mask = torch.stack([torch.nn.functional.pad(r[1], (0, T - r[1].shape[1])) for r in rows])
    return ids, mask  # [B, N, T]


def test_fid_equals_decoder_over_concatenated_states_by_hand(model):
    ids, mask = batch()
    dec = torch.tensor([[0, 40, 41, 42], [0, 43, 44, 45]])
    with torch.no_grad():
        fused = fid_forward(model, ids, mask, dec).logits
        for b in range(2):
            states = []
            for n in range(ids.shape[1]):
                real = ids[b, n][mask[b, n].bool()][None]  # this passage alone, no padding
                states.append(model.encode(real).states)
            by_hand = model.decode(dec[b:b + 1], CrossMemory(torch.cat(states, dim=1))).logits
            torch.testing.assert_close(fused[b:b + 1], by_hand, rtol=1e-5, atol=1e-5)


def test_one_passage_is_the_plain_encoder_decoder(model):
    ids, mask = batch()
    dec = torch.tensor([[0, 40, 41], [0, 43, 44]])
    with torch.no_grad():
        fused = fid_forward(model, ids[:, :1], mask[:, :1], dec).logits
        plain = model(ids[:, 0], attention_mask=mask[:, 0], decoder_input_ids=dec).logits
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)


def test_passage_order_does_not_matter_but_content_does(model):
    ids, mask = batch()
    dec = torch.tensor([[0, 40, 41], [0, 43, 44]])
    perm = torch.tensor([2, 0, 1])
    with torch.no_grad():
        a = fid_forward(model, ids, mask, dec).logits
        b = fid_forward(model, ids[:, perm], mask[:, perm], dec).logits
        c = fid_forward(model, ids[:, :2], mask[:, :2], dec).logits  # one passage fewer
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert (a - c).abs().max() > 1e-3


def test_generate_matches_recomputation(model):
    ids, mask = batch()
    out = fid_generate(model, ids, mask, max_new_tokens=6)
    memory = fid_encode(model, ids, mask)
    seq = torch.zeros(2, 1, dtype=torch.long)
    with torch.no_grad():
        for _ in range(6):
            nxt = model.decode(seq, memory).logits[:, -1].argmax(-1)
            seq = torch.cat([seq, nxt[:, None]], dim=1)
    assert torch.equal(out, seq)


def test_errors(model):
    with pytest.raises(ValueError, match="passages"):
        fid_encode(model, torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="encoder-decoder"):
        fid_encode(llmarch.build(llmarch.preset("gpt2-tiny")), torch.zeros(1, 2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="at least one passage"):
        fid_inputs([1], [], max_len=4, pad_id=0)
