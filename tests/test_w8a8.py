"""int8 weights with int8 activations (llmarch.native.w8a8, ``quantize(..., activations="int8")``).

The torch form is held to a naive per-block computation written here; the native kernel's quantization to the torch
form's bit for bit (ties, zeros, NaN, infinities, a ragged last block) and its products to the torch form's across
row tiles, ragged output blocks and threads, in each of its three builds (VNNI, AVX-512BW without VNNI, AVX2);
Int8Linear, quantize / save / load, the CLI and the native decode layers (tests/test_fused_decode.py,
tests/test_fused_moe.py) run it; logits stay near fp32."""
from __future__ import annotations

import copy
import ctypes
import json
import math

import pytest
import torch
from torch import nn

import llmarch
from llmarch import native
from llmarch.checkpoint import load_model, save_model
from llmarch.cli import main
from llmarch.infer.quantize import Int8Linear, quantize, save_quantized
from llmarch.native import w8a8

native_only = pytest.mark.skipif(native.library("w8a8") is None, reason="no x86-64 CPU with AVX2 or no C compiler: the "
                                 "native W8A8 kernel cannot be built (the torch form is tested without it)")


def naive_quantize(x: torch.Tensor):
    """Per row and block of 32, by the definition: amax, q = round-half-even(x * (127 / amax)) in fp32."""
    M, K = x.shape
    nk = math.ceil(K / 32)
    q, s = torch.zeros(M, nk * 32, dtype=torch.int8), torch.zeros(M, nk)
    for m in range(M):
        for b in range(nk):
            blk = x[m, 32 * b:32 * b + 32]
            amax = blk.abs().max()
            if not torch.isfinite(blk).all():
                s[m, b] = float("nan")
                continue
            s[m, b] = amax / 127
            if amax > 0:
                inv = torch.tensor(127.0) / amax  # fp32, as the kernel divides
                q[m, 32 * b:32 * b + len(blk)] = torch.round(blk * inv).clamp(-127, 127).to(torch.int8)
    return q, s


def naive_mm(x, qweight, scales, bias=None):
    """float64: sum over blocks of sx * (integer dot product), times the weight scale, plus the bias."""
    q, s = naive_quantize(x)
    K = x.shape[1]
    xd = (q[:, :K].double().view(x.shape[0], -1) * s.double().repeat_interleave(32, 1)[:, :K])
    y = xd @ (qweight.double() * scales.double()[:, None]).T
    return y if bias is None else y + bias.double()


def tricky_rows(M: int, K: int, seed: int = 0) -> torch.Tensor:
    """Random rows with exact rounding ties (x * 127 / amax = n + 0.5), a zero block and a ragged last block."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g) * torch.logspace(-3, 3, M)[:, None]
    x[0, :32] = torch.tensor([127.0, 2.5, -2.5, 3.5, -0.5, 0.5, 1.5] + [0.25] * 25)[:min(32, K)]  # amax 127
    if K > 64:
        x[-1, 32:64] = 0.0
    return x


def test_torch_form_is_the_naive_definition():
    x = tricky_rows(5, 70)
    q, s = w8a8.quantize_rows(x)
    nq, ns = naive_quantize(x)
    assert torch.equal(q, nq) and torch.equal(s, ns)
    assert q[0, :7].tolist() == [127, 2, -2, 4, 0, 0, 2]  # ties go to even
    deq = q[:, :70].float() * s.repeat_interleave(32, 1)[:, :70]
    assert ((deq - x).abs() <= s.repeat_interleave(32, 1)[:, :70] / 2 * (1 + 1e-6) + 1e-30).all()
    g = torch.Generator().manual_seed(1)
    qw = torch.randint(-127, 128, (21, 70), dtype=torch.int8, generator=g)
    sc, b = torch.rand(21, generator=g), torch.randn(21, generator=g)
    want = naive_mm(x, qw, sc, b)
    got = w8a8.reference_mm(x, qw, sc, b)
    assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-6 * want.abs().max().item())


def test_torch_form_propagates_nan_and_infinity():
    x = torch.randn(3, 64)
    x[1, 40], x[2, 3] = float("nan"), float("inf")
    q, s = w8a8.quantize_rows(x)
    assert s[1, 1].isnan() and s[2, 0].isnan() and not s[0].isnan().any() and (q[1, 32:] == 0).all()
    y = w8a8.reference_mm(x, torch.ones(5, 64, dtype=torch.int8), torch.ones(5))
    assert y[1:].isnan().all() and not y[0].isnan().any()


KERNEL_CASES = [(1, 37, 70), (2, 16, 32), (3, 33, 31), (7, 50, 96), (8, 64, 257), (9, 17, 64), (21, 48, 100)]


def check_kernel(gemm, quant):
    """The kernel ``gemm`` / ``quant`` (ctypes functions of a w8a8 build) against the torch form."""
    for i, (M, N, K) in enumerate(KERNEL_CASES):
        x = tricky_rows(M, K, i)
        q, s, c = (torch.empty(M, w8a8.padded(K), dtype=torch.int8), torch.empty(M, w8a8.padded(K) // 32),
                   torch.empty(M, w8a8.padded(K) // 32, dtype=torch.int32))
        quant(x.data_ptr(), q.data_ptr(), s.data_ptr(), c.data_ptr(), M, K)
        tq, ts = w8a8.quantize_rows(x)
        assert torch.equal(q, tq) and torch.equal(s, ts), (M, N, K)
        assert torch.equal(c, -128 * tq.view(M, -1, 32).sum(-1, dtype=torch.int32))
        g = torch.Generator().manual_seed(i)
        qw = torch.randint(-127, 128, (N, K), dtype=torch.int8, generator=g)
        qw[0] = 127  # the extremes: 255 and 1 once offset
        qw[-1] = -127
        sc, bias = torch.rand(N, generator=g), torch.randn(N, generator=g)
        w, sp = w8a8.block(qw, sc)
        for b in (None, bias):
            y = torch.full((M, N), 7.0)
            rc = gemm(x.data_ptr(), w.data_ptr(), sp.data_ptr(), None if b is None else b.data_ptr(), y.data_ptr(),
                      M, N, K)
            want = w8a8.reference_mm(x, qw, sc, b)
            assert rc == 0
            torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


@native_only
@pytest.mark.parametrize("threads", [1, 2])
def test_kernel_is_the_torch_form(threads):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        check_kernel(*functions(native.library("w8a8")))  # the host's build, as llmarch loads it
    finally:
        torch.set_num_threads(before)
    assert w8a8.available()  # it passed its self-check
    q, s, c = w8a8.quantize_native(tricky_rows(3, 70))
    assert torch.equal(q, w8a8.quantize_rows(tricky_rows(3, 70))[0])


# The kernel's three instruction paths, each built here where the compiler can target it: VPDPBUSD on zmm (the
# host's, where it has AVX-512 VNNI), the sign-flip VPMADDUBSW form on zmm (AVX-512BW), and the AVX2 form on ymm.
BUILDS = {"no vnni": ("-mno-avx512vnni", "-mno-avxvnni"), "avx2": ("-mno-avx512f", "-mno-avxvnni")}


def functions(lib):
    """(gemm, quantize) of a w8a8 build, typed."""
    gemm, quant = lib.llmarch_w8a8_gemm, lib.llmarch_w8a8_quantize
    gemm.argtypes, gemm.restype = w8a8._KERNEL.argtypes, ctypes.c_int
    quant.argtypes, quant.restype = w8a8._QUANTIZE.argtypes, None
    return gemm, quant


def build(flags: tuple[str, ...], tmp_path):
    """w8a8.c compiled with these extra flags: its (gemm, quantize) functions."""
    out = tmp_path / "w8a8.so"
    error = native._build(native.Path(w8a8.__file__).with_name("w8a8.c"), out, native._compiler(), flags)
    assert error is None, error
    return functions(ctypes.CDLL(str(out)))


@native_only
@pytest.mark.parametrize("flags", sorted(BUILDS))
def test_each_instruction_path_is_the_torch_form(flags, tmp_path):
    check_kernel(*build(BUILDS[flags], tmp_path))


@native_only
def test_the_avx_vnni_path_builds(tmp_path):
    """VPDPBUSD on ymm (AVX-VNNI without AVX-512): compiled here; run only where the CPU has it."""
    kernels = build(("-mno-avx512f", "-mavxvnni"), tmp_path)
    if "avx_vnni" in native._cpu()[1]:
        check_kernel(*kernels)


@native_only
def test_kernel_propagates_nan():
    x = torch.randn(2, 40)
    x[1, 35] = float("nan")
    y = w8a8.mm(x, torch.ones(3, 40, dtype=torch.int8), torch.ones(3))
    assert y[1].isnan().all() and not y[0].isnan().any()


def test_int8_linear_with_int8_activations(monkeypatch):
    """Without gradients: the W8A8 product (the kernel where it builds, else the torch form; the same values); with
    gradients: the fp32-activation product, whose input gradient is the dequantized weight's."""
    torch.manual_seed(0)
    lin = nn.Linear(70, 40)
    q = Int8Linear.from_linear(lin)
    q.activations = "int8"
    x = torch.randn(2, 3, 70)
    with torch.no_grad():
        got = q(x)
        monkeypatch.setattr(w8a8, "available", lambda: False)
        fallback = q(x)
    want = naive_mm(x.view(6, 70), q.qweight, q.scales, q.bias).float().view(2, 3, 40)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(fallback, got, rtol=1e-5, atol=1e-4)
    full = x @ q.dequantize().T + q.bias
    assert 0 < (got - full).abs().max() < 0.03 * full.abs().max()  # activations rounded: close, not equal
    xg = x.clone().requires_grad_()
    y = q(xg)
    torch.testing.assert_close(y, full, rtol=1e-5, atol=1e-5)
    y.sum().backward()
    torch.testing.assert_close(xg.grad, q.dequantize().sum(0).expand(2, 3, 70), rtol=1e-5, atol=1e-5)
    qz = __import__("importlib").import_module("llmarch.infer.quantize")
    with torch.no_grad():
        assert torch.equal(qz.w8a8_mm(x.view(6, 70), q.qweight, q.scales, q.bias).view(2, 3, 40), fallback)
    with pytest.raises(ValueError, match="activations"):
        Int8Linear(4, 4, activations="int4")
    with pytest.raises(ValueError, match=r"-128.*\[-127, 127\]"):
        w8a8.block(torch.full((3, 8), -128, dtype=torch.int8), torch.ones(3))
    assert "activations=int8" in repr(q)


def test_quantize_with_int8_activations_saves_reloads_and_stays_near_fp32(tmp_path):
    cfg = llmarch.preset("llama-tiny").replace(vocab_size=211, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                                               d_ff=128, max_seq_len=64)
    torch.manual_seed(0)
    model = llmarch.build(cfg).eval()
    ids = torch.randint(0, 211, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids).logits
        a8 = quantize(copy.deepcopy(model), "int8", activations="int8")
        a32 = quantize(copy.deepcopy(model), "int8")
        out, out32 = a8(ids).logits, a32(ids).logits
    assert {m.activations for m in a8.modules() if isinstance(m, Int8Linear)} == {"int8"}
    err = (out - ref).abs() / ref.std()
    assert err.mean() < 0.03 and err.max() < 0.15  # the weights' rounding plus the activations'
    assert not torch.allclose(out, out32, rtol=1e-4, atol=1e-4)  # the activations really were rounded
    save_quantized(a8, tmp_path / "q")
    assert json.loads((tmp_path / "q" / "quantization.json").read_text())["activations"] == "int8"
    again = load_model(tmp_path / "q")
    with torch.no_grad():
        assert torch.equal(again(ids).logits, out)
    eager = llmarch.generate(again, ids[:1, :4], 8)
    compiled = llmarch.generate(again, ids[:1, :4], 8, cache="static", compile=True)  # through llmarch::w8a8_mm
    assert torch.equal(compiled, eager) and eager.shape == (1, 12)
    for bad in (dict(mode="int8", activations="fp16"), dict(mode="int4", activations="int8")):
        with pytest.raises(ValueError, match="activations"):
            quantize(copy.deepcopy(model), **bad)


def test_convert_cli_writes_int8_activations(tmp_path, capsys):
    torch.manual_seed(0)
    save_model(llmarch.build(llmarch.preset("llama-tiny")), tmp_path / "m")
    assert main(["convert", str(tmp_path / "m"), str(tmp_path / "q"), "--quantize", "int8", "--activations",
                 "int8"]) == 0
    assert json.loads(capsys.readouterr().out)["activations"] == "int8"
    assert json.loads((tmp_path / "q" / "quantization.json").read_text())["activations"] == "int8"
    assert main(["inspect", str(tmp_path / "q")]) == 0  # says how the directory stores the weights
    assert "Stored quantized: int8; int8 activations" in capsys.readouterr().out
    assert main(["inspect", str(tmp_path / "m"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["quantization"] is None
    assert main(["convert", str(tmp_path / "m"), str(tmp_path / "q4"), "--quantize", "int4", "--activations",
                 "int8"]) == 2
    err = capsys.readouterr().err
    assert "--activations int8 needs --quantize int8" in err and "Traceback" not in err
    assert not (tmp_path / "q4").exists()
