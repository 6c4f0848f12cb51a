"""The gated delta rule and the hybrid model around it: the three forms (parallel, chunked, recurrent) against a
naive per-head loop written here, outputs and gradients; the short convolution streamed vs whole; cached decoding of
a 3:1 hybrid equals full recomputation; left padding changes nothing for the real tokens; config errors name
their field."""
from __future__ import annotations

import pytest
import torch

import llmarch
from llmarch.nn.linear import FORMS
from llmarch.nn.linear.conv import ShortConv
from llmarch.nn.norm import NORMS


def naive_rule(q, k, v, g, beta, S0):
    """Per batch row, head and step: S <- exp(g) S; S <- S + k (beta (v - Sᵀk))ᵀ; o = Sᵀq."""
    B, H, T, _ = k.shape
    out = torch.zeros(B, H, T, v.shape[-1], dtype=torch.float64)
    states = torch.zeros_like(S0, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            S = S0[b, h].double()
            for t in range(T):
                S = S * torch.exp(g[b, h, t].double())
                kt, vt = k[b, h, t].double(), v[b, h, t].double()
                S = S + torch.outer(kt, beta[b, h, t].double() * (vt - S.T @ kt))
                out[b, h, t] = S.T @ q[b, h, t].double()
            states[b, h] = S
    return out, states


def inputs(B=2, H=3, T=19, Dk=8, Dv=5, seed=0):
    g_ = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T, Dk, generator=g_) * Dk ** -0.5
    k = torch.nn.functional.normalize(torch.randn(B, H, T, Dk, generator=g_), dim=-1)
    v = torch.randn(B, H, T, Dv, generator=g_)
    g = -torch.rand(B, H, T, generator=g_)  # log decay in (-1, 0]
    beta = torch.rand(B, H, T, generator=g_)
    S0 = torch.randn(B, H, Dk, Dv, generator=g_) * 0.3
    return [t.requires_grad_() for t in (q, k, v, g, beta, S0)]


@pytest.mark.parametrize("form, kwargs", [("parallel", {}), ("recurrent", {}), ("chunked", {"chunk_size": 4}),
                                          ("chunked", {"chunk_size": 64})])
def test_forms_equal_the_naive_rule_outputs_and_grads(form, kwargs):
    xs = inputs()
    o, S = FORMS[form](*xs, **kwargs)
    o_ref, S_ref = naive_rule(*xs)
    torch.testing.assert_close(o.double(), o_ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(S.double(), S_ref, atol=1e-5, rtol=1e-4)
    w = torch.randn_like(o)
    grads = torch.autograd.grad((o * w).sum() + S.sum(), xs)
    ys = inputs()
    o2, S2 = FORMS["recurrent"](*ys)  # gradients against the plain recurrence
    ref = torch.autograd.grad((o2 * w).sum() + S2.sum(), ys)
    for a, b in zip(grads, ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_chunked_continues_from_a_state_like_one_pass():
    q, k, v, g, beta, S0 = (t.detach() for t in inputs(T=23))
    whole, S_whole = FORMS["chunked"](q, k, v, g, beta, S0, chunk_size=8)
    a, Sa = FORMS["chunked"](q[:, :, :10], k[:, :, :10], v[:, :, :10], g[:, :, :10], beta[:, :, :10], S0, chunk_size=8)
    b, Sb = FORMS["chunked"](q[:, :, 10:], k[:, :, 10:], v[:, :, 10:], g[:, :, 10:], beta[:, :, 10:], Sa,
                             chunk_size=8)
    torch.testing.assert_close(torch.cat([a, b], dim=2), whole, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(Sb, S_whole, atol=1e-5, rtol=1e-4)


def test_short_conv_streams_like_one_pass():
    conv = ShortConv(6, 4)
    torch.nn.init.normal_(conv.weight)
    x = torch.randn(2, 6, 11)
    whole, last = conv(x)
    ref = torch.nn.functional.silu(torch.nn.functional.conv1d(x, conv.weight, padding=3, groups=6)[..., :11])
    torch.testing.assert_close(whole, ref)
    state, parts = None, []
    for t in range(11):
        y, state = conv(x[:, :, t:t + 1], state)
        parts.append(y)
    torch.testing.assert_close(torch.cat(parts, -1), whole)
    torch.testing.assert_close(state, last)


def test_zero_centred_rmsnorm_applies_one_plus_weight():
    norm = NORMS["rmsnorm_zero"](8, eps=1e-6)
    norm.after_init()
    assert torch.equal(norm.weight, torch.zeros(8))
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(3, 8)
    ref = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * (1 + norm.weight)
    torch.testing.assert_close(norm(x), ref)


def hybrid(**changes):
    cfg = llmarch.preset("qwen3-next-tiny").replace(
        vocab_size=97, d_model=32, n_heads=4, head_dim=8, d_ff=64, **changes,
        linear=dict(n_k_heads=2, n_v_heads=4, k_head_dim=8, v_head_dim=8, chunk_size=4))
    torch.manual_seed(0)
    model = llmarch.build(cfg).eval()
    with torch.no_grad():  # slow decays, so the state carries information across many steps
        for name, p in model.named_parameters():
            if name.endswith("A_log"):
                p.copy_(torch.empty_like(p).uniform_(0.01, 0.3).log())
    return model


def test_cached_decoding_equals_full_recomputation():
    model = hybrid()
    ids = torch.randint(0, 97, (2, 13))
    with torch.no_grad():
        full = model(ids).logits
        cache = model.new_cache()
        parts = [model(ids[:, :6], cache=cache).logits, model(ids[:, 6:9], cache=cache).logits]
        parts += [model(ids[:, t:t + 1], cache=cache).logits for t in range(9, 13)]
    assert type(cache).__name__ == "StateCache" and set(cache.state) == {0, 1, 2} and set(cache.k) == {3}
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-4)


def test_left_padding_does_not_leak():
    model = hybrid()
    ids = torch.randint(1, 97, (1, 9))
    padded = torch.cat([torch.randint(1, 97, (1, 4)), ids], dim=1)  # garbage under the padding
    mask = torch.cat([torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 9, dtype=torch.long)], dim=1)
    with torch.no_grad():
        alone = model(ids).logits
        both = model(padded, attention_mask=mask).logits[:, 4:]
        torch.testing.assert_close(both, alone, atol=1e-5, rtol=1e-4)
        a = llmarch.generate(model, ids, max_new_tokens=6)[:, 9:]
        b = llmarch.generate(model, padded, attention_mask=mask, max_new_tokens=6)[:, 13:]
    assert torch.equal(a, b)


def test_config_errors_name_the_field():
    cfg = llmarch.preset("qwen3-next-tiny")
    assert llmarch.ModelConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.with_path("layer_mixers", "gated_delta+attention").layer_mixers == ("gated_delta", "attention")
    with pytest.raises(ValueError, match=r"linear.n_v_heads: must be a multiple"):
        cfg.replace(linear=dict(n_k_heads=3))
    with pytest.raises(ValueError, match=r"linear.conv_kernel: must be a positive integer"):
        cfg.replace(linear=dict(conv_kernel=0))
    with pytest.raises(ValueError, match=r"layer_mixers: 'gated_deltas' is not allowed"):
        cfg.replace(layer_mixers=("gated_deltas",))
    with pytest.raises(ValueError, match=r"layer_mixers: has 3 entries"):
        cfg.replace(layer_mixers=("gated_delta",) * 3)


def test_static_cache_refuses_recurrent_layers():
    model = hybrid()
    with pytest.raises(ValueError, match=r"cache: the static cache holds multi-head k/v; mixers"):
        llmarch.generate(model, torch.randint(0, 97, (1, 4)), max_new_tokens=2, cache="static")


def test_lora_on_the_hybrid_merges_exactly():
    """Gated attention's q adapter spans the query and its gate ([q | gate | k | v]); gated delta layers adapt
    their output projection; merged weights compute what the adapters did."""
    from llmarch import lora

    model = hybrid()
    ids = torch.randint(0, 97, (2, 9))
    lora.apply(model, r=4, alpha=8, targets=("q", "k", "v", "o"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.05)
        adapted = model(ids).logits
        lora.merge(model)
        merged = model(ids).logits
    torch.testing.assert_close(merged, adapted, atol=1e-5, rtol=1e-4)
    q_b = dict(model.named_parameters())["decoder.layers.3.attn.qkv.adapters.q.lora_B"]
    assert q_b.shape[0] == 2 * 4 * 8  # 2·H·Dh rows
    assert any(n.startswith("decoder.layers.0.attn.out.adapters.o.") for n, _ in model.named_parameters())
