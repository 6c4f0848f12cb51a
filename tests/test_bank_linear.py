"""``llmarch.nn.banks.bank_linear``: each expert's rows times its matrix, against a loop written here, forward and
backward, with empty experts, partial gradients and the gradient's layout (fp32 on oneDNN, other dtypes on the
plain path)."""
from __future__ import annotations

import pytest
import torch

from llmarch.nn import banks, dense

pytestmark = pytest.mark.skipif(not dense.ONEDNN, reason="this torch build has no oneDNN (no kernel to test)")

COUNTS = [3, 0, 5, 1, 0, 7]  # experts 1 and 4 get no rows


def naive(x, bank, counts):
    return torch.cat([xe @ bank[e] for e, xe in enumerate(x.split(counts)) if counts[e]])


def operands(dtype=torch.float32, counts=COUNTS, d_in=12, d_out=20):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(sum(counts), d_in, generator=g).to(dtype)
    bank = (torch.randn(len(counts), d_in, d_out, generator=g) * 0.3).to(dtype)
    return x, bank


def grads(fn, x, bank, counts, need=(True, True)):
    xi, bi = x.clone().requires_grad_(need[0]), bank.clone().requires_grad_(need[1])
    y = fn(xi, bi, counts)
    (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    return y.detach(), xi.grad, bi.grad


@pytest.mark.parametrize("onednn", [False, True])
def test_fp32_forward_and_grads_equal_the_loop_on_the_host_route(monkeypatch, onednn):
    """One ``_Bank`` node either way; its products on oneDNN only where ``dense.ONEDNN_FP32`` says so."""
    from llmarch.native import plain
    from tests.test_dense import Ops  # records the aten ops a call runs

    monkeypatch.setattr(dense, "ONEDNN_FP32", onednn)
    monkeypatch.setattr(plain, "available", lambda: False)  # the few-row kernels: tests/test_plain.py
    x, bank = operands()
    with Ops() as ops:
        y = banks.bank_linear(x.clone().requires_grad_(), bank.clone().requires_grad_(), COUNTS)
        y.sum().backward()
    assert type(y.grad_fn).__name__ == "_BankBackward"
    # 4 experts with rows; the one-row expert stays on BLAS: 3 forward, 3 dx, 3 dW products on oneDNN
    assert sum("mkldnn._linear_pointwise" in n for n in ops.names) == (9 if onednn else 0)
    (y0, gx0, gb0), (y1, gx1, gb1) = (grads(f, x, bank.detach(), COUNTS) for f in (naive, banks.bank_linear))
    torch.testing.assert_close(y1, y0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gx1, gx0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gb1, gb0, atol=1e-5, rtol=1e-5)
    assert gb1[1].abs().sum() == 0 and gb1[4].abs().sum() == 0 and gb1[0].abs().sum() > 0


@pytest.mark.parametrize("need", [(True, False), (False, True)])
def test_only_the_needed_gradient_is_computed(need):
    x, bank = operands()
    (_, gx0, gb0), (_, gx1, gb1) = (grads(f, x, bank, COUNTS, need) for f in (naive, banks.bank_linear))
    for g0, g1 in ((gx0, gx1), (gb0, gb1)):
        assert (g0 is None) == (g1 is None)
        if g0 is not None:
            torch.testing.assert_close(g1, g0, atol=1e-5, rtol=1e-5)


def test_the_bank_gradient_keeps_the_parameter_layout():
    """AccumulateGrad keeps a gradient laid out like its parameter as is (no copy of the whole bank)."""
    x, bank = operands()
    for p in (torch.nn.Parameter(bank.clone()), torch.nn.Parameter(bank.transpose(1, 2).contiguous().transpose(1, 2))):
        produced = []
        p.register_hook(lambda g: produced.append(g.stride()))  # the gradient as the backward made it
        banks.bank_linear(x, p, COUNTS).sum().backward()
        assert produced == [p.stride()]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inference_runs_on_onednn_and_equals_the_loop(monkeypatch, dtype):
    from tests.test_dense import Ops  # records the aten ops a call runs

    monkeypatch.setattr(dense, "ONEDNN_FP32", True)  # the route of AVX-512 hosts, forced here on any CPU
    x, bank = operands(dtype)
    if dtype == torch.bfloat16:  # a bf16 bank is stored column-major on the CPU (llmarch.nn.experts)
        bank = bank.transpose(1, 2).contiguous().transpose(1, 2)
    with torch.no_grad(), Ops() as ops:
        y = banks.bank_linear(x, bank, COUNTS)
    assert any("mkldnn._linear_pointwise" in n for n in ops.names) == dense.onednn_dtype(dtype)  # bf16: CPU's
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(y, naive(x, bank, COUNTS), atol=tol, rtol=tol)


def test_bf16_training_values_equal_the_loop():
    xb, bb = operands(torch.bfloat16)
    (y0, gx0, gb0), (y1, gx1, gb1) = (grads(f, xb, bb, COUNTS) for f in (naive, banks.bank_linear))
    assert y1.dtype == torch.bfloat16
    torch.testing.assert_close(y1, y0, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(gb1, gb0, atol=2e-2, rtol=2e-2)


def test_moe_inference_in_fp32_runs_the_sliced_onednn_products(monkeypatch):
    """``auto`` without gradients (unpacked fp32 on CPU) takes sliced at every size, and equals the loop."""
    from llmarch import MoEConfig
    from llmarch.nn.dispatch import DISPATCHERS
    from llmarch.nn.moe import MoE

    torch.manual_seed(0)
    m = MoE(16, 24, "silu", moe=MoEConfig(n_experts=4, top_k=2)).eval()
    calls = []
    real = banks.bank_linear
    monkeypatch.setattr(banks, "bank_linear", lambda *a: calls.append(1) or real(*a))
    x = torch.randn(1, 1, 16)
    with torch.no_grad():
        y = m(x)
        m.dispatch = DISPATCHERS["loop"]
        torch.testing.assert_close(y, m(x), atol=1e-6, rtol=1e-5)
    assert len(calls) == 2  # gate_up and down
