"""llmarch.native.rows: RMSNorm and the half-split rotary embedding in one native call each (decoding). The
norm is held to a float64 reference and to torch.rms_norm, the rotation to llmarch.nn.rope's torch form bit for
bit (strided and broadcast operands too); the modules route decode-sized calls without a gradient to them and
everything else to torch; a model gives the same logits and tokens with and without them."""
from __future__ import annotations

import pytest
import torch

import llmarch
from llmarch import native
from llmarch.native import rows
from llmarch.nn import rope
from llmarch.nn.norm import RMSNorm, rounded_rms_norm

pytestmark = pytest.mark.skipif(native.library("rows") is None,
                                reason="no x86-64 CPU or no C compiler: the native kernels cannot be built here")


def test_kernels_pass_their_self_checks():
    assert all(k.available() for k in (rows._NORM, rows._ROTATION, rows._NORM16, rows._ROTATION16))


@pytest.mark.parametrize("shape", [(1, 1, 512), (3, 7), (2, 5, 1), (4, 64), (300, 256)])
def test_rms_norm_is_the_fp32_rms_norm(shape):
    g = torch.Generator().manual_seed(sum(shape))
    x, w = torch.randn(*shape, generator=g) * 3, torch.randn(shape[-1], generator=g)
    got = rows.rms_norm(x, w, 1e-5)
    xd = x.double()
    want = (xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-5) * w.double()).float()
    assert got.shape == x.shape
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got, torch.rms_norm(x, (shape[-1],), w, 1e-5), rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("shape", [(1, 1, 512), (3, 7), (2, 5, 1), (300, 256)])
def test_bf16_rms_norm_is_the_bf16_form_within_an_ulp(shape):
    """bf16: normalised in fp32, rounded, times the gain, rounded (llmarch.nn.norm's bf16 form); the mean summed
    in double may move an element by one bf16 ulp, rarely."""
    g = torch.Generator().manual_seed(sum(shape))
    x, w = (torch.randn(*shape, generator=g) * 3).bfloat16(), torch.randn(shape[-1], generator=g).bfloat16()
    got, want = rows.rms_norm(x, w, 1e-5), rounded_rms_norm(x, w, 1e-5)
    assert got.dtype == torch.bfloat16 and got.shape == x.shape
    assert ((got.float() - want.float()).abs() <= want.float().abs() * 2 ** -7).all()
    assert (got == want).float().mean() >= 0.99


@pytest.mark.parametrize("B,N,T,R", [(1, 8, 1, 64), (2, 3, 5, 8), (3, 2, 1, 2)])
@pytest.mark.parametrize("strided", [False, True])
@pytest.mark.parametrize("broadcast", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotation_is_the_torch_form_bit_for_bit(B, N, T, R, strided, broadcast, dtype):
    g = torch.Generator().manual_seed(B * 100 + N * 10 + T)
    x = torch.randn(B, T, N, R, generator=g).transpose(1, 2) if strided else torch.randn(B, N, T, R, generator=g)
    cb = 1 if broadcast else B
    c, s = torch.randn(cb, 1, T, R, generator=g), torch.randn(cb, 1, T, R, generator=g)
    x, c, s = x.to(dtype), c.to(dtype), s.to(dtype)
    got = rows.rotate_half(x, c, s)
    assert got is not None and got.dtype == dtype and torch.equal(got, rope._half_rotation(x, c, s))
    assert torch.equal(got, x * c + rope.rotate_half(x) * s)  # the reference form, same products and sums


def test_rotation_declines_what_it_does_not_serve():
    x, c = torch.randn(1, 2, 3, 6), torch.randn(1, 1, 3, 6)
    assert rows.rotate_half(x, c, c) is not None
    assert rows.rotate_half(x[..., ::2], c[..., ::2], c[..., ::2]) is None  # last dim not contiguous
    assert rows.rotate_half(x[..., :5], c[..., :5], c[..., :5]) is None  # odd width
    assert rows.rotate_half(x, c[:, :, :1], c[:, :, :1]) is None  # positions broadcast


class Spy:
    def __init__(self, monkeypatch):
        self.norm = self.rotation = 0
        real_norm, real_rot = rows.rms_norm, rows.rotate_half
        monkeypatch.setattr(rows, "rms_norm", lambda *a: self._count("norm") or real_norm(*a))
        monkeypatch.setattr(rows, "rotate_half", lambda *a: self._count("rotation") or real_rot(*a))

    def _count(self, name):
        setattr(self, name, getattr(self, name) + 1)


def test_modules_route_only_gradient_free_decode_sized_calls(monkeypatch):
    spy = Spy(monkeypatch)
    norm, x = RMSNorm(64), torch.randn(2, 3, 64)
    with torch.no_grad():
        y = norm(x)
    assert spy.norm == 1
    torch.testing.assert_close(y, torch.rms_norm(x, (64,), norm.weight, norm.eps), rtol=2e-6, atol=2e-6)
    norm(x).sum().backward()  # training: torch's kernel, with its gradient
    assert spy.norm == 1 and norm.weight.grad is not None
    with torch.no_grad():
        norm(x.bfloat16())  # bf16 input, fp32 gain: not one dtype
    assert spy.norm == 1
    big = torch.randn(rows.MAX_ELEMENTS // 64 + 3, 64)
    with torch.no_grad():  # any size: a row's bits never depend on the rest of the batch
        assert torch.equal(norm(big)[:2], norm(big[:2])) and spy.norm == 3
    q, c, s = torch.randn(1, 4, 1, 16), torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)
    with torch.no_grad():
        rope.rotate(q, c, s)
    assert spy.rotation == 1
    qg = q.clone().requires_grad_()
    rope.rotate(qg, c, s).sum().backward()
    assert spy.rotation == 1 and qg.grad is not None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_model_decodes_the_same_with_and_without_them(monkeypatch, dtype):
    cfg = llmarch.preset("llama-tiny").replace(vocab_size=97, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                                               d_ff=128, max_seq_len=64)
    torch.manual_seed(0)
    model = llmarch.build(cfg).eval().to(dtype)
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(1))
    spy = Spy(monkeypatch)
    with torch.no_grad():
        logits = model(ids).logits
        tokens = llmarch.generate(model, ids, max_new_tokens=12)
    assert spy.norm > 0 and spy.rotation > 0
    monkeypatch.setattr(rows, "applies", lambda *a, **k: False)
    tol = 1e-5 if dtype == torch.float32 else 2e-2  # bf16: a norm element may move by one ulp
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, logits, rtol=tol, atol=tol)
        assert torch.equal(llmarch.generate(model, ids, max_new_tokens=12), tokens)
