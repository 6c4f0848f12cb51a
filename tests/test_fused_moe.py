"""llmarch.nn.fused_moe: the mixture-of-experts FFN inside a native decode layer (ffn.c). Held to the eager MoE
layer it replaces (itself held to transformers' Mixtral and Qwen2-MoE in the parity tests): per-step logits,
greedy tokens and caches, for every router kind, group-limited routing, a routed-weight scale, GLU and MLP
experts, shared experts with and without their gate, batches where several rows share an expert, padded rows,
int8 attention; and the cases it must leave to the eager layers."""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

import llmarch
from llmarch import native
from llmarch.infer.int8_experts import Int8Experts
from llmarch.infer.layout import pack_weights
from llmarch.infer.quantize import quantize
from llmarch import lora
from llmarch.native import decode as native_decode
from llmarch.native import fp32 as native_fp32
from llmarch.nn import fused_decode, fused_moe
from llmarch.nn.router import Router

from tests.decode_util import Spy, check_steps, generate_both

pytestmark = pytest.mark.skipif(native.library("decode") is None,
                                reason="no x86-64 CPU with AVX2 or no C compiler: the native kernels cannot be built")

BASE = dict(vocab_size=96, d_model=48, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=40, max_seq_len=256)
CASES = {
    "mixtral": dict(n_experts=6, top_k=2),
    "qwen2-moe": dict(n_experts=6, top_k=2, router="softmax_topk", n_shared=1, shared_gate=True, shared_d_ff=24),
    "shared, ungated, 2 of them": dict(n_experts=4, top_k=2, router="softmax_topk", n_shared=2),
    "groups, norm, scale": dict(n_experts=8, top_k=3, router="softmax_topk_norm", n_groups=4, topk_groups=2,
                                routed_scale=2.5),
    "one group of four": dict(n_experts=8, top_k=2, router="softmax_topk", n_groups=4, topk_groups=1),
    "switch, mlp experts": dict(n_experts=4, top_k=1, router="switch", expert_ffn="mlp"),
    "router bias, gelu_tanh": dict(n_experts=4, top_k=2, router_bias=True),
}


def moe_model(seed=0, activation="silu", **moe):
    c = llmarch.preset("mixtral-tiny").replace(**BASE, activation=activation)
    c = c.replace(moe=dataclasses.replace(c.moe, **moe))
    torch.manual_seed(seed)
    model = llmarch.build(c).eval()
    with torch.no_grad():  # gains and biases away from their init values; router logits spread out
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.3 * torch.randn_like(p))
            if "router" in name:
                p.mul_(4.0)
    return model


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("B", [1, 6])
def test_fused_moe_steps_are_the_eager_steps(case, B, monkeypatch):
    model = moe_model(activation="gelu_tanh" if "gelu" in case else "silu", **CASES[case])
    pack_weights(model)
    ids = torch.randint(0, BASE["vocab_size"], (B, 7), generator=torch.Generator().manual_seed(B))
    check_steps(model, ids, 10, monkeypatch)


def test_rows_sharing_experts_and_padding_match(monkeypatch):
    """8 rows over 4 experts (several rows per expert in every step), left-padded to different lengths."""
    model = moe_model(n_experts=4, top_k=2)
    pack_weights(model)
    ids = torch.randint(0, BASE["vocab_size"], (8, 6), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[::2, :3] = 0
    want, got, spy = generate_both(model, ids, 12, monkeypatch, attention_mask=mask)
    assert spy.steps == 11 and torch.equal(got, want)


@pytest.mark.parametrize("case, activations", [("qwen2-moe", "fp32"), ("switch, mlp experts", "fp32"),
                                               ("qwen2-moe", "int8")])
def test_int8_model_and_routing_cleared(case, activations, monkeypatch):
    """quantize() keeps the routers' scorers and the shared experts' gate in fp32 (it used to make the routers'
    Int8Linear, which the router cannot read: every quantized MoE model failed its first forward); attention, the
    shared experts and the routed experts (Int8Experts) run int8 in the native layer too. A native step leaves no
    stale routing behind on the layer. With int8 activations, every product (experts included) runs w8a8.c."""
    model = quantize(moe_model(**CASES[case]), "int8", activations=activations)
    assert all(type(m.proj) is torch.nn.Linear for m in model.modules() if isinstance(m, Router))
    assert type(model.decoder.layers[0].ffn.experts) is Int8Experts
    pack_weights(model)
    ids = torch.randint(0, BASE["vocab_size"], (2, 5), generator=torch.Generator().manual_seed(1))
    moe = model.decoder.layers[0].ffn
    with torch.no_grad():
        model(ids)
    assert moe.last_routing is not None
    check_steps(model, ids, 8, monkeypatch)
    assert moe.last_routing is None and moe.aux_loss is None


def _one_step(model, monkeypatch):
    monkeypatch.setenv("LLMARCH_FUSED_DECODE", "1")
    ids = torch.randint(0, BASE["vocab_size"], (2, 4), generator=torch.Generator().manual_seed(3))
    cache = model.new_cache()
    with torch.no_grad():
        model(ids, cache=cache)
        return model(ids[:, -1:], cache=cache).logits


def test_what_it_does_not_serve_keeps_the_eager_layers(monkeypatch):
    spy = Spy(monkeypatch)
    model = moe_model(n_experts=4, top_k=2)
    pack_weights(model)
    want = _one_step(model, monkeypatch)
    assert spy.steps == 1  # the baseline qualifies
    for over in (dict(capacity_factor=1.0), dict(activation="quick_gelu")):  # a capacity limit; an activation
        other = moe_model(**{**dict(n_experts=4, top_k=2), **over})            # the kernel does not compute
        pack_weights(other)
        _one_step(other, monkeypatch)
    assert spy.steps == 1
    seen = []
    handle = model.decoder.layers[1].ffn.router.register_forward_hook(lambda *a: seen.append(1))
    torch.testing.assert_close(_one_step(model, monkeypatch), want, rtol=1e-5, atol=1e-5)
    assert seen == [1, 1] and spy.steps == 1
    handle.remove()
    bank = model.decoder.layers[0].ffn.experts
    with torch.no_grad():
        bank.down[1].mul_(-1)  # in place: the experts' packed copies are stale
    edited = _one_step(model, monkeypatch)
    assert spy.steps == 1 and not torch.allclose(edited, want)
    pack_weights(model)
    torch.testing.assert_close(_one_step(model, monkeypatch), edited, rtol=1e-5, atol=1e-5)
    assert spy.steps == 2
    adapted = lora.apply(copy.deepcopy(model), r=2, targets=("experts.down",))  # a LoRA bank: a subclass
    pack_weights(adapted)
    _one_step(adapted, monkeypatch)
    assert spy.steps == 2
    assert fused_decode._PLANS  # the plain model's plan is still held


def forward_spy(monkeypatch) -> Spy:
    """Counts the MoE forwards llmarch.nn.fused_moe.forward served."""
    return Spy(monkeypatch, fused_moe, "forward")


@pytest.mark.parametrize("case", ["mixtral", "qwen2-moe", "groups, norm, scale", "switch, mlp experts"])
@pytest.mark.parametrize("N", [1, 16, native_fp32.MAX_ROWS, "most"])  # "most": fused_moe.max_tokens
def test_native_moe_forward_and_its_routing_are_the_eager_ones(case, N, monkeypatch):
    """An MoE layer's inference forward over up to fused_moe.max_tokens rows (a prefill, or a decode step in a stack
    whose attention is not native; past the kernel's row limit of 128 on AVX2 and 32 on AVX-512 while the experts
    average at most fused_moe.EXPERT_ROWS rows) runs in one native call, and records the routing the eager forward
    records."""
    moe = moe_model(**CASES[case]).decoder.layers[0].ffn
    N = fused_moe.max_tokens(moe) if N == "most" else N
    pack_weights(moe)
    x = torch.randn(1, N, BASE["d_model"], generator=torch.Generator().manual_seed(N))
    results = []
    for fused in ("0", "1"):
        monkeypatch.setenv("LLMARCH_FUSED_DECODE", fused)
        spy = forward_spy(monkeypatch)
        with torch.no_grad():
            results.append((moe(x), moe.last_routing[0], moe.aux_loss))
    assert spy.steps == 1
    (want, want_route, want_aux), (got, got_route, got_aux) = results
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(got_route.experts, want_route.experts)
    for name in ("logits", "probs", "weights"):
        torch.testing.assert_close(getattr(got_route, name), getattr(want_route, name), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_aux, want_aux, rtol=1e-5, atol=1e-6)


def test_native_moe_forward_stands_aside(monkeypatch):
    moe = moe_model(n_experts=4, top_k=2).decoder.layers[0].ffn
    x = torch.randn(1, 8, BASE["d_model"])
    spy = forward_spy(monkeypatch)
    with torch.no_grad():
        moe(x)  # banks not packed
        pack_weights(moe)
        moe(torch.randn(1, fused_moe.max_tokens(moe) + 1, BASE["d_model"]))  # more rows than it takes
        for hooked in (moe.router, moe.dropout, moe.experts):  # a hook on a module the eager forward calls
            handle = hooked.register_forward_hook(lambda *a: None)
            moe(x)
            handle.remove()
    moe(x)  # a gradient wanted
    moe.train()
    with torch.no_grad():
        moe(x)
    assert spy.steps == 0
    moe.eval()
    with torch.no_grad():
        moe(x)
    assert spy.steps == 1


@pytest.mark.parametrize("kind", ["fp32", "bf16", "int8"])
def test_native_moe_forward_takes_its_kinds_row_limit(kind, monkeypatch):
    """Each kind of experts has its own limit (fused_moe.EXPERT_ROWS: int8 experts the lowest, their eager
    products over dequantized weights being faster with many rows): up to it one native call, one row more the
    eager forward."""
    model = moe_model(n_experts=4, top_k=2)
    if kind == "int8":
        model = quantize(model, "int8")
    elif kind == "bf16":
        model = model.to(torch.bfloat16)
    moe = model.decoder.layers[0].ffn
    pack_weights(moe)
    dtype = torch.bfloat16 if kind == "bf16" else torch.float32
    most = fused_moe.max_tokens(moe, dtype)
    assert most == max(native_fp32.MAX_ROWS, fused_moe.EXPERT_ROWS["int8" if kind == "int8" else dtype] * 4 // 2)
    spy = forward_spy(monkeypatch)
    with torch.no_grad():
        for n, steps in ((most, 1), (most + 1, 1)):
            moe(torch.randn(1, n, BASE["d_model"]).to(dtype))
            assert spy.steps == steps


def test_latent_attention_moe_model_decodes_with_native_experts(monkeypatch):
    """DeepSeek-V2 style with latent attention that stays eager (``absorb="never"``: its naive form): the MoE
    layers (shared experts, group-limited routing) still run natively in every step."""
    cfg = llmarch.preset("deepseek-v2-tiny")
    model = llmarch.build(cfg.replace(mla=dataclasses.replace(cfg.mla, absorb="never"))).eval()
    pack_weights(model)
    spy = forward_spy(monkeypatch)
    ids = torch.randint(0, 100, (2, 5), generator=torch.Generator().manual_seed(0))
    want, got, decode_spy = generate_both(model, ids, 6, monkeypatch)
    assert torch.equal(got, want) and decode_spy.steps == 0 and spy.steps > 0


def test_moe_kernel_passes_its_self_check():
    assert native_decode.MOE_KERNEL.available()
