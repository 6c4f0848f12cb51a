"""Structured pruning (a smaller valid model that runs and reloads; heads and channels that write nothing are
the ones dropped, leaving the output unchanged) and the distillation loss against a naive computation."""
from __future__ import annotations

import math

import pytest
import torch

import llmarch
from llmarch.checkpoint import load_model, save_model
from llmarch.infer.distill import distillation_loss
from llmarch.infer.prune import prune

BASE = dict(vocab_size=97, d_model=32, n_layers=2, d_ff=64, max_seq_len=64)
CASES = {
    "llama-gqa": llmarch.preset("llama-tiny").replace(**BASE, n_heads=4, n_kv_heads=2),
    "gpt2-mha": llmarch.preset("gpt2-tiny").replace(**BASE, n_heads=4),
}


def silence(model, heads: list[int], channels: list[int]) -> None:
    """Zero the output projections of some heads and FFN channels: they then contribute nothing."""
    Dh = model.config.dh
    with torch.no_grad():
        for layer in model.decoder.layers:
            for h in heads:
                layer.attn.out.weight[:, h * Dh:(h + 1) * Dh] = 0
            layer.ffn.down.weight[:, channels] = 0


@pytest.mark.parametrize("calibrate", [False, True])
@pytest.mark.parametrize("name", sorted(CASES))
def test_pruning_drops_silent_units_and_reloads(name, calibrate, tmp_path):
    torch.manual_seed(0)
    model = llmarch.build(CASES[name]).eval()
    silence(model, heads=[1, 2], channels=list(range(0, 64, 2)))  # one query head per kv group for GQA
    ids = torch.randint(0, 97, (2, 10), generator=torch.Generator().manual_seed(1))
    small = prune(model, n_heads=2, d_ff=32, calib_ids=ids if calibrate else None)
    cfg = small.config
    assert (cfg.n_heads, cfg.dh, cfg.d_ff, cfg.d_model) == (2, 8, 32, 32)
    n_small = sum(p.numel() for p in small.parameters())
    assert n_small < sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        want, got = model(ids).logits, small(ids).logits
    assert (got - want).abs().max() < 1e-5
    save_model(small, tmp_path / "small")
    again = load_model(tmp_path / "small")
    with torch.no_grad():
        assert torch.equal(again(ids).logits, got)
    assert llmarch.generate(again, ids, 4, cache="static").shape == (2, 14)


def test_pruning_errors():
    model = llmarch.build(CASES["llama-gqa"])
    with pytest.raises(ValueError, match="multiple of n_kv_heads"):
        prune(model, n_heads=3)
    with pytest.raises(ValueError, match="d_ff"):
        prune(model, d_ff=0)
    alibi = llmarch.build(llmarch.preset("bloom-tiny").replace(**BASE, n_heads=4))
    with pytest.raises(ValueError, match="prune only d_ff"):
        prune(alibi, n_heads=2)
    assert prune(alibi, d_ff=16).config.d_ff == 16


def naive_distillation(s, t, y, T, alpha):
    total_kl, total_ce, n = 0.0, 0.0, 0
    for i in range(s.shape[0]):
        if y[i] == -100:
            continue
        ps, pt = (s[i] / T).softmax(-1), (t[i] / T).softmax(-1)
        total_kl += sum(float(pt[v]) * math.log(float(pt[v]) / float(ps[v])) for v in range(s.shape[1]))
        total_ce += -math.log(float(s[i].softmax(-1)[y[i]]))
        n += 1
    return alpha * T * T * total_kl / n + (1 - alpha) * total_ce / n


def test_distillation_loss_against_naive():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 5, 7, generator=g), torch.randn(2, 5, 7, generator=g)
    y = torch.randint(0, 7, (2, 5), generator=g)
    y[0, 1] = y[1, 4] = -100
    for T, alpha in [(1.0, 0.5), (2.0, 0.9), (4.0, 0.0)]:
        got = distillation_loss(s, t, y, T, alpha)
        assert abs(float(got) - naive_distillation(s.view(-1, 7), t.view(-1, 7), y.view(-1), T, alpha)) < 1e-5
    s.requires_grad_(True)
    distillation_loss(s, s.detach(), y, 2.0, 1.0).backward()  # student == teacher: KL minimum, zero gradient
    assert s.grad.abs().max() < 1e-6
    with pytest.raises(ValueError, match="vocabulary"):
        distillation_loss(s, torch.randn(2, 5, 8), y)
