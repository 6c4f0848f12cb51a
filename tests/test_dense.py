"""Fast paths of the training step against the reference forms they replace: the oneDNN projection
(llmarch.nn.dense) against F.linear (values, gradients, every layout it meets, the cases that must keep F.linear),
the SwiGLU product and the RoPE rotation in one autograd node each against their plain forms (bit for bit)."""
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import llmarch
from llmarch.nn.dense import ONEDNN, Linear, linear

pytestmark = pytest.mark.skipif(not ONEDNN, reason="this torch build has no oneDNN")


@pytest.fixture
def onednn_fp32(monkeypatch):
    """The oneDNN route for plain fp32 weights, whichever this host takes by default (``dense.ONEDNN_FP32``)."""
    import llmarch.nn.dense as dense

    monkeypatch.setattr(dense, "ONEDNN_FP32", True)


class Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("layout", ["row", "col"])
@pytest.mark.parametrize("out_f", [37, 11])  # wider and narrower than the input
@pytest.mark.parametrize("rows", [5, 200])  # x^T g transposed only for a wide weight and many rows (3 x 200)
def test_values_and_grads_equal_f_linear(bias, layout, out_f, rows, onednn_fp32):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(out_f, 24, generator=g)
    w = w if layout == "row" else w.t().contiguous().t()  # the decode layout stores wide weights column-major
    b = torch.randn(out_f, generator=g) if bias else None
    x = torch.randn(3, rows, 24, generator=g)
    up = torch.randn(3, rows, out_f, generator=g)
    grads = []
    for fn in (linear, F.linear):
        xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
        bs = b.clone().requires_grad_() if bias else None
        with Ops() as ops:
            y = fn(xs, ws, bs)
        (y * up).sum().backward()
        grads.append([y, xs.grad, ws.grad] + ([bs.grad] if bias else []))
        if fn is linear:
            assert any("mkldnn._linear_pointwise" in n for n in ops.names)
    tol = 1e-5 if rows == 5 else 1e-4  # weight gradients sum 600 products in another order: fp32 rounding
    for ours, ref in zip(*grads):
        torch.testing.assert_close(ours, ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("rows", [4, 16])
def test_small_batch_weight_gradient_comes_in_the_weight_layout(rows, onednn_fp32):
    """With few rows the backward computes g^T x directly as [out, in] (AccumulateGrad keeps it as is), instead of
    a transposed x^T g that would cost a copy of the whole gradient."""
    w = torch.nn.Parameter(torch.randn(256, 32))
    produced = []
    w.register_hook(lambda g: produced.append(g.stride()))
    linear(torch.randn(rows, 32, requires_grad=True), w).sum().backward()
    assert produced == [w.stride()]


def test_flop_counter_counts_the_onednn_products(onednn_fp32):
    from torch.utils.flop_counter import FlopCounterMode

    x, w = torch.randn(3, 5, 24, requires_grad=True), torch.randn(37, 24, requires_grad=True)
    counts = []
    for fn in (linear, F.linear):
        with FlopCounterMode(display=False) as counter:
            fn(x, w).sum().backward()
        counts.append(counter.get_total_flops())
    assert counts[0] == counts[1] == 3 * 2 * 15 * 24 * 37  # forward, dx and dW


def test_no_grad_and_fallbacks(onednn_fp32):
    lin = Linear(16, 8)
    x = torch.randn(2, 4, 16)
    with torch.no_grad():
        torch.testing.assert_close(lin(x), F.linear(x, lin.weight, lin.bias), rtol=1e-5, atol=1e-5)
    with Ops() as ops, torch.autocast("cpu", dtype=torch.bfloat16):
        y = lin(x)
    assert y.dtype == torch.bfloat16 and not any("mkldnn" in n for n in ops.names)  # autocast keeps F.linear
    with Ops() as ops, torch.no_grad():
        lin(x[:1, :1])  # one row through a small weight: torch's BLAS (oneDNN's per-call cost does not pay)
    assert not any("mkldnn" in n for n in ops.names)
    lin64 = Linear(16, 8).double()
    assert lin64(x.double()).dtype == torch.float64
    assert lin.state_dict().keys() == torch.nn.Linear(16, 8).state_dict().keys() and isinstance(lin, torch.nn.Linear)


@pytest.mark.parametrize("on", [False, True])
def test_the_host_flag_picks_the_route_of_plain_fp32_products(monkeypatch, on):
    """``ONEDNN_FP32`` off (a host where torch's BLAS is ahead): training and prefill products run ``F.linear``
    (its aten products, no oneDNN call); on: oneDNN, forward and backward."""
    import llmarch.nn.dense as dense

    monkeypatch.setattr(dense, "ONEDNN_FP32", on)
    x, w = torch.randn(6, 24, requires_grad=True), torch.randn(37, 24, requires_grad=True)
    with Ops() as ops:
        linear(x, w).sum().backward()
        with torch.no_grad():
            linear(x, w)
    onednn = [n for n in ops.names if "mkldnn._linear_pointwise" in n]
    assert len(onednn) == (4 if on else 0)  # forward, dx, dW; the gradient-free forward
    assert on or sum("aten.mm" in n for n in ops.names) >= 3


def test_the_host_flag_follows_the_cpu_and_the_environment():
    """oneDNN for plain fp32 weights by default only where the CPU has AVX-512; ``LLMARCH_ONEDNN_FP32`` overrides."""
    import os
    import subprocess
    import sys

    code = ("import torch; from llmarch.nn import dense; "
            "print(torch.backends.cpu.get_cpu_capability(), dense.ONEDNN_FP32)")
    seen = {}
    for value in ("", "0", "1", "on"):
        env = {**os.environ, "LLMARCH_ONEDNN_FP32": value}
        r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        cap, flag = r.stdout.split()
        seen[value] = (cap, flag == "True", "LLMARCH_ONEDNN_FP32='on'" in r.stderr)
    cap = seen[""][0]
    assert seen[""][1] == cap.startswith("AVX512") and seen["0"][1] is False and seen["1"][1] is True
    assert seen["on"][1:] == (seen[""][1], True) and not any(seen[v][2] for v in ("", "0", "1"))  # warned, ignored


def loss_and_grads(model, ids: torch.Tensor, autocast: torch.dtype | None = None) -> list[torch.Tensor]:
    """One training step's next-token loss and every parameter's gradient (``autocast``: CPU autocast dtype)."""
    model.zero_grad()
    with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        logits = model(ids).logits
    loss = F.cross_entropy(logits.float().flatten(0, 1), ids.roll(-1, 1).flatten())
    loss.backward()
    return [loss] + [p.grad.clone() for p in model.parameters()]


def steps_on_and_off(monkeypatch, module, flag: str, autocast=None, mode=None):
    """:func:`loss_and_grads` of a 2-layer llama-tiny with ``module.flag`` True, then False; with the dispatch
    ``mode`` seen by each step."""
    torch.manual_seed(0)
    model = llmarch.build(llmarch.preset("llama-tiny").replace(n_layers=2))
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    out = {}
    for on in (True, False):
        monkeypatch.setattr(module, flag, on)
        with (mode or Ops)() as seen:
            out[on] = (loss_and_grads(model, ids, autocast), seen)
    return out


def test_model_training_step_matches_f_linear(monkeypatch):
    """A decoder's loss and gradients through oneDNN equal those with every projection on F.linear."""
    import llmarch.nn.dense as dense

    out = steps_on_and_off(monkeypatch, dense, "ONEDNN_FP32")
    for ours, ref in zip(out[True][0], out[False][0]):
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("strided", [False, True])
def test_silu_gate_equals_chunk_silu_mul_bit_for_bit(strided):
    from llmarch.nn.activation import gate_product

    g = torch.Generator().manual_seed(0)
    base = torch.randn(3, 16, 5, generator=g)
    up = torch.randn(3, 5, 8, generator=g)
    grads = []
    for fn in (lambda h: gate_product(F.silu, h), lambda h: F.silu(h.chunk(2, -1)[0]) * h.chunk(2, -1)[1]):
        leaf = base.clone().requires_grad_()
        h = leaf.transpose(1, 2) if strided else leaf.transpose(1, 2).contiguous()  # [3, 5, 16]
        with Ops() as ops:
            y = fn(h)
            (y * up).sum().backward()
        grads.append((y, leaf.grad, ops.names))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])
    assert not any("cat" in n for n in grads[0][2]) and any("cat" in n for n in grads[1][2])


@pytest.mark.parametrize("strided", [False, True])
def test_half_rotation_equals_plain_rope_bit_for_bit(strided):
    """The fused rotary rotation (llmarch.nn.rope.rotate) against x * cos + rotate_half(x) * sin."""
    from llmarch.nn.rope import rotate, rotate_half

    g = torch.Generator().manual_seed(0)
    base = torch.randn(2, 7, 3, 8, generator=g)  # [B, T, N, R]
    ang = torch.randn(2, 1, 7, 4, generator=g)
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()  # [B, 1, T, R]
    up = torch.randn(2, 3, 7, 8, generator=g)
    out = []
    for fn in (rotate, lambda x, c, s: x * c + rotate_half(x) * s):
        leaf = base.clone().requires_grad_()
        x = leaf.transpose(1, 2) if strided else leaf.transpose(1, 2).contiguous()  # [B, N, T, R]
        with Ops() as ops:
            y = fn(x, cos, sin)
            (y * up).sum().backward()
        out.append((y, leaf.grad, ops.names))
    assert torch.equal(out[0][0], out[1][0]) and torch.equal(out[0][1], out[1][1])
    assert not any("cat" in n for n in out[0][2])


def test_no_grad_paths_equal_the_autograd_nodes_bit_for_bit():
    """Decoding (no autograd) runs the SwiGLU product and the rotation without their Function nodes."""
    from llmarch.nn.activation import gate_product
    from llmarch.nn.rope import rotate

    g = torch.Generator().manual_seed(0)
    h, x = torch.randn(2, 3, 16, generator=g), torch.randn(2, 4, 3, 8, generator=g).transpose(1, 2)
    ang = torch.randn(2, 1, 4, 4, generator=g)
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()
    with_grad = gate_product(F.silu, h.requires_grad_()), rotate(x.requires_grad_(), cos, sin)
    assert with_grad[0].grad_fn is not None and with_grad[1].grad_fn is not None
    with torch.inference_mode():
        without = gate_product(F.silu, h), rotate(x, cos, sin)
    assert all(torch.equal(a, b) for a, b in zip(with_grad, without))
