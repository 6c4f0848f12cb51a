"""bf16 products widened to fp32 (llmarch.nn.widened), the route of CPUs without bf16 products, forced on here
whatever this CPU is: values and gradients against torch's bf16 ``F.linear`` (plain and under autocast), which
products run in fp32, when torch's kernel is kept, expert banks and the MoE dispatcher, a model's training step."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from llmarch.nn import dense, widened
from tests.test_dense import steps_on_and_off

BF16 = torch.bfloat16
PRODUCTS = ("aten.mm", "aten.addmm", "aten.linear", "aten.matmul", "aten.bmm", "mkldnn._linear_pointwise")


class Products(TorchDispatchMode):
    """The dtypes of the matrix products a call runs."""

    def __init__(self):
        super().__init__()
        self.dtypes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func).startswith(PRODUCTS):
            self.dtypes.append(args[0].dtype)
        return func(*args, **(kwargs or {}))


@pytest.fixture
def route(monkeypatch):
    monkeypatch.setattr(widened, "ROUTE", True)


def operands(rows: int, bias: bool, dtype=BF16, out_f: int = 37):
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(2, rows, 24, generator=g).to(dtype)
    w = torch.randn(out_f, 24, generator=g).to(dtype)
    b = torch.randn(out_f, generator=g).to(dtype) if bias else None
    return x, w, b, torch.randn(2, rows, out_f, generator=g)


def run(fn, x, w, b, up, autocast=False):
    xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
    bs = b.clone().requires_grad_() if b is not None else None
    with torch.autocast("cpu", dtype=BF16, enabled=autocast), Products() as seen:
        y = fn(xs, ws, bs)
    (y.float() * up).sum().backward()
    return [y, xs.grad, ws.grad] + ([bs.grad] if b is not None else []), seen.dtypes


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [1, 9, 150])
def test_values_and_grads_equal_torch_bf16(route, bias, rows):
    x, w, b, up = operands(rows, bias)
    ours, dtypes = run(dense.linear, x, w, b, up)
    ref, _ = run(F.linear, x, w, b, up)
    assert dtypes and all(d == torch.float32 for d in dtypes)  # forward, dx, dW: all widened
    for o, r in zip(ours, ref):
        assert o.dtype == BF16
        torch.testing.assert_close(o, r, rtol=2 ** -7, atol=1e-5)  # one bf16 rounding of the same fp32 sum


@pytest.mark.parametrize("bias", [False, True])
def test_autocast_values_and_fp32_grads_equal_autocast_f_linear(route, bias):
    x, w, b, up = operands(20, bias, dtype=torch.float32)
    ours, dtypes = run(dense.linear, x, w, b, up, autocast=True)
    ref, ref_dtypes = run(F.linear, x, w, b, up, autocast=True)
    assert all(d == torch.float32 for d in dtypes) and all(d == BF16 for d in ref_dtypes)
    assert ours[0].dtype == BF16 and all(g.dtype == torch.float32 for g in ours[1:])
    for o, r in zip(ours, ref):
        torch.testing.assert_close(o, r, rtol=2 ** -7, atol=1e-5)


def test_few_rows_of_inference_stay_on_torch_and_fp32_is_untouched(route):
    x, w, b, _ = operands(1, True)
    for rows, want in ((widened.MIN_ROWS - 1, BF16), (widened.MIN_ROWS, torch.float32)):
        xr = x[:1, :1].expand(1, rows, 24).contiguous()
        with torch.no_grad(), Products() as seen:
            y = dense.linear(xr, w, b)
        assert seen.dtypes == [want] and y.dtype == BF16
        torch.testing.assert_close(y, F.linear(xr, w, b), rtol=2 ** -7, atol=1e-5)
    assert not widened.applies(x.float(), w.float())  # fp32 outside autocast: not this route
    with torch.autocast("cpu", dtype=torch.float16):  # nor fp16 autocast, whatever the operands
        assert not widened.applies(x.float(), w.float()) and not widened.applies(x, w)


def test_route_off_keeps_torch_bf16(monkeypatch):
    monkeypatch.setattr(widened, "ROUTE", False)
    monkeypatch.setattr(dense, "ONEDNN_BF16", False)  # and no oneDNN bf16: torch's own kernel
    x, w, b, up = operands(9, True)
    _, dtypes = run(dense.linear, x, w, b, up)
    assert dtypes and all(d == BF16 for d in dtypes)


def test_the_route_follows_the_cpu_and_the_environment():
    code = "from llmarch.nn import dense, widened; print(dense.ONEDNN_BF16, widened.ROUTE)"
    seen, warned = {}, {}
    for value in ("", "0", "1", "yes"):
        r = subprocess.run([sys.executable, "-c", code], env={**os.environ, "LLMARCH_WIDEN_BF16": value},
                           capture_output=True, text=True, check=True)
        seen[value], warned[value] = [v == "True" for v in r.stdout.split()], "LLMARCH_WIDEN_BF16='yes'" in r.stderr
    assert seen[""][1] == (not seen[""][0]) and seen["0"][1] is False
    assert seen["1"] == seen["yes"] == seen[""]  # an unknown value: warned about, the default kept
    assert warned == {"": False, "0": False, "1": False, "yes": True}


def test_moe_in_bf16_runs_sliced_fp32_products_and_equals_the_loop(route):
    """``auto`` takes the sliced dispatcher for bf16 (inference and training) and every product is widened."""
    from llmarch import MoEConfig
    from llmarch.nn.dispatch import DISPATCHERS
    from llmarch.nn.moe import MoE

    torch.manual_seed(0)
    m = MoE(16, 24, "silu", moe=MoEConfig(n_experts=4, top_k=2)).to(BF16)
    x = torch.randn(1, 40, 16).to(BF16)
    outs = []
    for name in ("auto", "loop"):
        m.dispatch, xs = DISPATCHERS[name], x.clone().requires_grad_()
        m.zero_grad()
        with Products() as seen:
            y = m(xs)
            y.float().square().sum().backward()
        outs.append([y, xs.grad] + [p.grad for p in m.parameters()])
        if name == "auto":
            assert seen.dtypes.count(torch.float32) >= 4 * 2 * 3  # 4 experts x 2 products x (forward, dx, dW)
            assert seen.dtypes.count(BF16) <= 3  # the router's product, forward and backward
    for o, r in zip(*outs):
        torch.testing.assert_close(o, r, rtol=3e-2, atol=3e-2)


def test_model_bf16_autocast_training_step_matches_torch(monkeypatch):
    """A decoder's loss and gradients under bf16 autocast, widened, against autocast's own bf16 products."""
    out = steps_on_and_off(monkeypatch, widened, "ROUTE", autocast=BF16, mode=Products)
    assert torch.float32 in out[True][1].dtypes and torch.float32 not in out[False][1].dtypes
    for ours, ref in zip(out[True][0], out[False][0]):
        torch.testing.assert_close(ours, ref, rtol=2e-2, atol=2e-3)


@pytest.mark.parametrize("T", [1, 9])
def test_bf16_attention_runs_in_fp32_and_equals_torch_bf16(route, T):
    """sdpa in bf16 (forward and backward) runs torch's fp32 kernel and rounds once; values within bf16 rounding
    of torch's bf16 kernel, gradients too, against an fp64 reference."""
    from llmarch.nn.kernels import sdpa_attention

    g = torch.Generator().manual_seed(T)
    q, k, v = (torch.randn(2, h, n, 16, generator=g).to(BF16) for h, n in ((4, T), (2, 9), (2, 9)))
    mask = None if T == 9 else torch.rand(2, 1, 1, 9, generator=g) > 0.3
    up = torch.randn(2, 4, T, 16, generator=g)
    outs = []
    for on in (True, False):
        widened.ROUTE = on
        qs, ks, vs = (t.clone().requires_grad_() for t in (q, k, v))
        with Attention() as seen:
            y = sdpa_attention(qs, ks, vs, mask=mask, causal=T == 9)
        (y.float() * up).sum().backward()
        assert y.dtype == BF16 and seen.dtypes and set(seen.dtypes) == {torch.float32 if on else BF16}
        outs.append([y, qs.grad, ks.grad, vs.grad])
    ref = [q.double(), k.double(), v.double()]
    for t in ref:
        t.requires_grad_()
    yr = F.scaled_dot_product_attention(*ref, attn_mask=mask, is_causal=T == 9, enable_gqa=True)
    (yr * up.double()).sum().backward()
    for ours, theirs, exact in zip(*outs, [yr] + [t.grad for t in ref]):
        err, err_torch = (ours.double() - exact).abs().max(), (theirs.double() - exact).abs().max()
        assert err <= 1.5 * err_torch + 1e-3  # as close to fp64 as torch's bf16 kernel, or closer


def test_bf16_decode_attention_is_fp32_rounded_once_on_every_cpu(monkeypatch):
    """A single bf16 query per sequence without gradient (a decode step) runs in fp32 and rounds once whether or not
    the CPU has bf16 products (the native bf16 decode layer computes the same); the same call with a gradient to
    compute keeps torch's bf16 kernel where the route is off."""
    from llmarch.nn.kernels import sdpa_attention

    monkeypatch.setattr(widened, "ROUTE", False)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, h, n, 16, generator=g).to(BF16) for h, n in ((4, 1), (2, 40), (2, 40)))
    mask = torch.rand(3, 1, 1, 40, generator=g) > 0.3
    with torch.no_grad(), Attention() as seen:
        y = sdpa_attention(q, k, v, mask=mask)
    assert set(seen.dtypes) == {torch.float32}
    want = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, enable_gqa=True)
    assert torch.equal(y, want.to(BF16))
    with Attention() as seen:
        sdpa_attention(q.clone().requires_grad_(), k, v, mask=mask)
    assert set(seen.dtypes) == {BF16}


class Attention(TorchDispatchMode):
    """The dtypes of the fused attention kernels' query a call runs."""

    def __init__(self):
        super().__init__()
        self.dtypes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if "scaled_dot_product" in str(func) or "aten.bmm" in str(func) or "aten.matmul" in str(func):
            self.dtypes.append(args[0].dtype)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("counts", [[3, 0, 9, 1], [1, 0, 0, 1]])
def test_bf16_bank_training_widens_in_the_bank_layout(route, counts):
    """bf16 expert banks train through the bank node (llmarch.nn.banks): products widened, the weight gradient
    made in the parameter's column-major layout (no transposing copy of the whole bank), values equal the loop."""
    from llmarch.nn import banks
    from tests.test_bank_linear import grads, naive, operands

    x, bank = operands(BF16, counts)
    bank = torch.nn.Parameter(bank.transpose(1, 2).contiguous().transpose(1, 2))  # the CPU bf16 layout
    produced = []
    bank.register_hook(lambda g: produced.append(g.stride()))
    with Products() as seen:
        got = grads(banks.bank_linear, x, bank.detach(), counts)
        banks.bank_linear(x, bank, counts).float().sum().backward()
    assert produced == [bank.stride()] and torch.float32 in seen.dtypes
    for ours, ref in zip(got, grads(naive, x, bank.detach(), counts)):
        torch.testing.assert_close(ours, ref, rtol=2e-2, atol=2e-2)


def test_packed_bf16_expert_rows_over_the_native_limit_are_widened(route):
    """An expert's packed bf16 copy serves up to MAX_ROWS rows natively; more rows run widened over the bank."""
    from llmarch.native import fp32 as native_fp32
    from llmarch.nn import banks

    if not dense.native_bf16.available():
        pytest.skip("no AVX-512 / AVX2 CPU or no C compiler: the native kernel cannot be built here")
    dense.native_bf16.dp_available()  # its self-check runs now, not under the dispatch mode below
    g = torch.Generator().manual_seed(0)
    plain = torch.randn(24, 40, generator=g).to(BF16)  # an expert's [in, out]
    copy = native_fp32.Blocked(plain.t())
    limit = dense.native_max_rows(BF16)
    for rows, want in ((limit, []), (limit + 1, [torch.float32])):
        x = torch.randn(rows, 24, generator=g).to(BF16)
        with torch.no_grad(), Products() as seen:
            y = banks.packed_mm(x, copy, plain)
        assert seen.dtypes == want and y.dtype == BF16
        torch.testing.assert_close(y, x @ plain, rtol=2 ** -7, atol=1e-5)
