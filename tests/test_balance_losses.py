"""MoE load-balancing losses (``moe.balance``): the seed's squared-deviation + importance variant against the
formula written out with loops, its zero at uniform routing, its gradient, and that training a router on it
evens out a skewed load; the layer's aux_loss uses the chosen loss with its coefficients."""
from __future__ import annotations

import pytest
import torch

import llmarch
from llmarch.moe_config import MoEConfig
from llmarch.nn.balance import BALANCE_LOSSES
from llmarch.nn.router import Routing, balance_loss


def routing(N=12, E=4, K=2, seed=0, logits=None):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(N, E, generator=g) if logits is None else logits
    probs = logits.softmax(-1)
    top, experts = probs.topk(K, dim=-1)
    return Routing(logits, probs, top / top.sum(-1, keepdim=True), experts)


def naive_squared(route: Routing) -> tuple[float, float]:
    N, E = route.probs.shape
    K = route.experts.shape[1]
    load = [0.0] * E
    imp = [0.0] * E
    for n in range(N):
        for k in range(K):
            e = int(route.experts[n, k])
            load[e] += 1.0 / (N * K)
            imp[e] += float(route.weights[n, k])
    balance = E * sum((x - 1.0 / E) ** 2 for x in load)
    mean = sum(imp) / E
    var = sum((x - mean) ** 2 for x in imp) / E
    return balance, var / mean ** 2


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_squared_variant_matches_the_written_out_formula(seed):
    route = routing(seed=seed)
    terms = BALANCE_LOSSES["squared"](route)
    balance, cv2 = naive_squared(route)
    assert terms["balance"].item() == pytest.approx(balance, rel=1e-5, abs=1e-7)
    assert terms["importance"].item() == pytest.approx(cv2, rel=1e-5, abs=1e-7)
    assert BALANCE_LOSSES["switch"](route)["balance"].item() == pytest.approx(
        balance_loss(route.probs, route.experts).item())


def test_uniform_routing_costs_nothing():
    E = 4
    experts = torch.arange(8).remainder(E).view(8, 1)  # every expert chosen twice, equal weights
    logits = torch.zeros(8, E)
    route = Routing(logits, logits.softmax(-1), torch.ones(8, 1), experts)
    terms = BALANCE_LOSSES["squared"](route)
    assert terms["balance"].item() == pytest.approx(0.0, abs=1e-12)
    assert terms["importance"].item() == pytest.approx(0.0, abs=1e-12)


def test_training_on_the_loss_evens_out_a_skewed_router():
    torch.manual_seed(0)
    x = torch.randn(256, 8)
    router = torch.nn.Linear(8, 4)
    with torch.no_grad():
        router.bias.copy_(torch.tensor([3.0, 0.0, 0.0, 0.0]))  # most tokens go to expert 0
    opt = torch.optim.SGD(router.parameters(), lr=0.5)

    def step():
        route = routing(logits=router(x), K=1)
        terms = BALANCE_LOSSES["squared"](route)
        return terms["balance"] + terms["importance"], route

    before = step()[0].item()
    for _ in range(60):
        loss, _ = step()
        opt.zero_grad()
        loss.backward()
        assert router.bias.grad.abs().sum() > 0
        opt.step()
    loss, route = step()
    counts = torch.bincount(route.experts.view(-1), minlength=4)
    assert loss.item() < 0.2 * before
    assert counts.max().item() < 0.5 * 256  # no expert holds half the tokens any more


def test_moe_layer_adds_the_chosen_terms_with_their_coefficients():
    cfg = llmarch.preset("mixtral-tiny").replace(n_layers=1)
    moe = dict(n_experts=4, top_k=2, balance="squared", balance_coef=0.3, importance_coef=0.7, z_coef=0.0)
    model = llmarch.build(cfg.replace(moe=MoEConfig(**moe))).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 6))
    out = model(ids)
    layer = next(m for m in model.modules() if hasattr(m, "last_routing") and m.last_routing is not None)
    route = Routing(*layer.last_routing[0].__dict__.values())
    terms = BALANCE_LOSSES["squared"](route)
    expected = 0.3 * terms["balance"] + 0.7 * terms["importance"]
    assert out.aux_loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_bad_settings_name_the_field():
    with pytest.raises(ValueError, match="moe.balance"):
        MoEConfig(balance="cubic").validate(2)
    with pytest.raises(ValueError, match="moe.importance_coef"):
        MoEConfig(importance_coef=0.1).validate(2)
    with pytest.raises(ValueError, match="moe.importance_coef"):
        MoEConfig(balance="squared", importance_coef=-1.0).validate(2)
