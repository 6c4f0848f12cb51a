"""T5's fp16 overflow clamp: a T5 whose FFN overflows fp16 gives transformers' outputs (finite) in fp16, and the
same model without the clamp turns inf; the guard itself against the written-out rule."""
from __future__ import annotations

import torch
import transformers

import llmarch
from llmarch.nn.block import Fp16Clamp
from tests.hf_util import make_hf_model

CFG = llmarch.preset("t5-tiny").replace(vocab_size=97, d_model=32, n_heads=4, head_dim=8, d_ff=64, n_layers=2,
                                         dropout=0.0)


def test_guard_follows_the_rule():
    big = torch.finfo(torch.float16).max
    finite = torch.tensor([1.0, -3e4, 6e4], dtype=torch.float16)
    assert torch.equal(Fp16Clamp()(finite), finite)  # nothing infinite: nothing changes
    with_inf = torch.tensor([float("inf"), -float("inf"), 6.5e4, 2.0], dtype=torch.float16)
    bound = torch.tensor(big - 1000).to(torch.float16)
    expected = torch.stack([bound, -bound, bound, torch.tensor(2.0, dtype=torch.float16)])
    assert torch.equal(Fp16Clamp()(with_inf), expected)
    x32 = torch.tensor([float("inf")])
    assert torch.equal(Fp16Clamp()(x32), x32)  # fp32 passes through


def _overflowing_pair(tmp_path):
    hf, path = make_hf_model(CFG, "t5", tmp_path, model_class="T5ForConditionalGeneration")
    with torch.no_grad():  # the first encoder FFN writes ~1e5 into the residual stream: over fp16's 65504
        hf.encoder.block[0].layer[-1].DenseReluDense.wo.weight.mul_(3e4)
    hf.save_pretrained(path)
    ours = llmarch.hf.load(path)
    assert ours.config.fp16_clamp
    return hf.half().eval(), ours.half().eval()


def test_t5_fp16_matches_transformers_through_an_overflow(tmp_path):
    hf, ours = _overflowing_pair(tmp_path)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, CFG.vocab_size, (2, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    dec = torch.randint(2, CFG.vocab_size, (2, 5), generator=g)
    with torch.no_grad():
        theirs = hf(input_ids=ids, attention_mask=mask, decoder_input_ids=dec)
        mine = ours(ids, attention_mask=mask, decoder_input_ids=dec)
    assert torch.isfinite(theirs.logits).all()
    assert torch.isfinite(mine.logits).all()
    enc = mine.encoder_hidden_states.float() - theirs.encoder_last_hidden_state.float()
    assert enc[mask.bool()].abs().max().item() <= 2e-2
    scale = theirs.logits.float().abs().max().item()
    assert (mine.logits.float() - theirs.logits.float()).abs().max().item() <= 1e-2 * max(scale, 1.0)

    unclamped = llmarch.build(ours.config.replace(fp16_clamp=False)).half().eval()
    unclamped.load_state_dict(ours.state_dict())
    with torch.no_grad():
        raw = unclamped(ids, attention_mask=mask, decoder_input_ids=dec)
    assert not torch.isfinite(raw.encoder_hidden_states).all()  # the guard is what keeps it finite
