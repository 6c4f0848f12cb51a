"""Early exit: threshold 1.0 is the full model; threshold 0 exits at min_layers yet keeps every layer's cache
complete (state propagation), so decoding continues."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import llmarch
from llmarch.infer.early_exit import EarlyExitDecoder, early_exit_generate, early_exit_nll

CFG = llmarch.preset("llama-tiny").replace(vocab_size=97, d_model=32, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=64,
                                           max_seq_len=128)


def model_for(cfg=CFG):
    torch.manual_seed(0)
    return llmarch.build(cfg).eval()


@pytest.mark.parametrize("criterion", ["softmax", "state"])
@pytest.mark.parametrize("preset", ["llama-tiny", "gpt2-tiny"])
def test_threshold_one_is_the_full_model(criterion, preset):
    model = model_for(llmarch.preset(preset).replace(**{k: getattr(CFG, k) for k in
                                                        ("vocab_size", "d_model", "n_layers", "d_ff", "max_seq_len")}))
    ids = torch.randint(0, 97, (1, 5), generator=torch.Generator().manual_seed(0))
    got, stats = early_exit_generate(model, ids, 20, threshold=1.0, criterion=criterion)
    assert torch.equal(got, llmarch.generate(model, ids, 20))
    assert stats.layers == [4] * 19
    text = torch.randint(0, 97, (1, 16), generator=torch.Generator().manual_seed(1))
    nll, _ = early_exit_nll(model, text, 1.0, criterion)
    with torch.no_grad():
        full = F.cross_entropy(model(text).logits[0, :-1], text[0, 1:])
    assert abs(nll - float(full)) < 1e-5


def test_threshold_zero_exits_early_and_keeps_caches_whole():
    model = model_for()
    ids = torch.randint(0, 97, (1, 5), generator=torch.Generator().manual_seed(0))
    got, stats = early_exit_generate(model, ids, 12, threshold=0.0, min_layers=2)
    assert got.shape == (1, 17) and stats.layers == [2] * 11
    dec = EarlyExitDecoder(model, 0.0, "state")
    dec.prefill(ids)
    for t in range(3):
        dec.step(ids[:, t])
    assert {v.shape[2] for v in dec.cache.k.values()} == {8} and len(dec.cache.k) == 4
    with pytest.raises(ValueError, match="threshold"):
        EarlyExitDecoder(model, 1.5)
    with pytest.raises(ValueError, match="exit criterion"):
        EarlyExitDecoder(model, 0.5, "entropy")
