"""Low-bit weights against their written-out definitions: group-wise int3/int2, BitNet b1.58 ternary; the
straight-through fake quantization of QAT; QAT training then quantizing computes what training computed."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import llmarch
from llmarch.infer.lowbit import LowBitLinear, fake_quantize, prepare_qat, quantized_weight
from llmarch.infer.quantize import load_quantized, quantize, save_quantized


def naive_groupwise(w: torch.Tensor, bits: int, gs: int) -> torch.Tensor:
    out = torch.empty_like(w)
    for n in range(w.shape[0]):
        for g in range(0, w.shape[1], gs):
            chunk = w[n, g:g + gs]
            lo, hi = chunk.min(), chunk.max()
            s = max((hi - lo).item() / (2 ** bits - 1), 1e-12)
            out[n, g:g + gs] = torch.clamp(torch.round((chunk - lo) / s), 0, 2 ** bits - 1) * s + lo
    return out


@pytest.mark.parametrize("mode,bits", [("int3", 3), ("int2", 2)])
def test_groupwise_low_bit_matches_its_definition(mode, bits):
    torch.manual_seed(0)
    lin = nn.Linear(64, 6, bias=True)
    q = LowBitLinear.from_linear(lin, mode, group_size=32)
    expected = naive_groupwise(lin.weight.detach(), bits, 32)
    torch.testing.assert_close(q.dequantize(), expected, atol=1e-6, rtol=1e-6)
    assert int(q.qweight.max()) <= 2 ** bits - 1
    assert all(len(torch.unique(q.qweight[n, g:g + 32])) <= 2 ** bits for n in range(6) for g in (0, 32))
    x = torch.randn(3, 64)
    torch.testing.assert_close(q(x), x @ expected.T + lin.bias, atol=1e-5, rtol=1e-5)


def test_ternary_is_bitnet_absmean():
    torch.manual_seed(0)
    lin = nn.Linear(32, 8, bias=False)
    w = lin.weight.detach()
    gamma = w.abs().mean()
    expected = torch.clamp(torch.round(w / gamma), -1, 1) * gamma
    q = LowBitLinear.from_linear(lin, "ternary")
    torch.testing.assert_close(q.dequantize(), expected)
    assert set(q.qweight.unique().tolist()) <= {-1, 0, 1}


def test_fake_quantize_is_straight_through():
    w = torch.randn(4, 64, requires_grad=True)
    y = fake_quantize(w, "int2", 32)
    torch.testing.assert_close(y.detach(), quantized_weight(w.detach(), "int2", 32))
    (y * torch.arange(64.0)).sum().backward()
    torch.testing.assert_close(w.grad, torch.arange(64.0).expand(4, 64))  # the identity's gradient


@pytest.mark.parametrize("mode", ["int4", "int2", "ternary"])
def test_qat_model_then_quantized_computes_what_training_computed(mode, tmp_path):
    torch.manual_seed(0)
    cfg = llmarch.preset("llama-tiny").replace(vocab_size=128, d_model=64, d_ff=128, n_layers=2)
    model = llmarch.build(cfg)
    names = prepare_qat(model, mode, group_size=32)
    assert "decoder.layers.0.attn.qkv" in names and "lm_head" not in names
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in llmarch.build(cfg).named_parameters()]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.randint(0, 128, (4, 16))
    for _ in range(3):  # gradients reach the float weights through the rounding
        loss = torch.nn.functional.cross_entropy(model(ids).logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        trained = model(ids).logits
        plain = llmarch.build(cfg).eval()
        plain.load_state_dict(model.state_dict())
        q = quantize(plain, mode, group_size=32, skip=("lm_head",))
        save_quantized(q, tmp_path / "q")
        again = load_quantized(tmp_path / "q")(ids).logits
    tol = 5e-2 if mode == "int4" else 1e-4  # int4 runs torch's bf16 CPU kernel; the others dequantize in fp32
    torch.testing.assert_close(again, trained, atol=tol, rtol=0)


def test_bad_modes_are_named():
    with pytest.raises(ValueError, match="qat"):
        prepare_qat(nn.Linear(4, 4), "int1")
    from tests.train_util import settings

    with pytest.raises(ValueError, match="qat"):
        settings("out", "cache", qat="int1")
