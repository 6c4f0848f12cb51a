"""Weight-only int8 / int4 quantization: rounding error bounds per weight, the packed kernels against the
dequantized matmul, model logits against fp32 (errors reported, tolerances documented in docs/inference.md) and
the saved directory reloading through load_model."""
from __future__ import annotations

import copy
import importlib
import logging

import pytest
import torch
from torch import nn

import llmarch
from llmarch.checkpoint import load_model
from llmarch.native import int8 as int8_native
from llmarch.infer.quantize import Int4Linear, Int8Linear, quantize, save_quantized

log = logging.getLogger(__name__)
CFG = llmarch.preset("llama-tiny").replace(vocab_size=211, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                                           d_ff=128, max_seq_len=64)
# |logits - fp32 logits| relative to the fp32 logits' std. int8: the weights' rounding (and bf16 activations
# where torch's kernels run); int4: 16 levels per group of random (uniform-ish) weights.
TOL = {"int8": dict(mean=0.02, max=0.1), "int4": dict(mean=0.2, max=1.0)}


def test_int8_rounding_and_kernel():
    torch.manual_seed(0)
    lin = nn.Linear(96, 40, bias=True)
    q = Int8Linear.from_linear(lin)
    assert ((q.dequantize() - lin.weight).abs() <= q.scales[:, None] / 2 + 1e-7).all()
    x = torch.randn(3, 5, 96)
    with torch.no_grad():
        want = x @ q.dequantize().T + lin.bias
        got = q(x)
    assert got.shape == (3, 5, 40)
    assert (got - want).abs().max() < 2e-2 * want.abs().max()  # bf16 activations without the native kernel


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_int4_rounding_and_kernel(group_size):
    torch.manual_seed(0)
    lin = nn.Linear(256, 50, bias=False)  # 50 rows: not a multiple of 16, exercises the kernel's padding
    q = Int4Linear.from_linear(lin, group_size)
    err = (q.dequantize() - lin.weight).abs().view(50, -1, group_size)
    assert (err <= q.scales[..., None] / 2 + 1e-6).all()
    x = torch.randn(4, 256)
    with torch.no_grad():
        want = x @ q.dequantize().T
        got = q(x)
    assert (got - want).abs().max() < 3e-2 * want.abs().max()  # bf16 activations, bf16 scales and zeros
    with pytest.raises(ValueError, match="group_size"):
        Int4Linear(256, 8, group_size=48)


def quantized_within_tolerance(cfg, mode: str):
    """A model of ``cfg`` quantized (groups of 32): its logits on a batch stay within TOL of the fp32 model's.
    Returns (the batch, the quantized model, its logits)."""
    torch.manual_seed(0)
    model = llmarch.build(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids).logits
        qmodel = quantize(copy.deepcopy(model), mode, group_size=32)
        out = qmodel(ids).logits
    err = (out - ref).abs() / ref.std()
    log.info("%s logits: max rel err %.4f, mean rel err %.4f", mode, err.max(), err.mean())
    assert err.mean() < TOL[mode]["mean"] and err.max() < TOL[mode]["max"]
    return ids, qmodel, out


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_logits_close_to_fp32_and_reload(mode, tmp_path):
    ids, qmodel, out = quantized_within_tolerance(CFG, mode)
    assert not any(isinstance(m, nn.Linear) for m in qmodel.modules())
    save_quantized(qmodel, tmp_path / "q")
    again = load_model(tmp_path / "q")
    with torch.no_grad():
        assert torch.equal(again(ids).logits, out)
    gen = llmarch.generate(again, ids[:1, :4], 8, cache="static")
    assert gen.shape == (1, 12)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_mixture_of_experts_keeps_its_scorers_and_reloads(mode, tmp_path):
    """Routers read their scorer's fp32 weight, and the shared experts' gate is one output: both stay plain
    (quantizing the routers made every MoE model fail its first forward); everything else is quantized."""
    import dataclasses

    c = llmarch.preset("qwen2-moe-tiny").replace(vocab_size=211, d_model=64, n_layers=2, d_ff=64, max_seq_len=64)
    ids, qmodel, out = quantized_within_tolerance(c.replace(moe=dataclasses.replace(c.moe, shared_gate=True,
                                                                                  n_shared=1)), mode)
    plain = {name for name, m in qmodel.named_modules() if type(m) is nn.Linear}
    assert plain == {f"decoder.layers.{i}.ffn.{p}" for i in range(2) for p in ("router.proj", "shared.gate")}
    banks = {type(m.ffn.experts).__name__ for m in qmodel.decoder.layers}
    assert banks == ({"Int8Experts"} if mode == "int8" else {"GLUExperts"})  # int4 leaves the banks in fp32
    save_quantized(qmodel, tmp_path / "q")
    with torch.no_grad():
        assert torch.equal(load_model(tmp_path / "q")(ids).logits, out)
    with pytest.raises(ValueError, match="quantized .*save_quantized"):  # not a deep conversion error
        llmarch.hf.save(qmodel, tmp_path / "hf", model_type="qwen2_moe")
    assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize("kind", ["glu", "mlp"])
def test_int8_expert_banks_are_the_dequantized_banks_under_every_dispatcher(kind):
    """quantize(..., "int8") makes each routed expert's matrices Int8Linear (Int8Experts): every dispatcher gives
    the fp32 bank's output with the dequantized weights, and the rounding is at most half a step per weight."""
    from llmarch.infer.int8_experts import Int8Experts
    from llmarch.moe_config import MoEConfig
    from llmarch.nn.dispatch import DISPATCHERS
    from llmarch.nn.moe import MoE

    torch.manual_seed(0)
    moe = MoE(32, 24, "silu", moe=MoEConfig(n_experts=4, top_k=2, expert_ffn=kind)).eval()
    bank = moe.experts
    q = Int8Experts.from_bank(bank)
    up = bank.gate_up if kind == "glu" else bank.up
    for e in range(4):
        for lin, w in ((q.up[e], up[e]), (q.down[e], bank.down[e])):
            assert ((lin.dequantize() - w.t()).abs() <= lin.scales[:, None] / 2 + 1e-7).all()
    with torch.no_grad():  # the fp32 bank with the dequantized weights: the reference
        up.copy_(torch.stack([m.dequantize().t() for m in q.up]))
        bank.down.copy_(torch.stack([m.dequantize().t() for m in q.down]))
    x = torch.randn(2, 9, 32)
    with torch.no_grad():
        want = moe(x)
        moe.experts = q
        for name in DISPATCHERS.names():
            moe.dispatch = DISPATCHERS[name]
            torch.testing.assert_close(moe(x), want, rtol=1e-5, atol=1e-5, msg=name)


def test_quantized_latent_attention_decodes_like_its_full_forward():
    """Latent attention's absorbed decode reads its up-projection as a matrix: quantized, it uses the dequantized
    one (it read ``.weight`` and raised), so a cached step gives the full forward's last logits."""
    torch.manual_seed(0)
    model = quantize(llmarch.build(llmarch.preset("deepseek-v2-tiny")).eval(), "int8")
    ids = torch.randint(0, 100, (2, 6), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        cache = model.new_cache()
        model(ids[:, :5], cache=cache)
        step = model(ids[:, 5:], cache=cache).logits[:, -1]
        torch.testing.assert_close(step, model(ids).logits[:, -1], rtol=1e-5, atol=1e-5)


def test_int4_skips_layers_its_groups_do_not_fit(caplog):
    model = llmarch.build(CFG.replace(d_ff=96))  # ffn.down has 96 inputs: not a multiple of 64
    quantize(model, "int4", group_size=64)
    assert isinstance(model.decoder.layers[0].ffn.down, nn.Linear)
    assert isinstance(model.decoder.layers[0].ffn.gate_up, Int4Linear)
    assert "decoder.layers.0.ffn.down" in model.quantization["skip"]
    with pytest.raises(ValueError, match="mode"):
        quantize(model, "int1")


@pytest.mark.parametrize("rows", [3, 40])
def test_int8_kernel_per_row_count(rows, monkeypatch):
    """Few rows: llmarch's native kernel where it builds (tests/test_native.py), else torch's packed kernel; from
    INT8_ONEDNN_MIN_ROWS (a prefill): oneDNN's bf16 matmul where the CPU has it, else the native kernel again.
    All within bf16 rounding of the dequantized fp32 product."""
    qz = importlib.import_module("llmarch.infer.quantize")  # the package exports a function of that name
    calls = []
    real = int8_native.mm
    monkeypatch.setattr(int8_native, "mm", lambda *a: calls.append(1) or real(*a))
    torch.manual_seed(0)
    q = Int8Linear.from_linear(nn.Linear(64, 48))
    x = torch.randn(rows, 64)
    with torch.no_grad(), torch.profiler.profile() as prof:
        got = q(x)
    want = x @ q.dequantize().T + q.bias
    assert (got - want).abs().max() < 2e-2 * want.abs().max()
    names = {e.key for e in prof.key_averages()}
    onednn = "mkldnn::_linear_pointwise" in names
    assert onednn == (qz._BF16_ONEDNN and rows >= qz.INT8_ONEDNN_MIN_ROWS)
    # a prefill without oneDNN's bf16 products (an AVX2 host) runs the native kernel too
    assert bool(calls) == ((rows < qz.INT8_ONEDNN_MIN_ROWS or not qz._BF16_ONEDNN) and int8_native.available())
    assert ("aten::_weight_int8pack_mm" in names) == (not onednn and not calls)


def test_int8_eager_path_equals_the_custom_op_and_follows_new_scales():
    """Eager calls skip the custom op's dispatch (same kernel, same values); the cached bf16 scales follow an
    in-place change of the scales."""
    qz = importlib.import_module("llmarch.infer.quantize")
    torch.manual_seed(0)
    q = Int8Linear.from_linear(nn.Linear(64, 48, bias=False))
    x = torch.randn(2, 64)
    with torch.no_grad():
        before = q(x)
        assert torch.equal(before, qz.int8_mm(x, q.qweight, q.scales))
        q.scales.mul_(2)  # e.g. load_state_dict copying other scales in
        torch.testing.assert_close(q(x), 2 * before, rtol=1e-2, atol=1e-3)
        q.load_state_dict({"qweight": q.qweight, "scales": q.scales / 4})
        torch.testing.assert_close(q(x), before / 2, rtol=1e-2, atol=1e-3)
