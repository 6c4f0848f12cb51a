"""Mixture of experts: fast dispatch == the loop reference (outputs and gradients), the aux losses against hand
computation, capacity dropping in routing order, routers, the layer schedule, config errors and upcycling."""
from __future__ import annotations

import math

import pytest
import torch

import llmarch
from llmarch import MoEConfig
from llmarch.nn.dispatch import DISPATCHERS, keep_within_capacity
from llmarch.nn.moe import MoE, router_stats
from llmarch.nn.router import ROUTERS, balance_loss, z_loss

D, F = 16, 24




def make_moe(seed=0, **fields) -> MoE:
    torch.manual_seed(seed)
    moe = MoEConfig(**{"n_experts": 4, "top_k": 2, **fields})
    return MoE(D, F, "silu", moe=moe)


MOE_CASES = {
    "glu-dropless": {},
    "mlp-relu-top1-switch": dict(expert_ffn="mlp", router="switch", top_k=1),
    "capacity-shared-gated": dict(capacity_factor=0.75, n_shared=2, shared_d_ff=8, shared_gate=True,
                                  router="softmax_topk"),
    "fixed-capacity-norm": dict(expert_capacity=2, router="softmax_topk_norm", top_k=3),
}


@pytest.mark.parametrize("dispatch", [d for d in DISPATCHERS.names() if d != "loop"])
@pytest.mark.parametrize("case", sorted(MOE_CASES))
@pytest.mark.parametrize("shape", [(1, 1), (2, 13), (2, 600)])  # (2, 600): auto takes its large-group path
def test_dispatch_equals_loop_outputs_and_grads(dispatch, case, shape):
    m = make_moe(**MOE_CASES[case])
    x = torch.randn(*shape, D)
    results = {}
    for name in ("loop", dispatch):
        m.dispatch = DISPATCHERS[name]
        m.zero_grad()
        xi = x.clone().requires_grad_()
        y = m(xi)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        results[name] = (y.detach(), xi.grad, {k: p.grad.clone() for k, p in m.named_parameters() if p.grad is not None})
    (y0, gx0, gp0), (y1, gx1, gp1) = results["loop"], results[dispatch]
    torch.testing.assert_close(y1, y0, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(gx1, gx0, atol=1e-6, rtol=1e-5)
    assert gp0.keys() == gp1.keys() and any(k.startswith("experts.") for k in gp0)
    for k in gp0:  # weight grads sum over up to ~600 tokens per expert in another order: fp32 rounding ~1e-6
        torch.testing.assert_close(gp1[k], gp0[k], atol=1e-5, rtol=1e-4, msg=lambda m, k=k: f"{k}: {m}")


def test_dispatch_in_bf16_matches_loop():
    m = make_moe().to(torch.bfloat16)
    x = torch.randn(2, 9, D, dtype=torch.bfloat16)
    m.dispatch = DISPATCHERS["loop"]
    ref = m(x)
    m.dispatch = DISPATCHERS["padded"]
    assert m(x).dtype == torch.bfloat16
    torch.testing.assert_close(m(x), ref, atol=2e-2, rtol=2e-2)  # bf16: matmul order differs


def test_balance_loss_hand_computed():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.5, 0.25, 0.25], [0.2, 0.2, 0.6]])
    experts = torch.tensor([[0], [1], [0], [2]])
    # f = (2/4, 1/4, 1/4); P = (0.375, 0.3125, 0.3125); 3 * (0.1875 + 0.078125 + 0.078125) = 1.03125
    assert balance_loss(probs, experts).item() == pytest.approx(1.03125, abs=1e-7)
    # top-2: f counts every choice, so f = (3/4, 3/4, 2/4) and uniform routing would give K = 2
    experts2 = torch.tensor([[0, 1], [1, 2], [0, 1], [2, 0]])
    assert balance_loss(probs, experts2).item() == pytest.approx(3 * (0.75 * 0.375 + 0.75 * 0.3125 + 0.5 * 0.3125))
    assert z_loss(torch.zeros(5, 4)).item() == pytest.approx(math.log(4) ** 2)


def test_balance_loss_equals_hf_mixtral_formula():
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    logits = torch.randn(40, 6)
    probs = logits.softmax(-1)
    experts = probs.topk(2, dim=-1).indices
    theirs = load_balancing_loss_func((logits,), num_experts=6, top_k=2)
    assert balance_loss(probs, experts).item() == pytest.approx(theirs.item(), rel=1e-6)


def test_model_aux_loss_sums_layers_with_coefficients():
    """Router weights = identity, so the logits are the (normed) inputs; recompute the losses naively."""
    cfg = llmarch.preset("mixtral-tiny").replace(vocab_size=64, d_model=16, n_heads=2, n_kv_heads=1, n_layers=2,
                                                 moe=dict(balance_coef=0.1, z_coef=0.01, n_experts=4))
    model = llmarch.build(cfg).eval()
    captured = []
    for layer in model.decoder.layers:
        layer.ffn.register_forward_hook(lambda mod, inp, out: captured.append(inp[0].reshape(-1, 16)))
    ids = torch.randint(0, 64, (2, 5))
    out = model(ids)
    expected = 0.0
    for layer, h in zip(model.decoder.layers, captured):
        logits = (h @ layer.ffn.router.proj.weight.t()).double()
        N, E = logits.shape
        probs = logits.softmax(-1)
        chosen = logits.topk(2, dim=-1).indices
        f = [sum(int(e in chosen[n].tolist()) for n in range(N)) / N for e in range(E)]
        P = [probs[:, e].mean().item() for e in range(E)]
        z = sum(torch.logsumexp(logits[n], 0).item() ** 2 for n in range(N)) / N
        expected += 0.1 * E * sum(fi * pi for fi, pi in zip(f, P)) + 0.01 * z
    assert out.aux_loss.item() == pytest.approx(expected, rel=1e-5)
    assert out.aux_loss.requires_grad
    dense = llmarch.build(llmarch.preset("llama-tiny"))(ids)
    assert dense.aux_loss.item() == 0.0


def test_capacity_keeps_exactly_the_first_in_routing_order():
    # tokens x ranks; routing order: every token's first choice (in token order), then every second choice
    experts = torch.tensor([[[0, 1], [0, 2], [0, 1], [1, 0], [2, 1]]])
    keep = keep_within_capacity(experts, n_experts=3, capacity=2)
    expected = torch.tensor([[[1, 1], [1, 1], [0, 0], [1, 0], [1, 0]]], dtype=torch.bool)
    assert torch.equal(keep, expected)
    # per sequence: a second row with the same routing keeps the same pattern
    assert torch.equal(keep_within_capacity(experts.repeat(2, 1, 1), 3, 2), expected.repeat(2, 1, 1))


def test_capacity_drops_pass_through_as_zero_and_are_counted():
    m = make_moe(seed=3, expert_capacity=1, top_k=1, router="switch")
    x = torch.randn(2, 7, D)
    y = m(x)
    route = m.router(x.reshape(-1, D))
    first = torch.zeros(2 * 7, dtype=torch.bool)
    for b in range(2):  # naive: walk each sequence in token order, an expert serves its first token only
        seen = set()
        for t in range(7):
            e = int(route.experts[b * 7 + t, 0])
            first[b * 7 + t] = e not in seen
            seen.add(e)
    flat = y.reshape(-1, D)
    assert torch.all(flat[~first] == 0), "dropped tokens must get a zero FFN output"
    for n in first.nonzero().flatten().tolist():
        e = int(route.experts[n, 0])
        ref = m.experts.one(e, x.reshape(-1, D)[n:n + 1]) * route.weights[n, 0]
        torch.testing.assert_close(flat[n:n + 1], ref)
    stats = m.stats()
    assert stats["dropped_fraction"].item() == pytest.approx(1 - first.float().mean().item())


def test_routers_weights():
    x = torch.randn(10, D)
    torch.manual_seed(0)
    routers = {name: ROUTERS[name](D, 5, 1 if name == "switch" else 3) for name in ROUTERS}
    w = routers["topk_softmax"].proj.weight
    for r in routers.values():
        r.proj.weight.data.copy_(w)
    out = {name: r(x) for name, r in routers.items()}
    logits = x @ w.t()
    probs = logits.softmax(-1)
    top_p, top_i = probs.topk(3, dim=-1)
    assert torch.equal(out["softmax_topk"].experts, top_i)
    torch.testing.assert_close(out["softmax_topk"].weights, top_p)
    torch.testing.assert_close(out["softmax_topk_norm"].weights, top_p / top_p.sum(-1, keepdim=True))
    torch.testing.assert_close(out["topk_softmax"].weights, logits.topk(3, dim=-1).values.softmax(-1))
    torch.testing.assert_close(out["switch"].weights[:, 0], probs.max(-1).values)
    assert out["topk_softmax"].logits.dtype == torch.float32


def test_router_runs_in_fp32_for_bf16_models():
    m = make_moe().to(torch.bfloat16)
    route = m.router(torch.randn(4, D, dtype=torch.bfloat16))
    assert route.probs.dtype == torch.float32 and route.weights.dtype == torch.float32


def test_jitter_only_in_training():
    m = make_moe(jitter=0.5)
    x = torch.randn(1, 8, D)
    m.eval()
    torch.testing.assert_close(m(x), m(x))
    m.train()
    assert not torch.equal(m.router(x[0]).logits, m.router(x[0]).logits)


def test_layer_schedule():
    cfg = llmarch.preset("mixtral-tiny").replace(n_layers=6, moe=dict(every=2, offset=1, first_dense=2))
    model = llmarch.build(cfg, device="meta")
    kinds = [type(layer.ffn).__name__ for layer in model.decoder.layers]
    assert kinds == ["GLU", "GLU", "GLU", "MoE", "GLU", "MoE"]
    assert model.decoder.layers[0].ffn.d_ff == cfg.d_ff


@pytest.mark.parametrize("changes, match", [
    (dict(moe=None), r"moe: set ffn='moe' together with moe"),
    (dict(ffn="glu"), r"moe: set ffn='moe'"),
    (dict(moe=dict(router="best")), r"moe.router: 'best' is not allowed; choose one of"),
    (dict(moe=dict(router="switch")), r"moe.top_k: router 'switch' routes each token to 1"),
    (dict(moe=dict(top_k=9)), r"moe.top_k: 9 is more than n_experts"),
    (dict(moe=dict(capacity_factor=1.0, expert_capacity=4)), r"moe.expert_capacity: give either"),
    (dict(moe=dict(shared_gate=True)), r"moe.shared_gate"),
    (dict(moe=dict(first_dense=4)), r"moe.every: the schedule"),
    (dict(moe=dict(every=2, offset=2)), r"moe.offset: must be an integer in \[0, every=2\)"),
    (dict(ffn_bias=True), r"ffn_bias: experts have no biases"),
])
def test_bad_config_names_the_field(changes, match):
    with pytest.raises(ValueError, match=match):
        llmarch.preset("mixtral-tiny").replace(**changes)


def test_config_round_trips_with_moe(tmp_path):
    cfg = llmarch.preset("qwen2-moe-tiny")
    assert llmarch.ModelConfig.from_dict(cfg.to_dict()) == cfg
    cfg.to_file(tmp_path / "c.yaml")
    assert llmarch.ModelConfig.from_file(tmp_path / "c.yaml") == cfg
    assert cfg.with_path("moe.top_k", "3").moe.top_k == 3
    with pytest.raises(ValueError, match=r"unknown moe field\(s\) \['experts'\]"):
        llmarch.ModelConfig.from_dict({**cfg.to_dict(), "moe": {"experts": 3}})
    with pytest.raises(ValueError, match="moe: set ffn=.moe. together"):
        llmarch.preset("llama-tiny").with_path("moe.top_k", "3")


def test_router_stats_report_load():
    model = llmarch.build(llmarch.preset("mixtral-tiny").replace(moe=dict(capacity_factor=1.0))).eval()
    model(torch.randint(0, 100, (3, 10)))
    stats = router_stats(model)
    assert [s["layer"] for s in stats] == [f"decoder.layers.{i}.ffn" for i in range(4)]
    for s in stats:
        assert sum(s["tokens_per_expert"]) == 3 * 10 * 2
        assert sum(s["kept_per_expert"]) == pytest.approx(60 * (1 - s["dropped_fraction"]))
        assert max(s["kept_per_expert"]) <= 3 * math.ceil(10 * 2 / 4)
        assert 0 < s["load_entropy"] <= math.log(4) + 1e-6


@pytest.mark.parametrize("router, schedule", [("topk_softmax", {}), ("softmax_topk_norm", dict(every=2))])
def test_upcycled_model_equals_dense(router, schedule):
    from tests.hf_util import padded_batch

    dense_cfg = llmarch.preset("llama-tiny").replace(vocab_size=97, n_layers=2, d_ff=64)
    torch.manual_seed(0)
    dense = llmarch.build(dense_cfg).eval()
    moe = llmarch.upcycle(dense, MoEConfig(n_experts=4, top_k=2, router=router, **schedule), seed=1).eval()
    assert moe.config.moe.n_experts == 4 and dense.config.moe is None
    ids, mask = padded_batch(97, lengths=(9, 5))
    with torch.no_grad():
        a, b = dense(ids, attention_mask=mask).logits, moe(ids, attention_mask=mask).logits
    torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
    stats = router_stats(moe)
    assert len(stats) == (2 if not schedule else 1) and stats[0]["router_entropy"] > 0  # a real router


def test_upcycle_refuses_routers_that_would_not_start_equal():
    dense = llmarch.build(llmarch.preset("llama-tiny").replace(n_layers=1))
    with pytest.raises(ValueError, match=r"moe.router: 'softmax_topk' does not make the K weights sum to one"):
        llmarch.upcycle(dense, MoEConfig(router="softmax_topk"))
    with pytest.raises(ValueError, match=r"moe.expert_ffn"):
        llmarch.upcycle(dense, MoEConfig(expert_ffn="mlp"))


@pytest.mark.parametrize("capacity", [None, 1.0])
def test_no_tokens_give_an_empty_output_under_every_dispatcher(capacity):
    """A [B, 0, D] input (reshaping its routing by -1 was ambiguous, and raised)."""
    for name in DISPATCHERS.names():
        m = MoE(16, 8, "silu", moe=MoEConfig(n_experts=4, top_k=2, dispatch=name, capacity_factor=capacity)).eval()
        with torch.no_grad():
            assert m(torch.randn(2, 0, 16)).shape == (2, 0, 16)
