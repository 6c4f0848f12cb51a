"""A tiny MoE trains: the LM loss falls, and the load-balancing loss pulls a router that starts collapsed onto two
experts back to within 2x of uniform load (without it, the load stays lopsided)."""
from __future__ import annotations

import pytest
import torch

import llmarch
from llmarch.nn.moe import router_stats

E, K, STEPS = 8, 2, 50




def train(balance_coef: float) -> tuple[list[float], list[dict]]:
    cfg = llmarch.preset("mixtral-tiny").replace(
        vocab_size=48, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=32, max_seq_len=64,
        moe=dict(n_experts=E, top_k=K, router_bias=True, balance_coef=balance_coef))
    torch.manual_seed(0)
    model = llmarch.build(cfg)
    with torch.no_grad():  # a collapsed start: experts 0 and 1 take every token
        for layer in model.decoder.layers:
            layer.ffn.router.proj.bias.copy_(torch.tensor([4.0, 4.0] + [0.0] * (E - 2)))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(STEPS):
        start = torch.randint(0, 48, (16, 1), generator=g)
        ids = (start + 5 * torch.arange(33)) % 48  # an arithmetic progression mod V: learnable from one token
        out = model(ids[:, :-1])
        lm = torch.nn.functional.cross_entropy(out.logits.reshape(-1, 48), ids[:, 1:].reshape(-1))
        (lm + out.aux_loss).backward()
        opt.step()
        opt.zero_grad()
        losses.append(lm.item())
    return losses, router_stats(model)


@pytest.fixture(scope="module")
def balanced():
    return train(balance_coef=0.1)


def test_tiny_moe_learns(balanced):
    losses, _ = balanced
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5, losses


def test_balance_loss_keeps_load_within_2x_of_uniform(balanced):
    _, stats = balanced
    for s in stats:
        assert s["max_load_ratio"] <= 2.0, s
        assert min(s["tokens_per_expert"]) > 0, s


def test_without_balance_loss_the_load_stays_lopsided():
    _, stats = train(balance_coef=0.0)
    assert max(s["max_load_ratio"] for s in stats) > 2.0, stats
