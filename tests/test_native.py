"""llmarch's native kernels (llmarch.native.fp32 / .int8 / .bf16, built by llmarch.native): the products they
promise against a float64 reference at every row count and ragged shape, Int8Linear's use of the int8 one
(dense.linear's use of the fp32 one: tests/test_packed.py), re-deriving the blocked int8 weight after edits,
threads, and the fallbacks (disabled, no compiler, a failed build)."""
from __future__ import annotations

import copy
import ctypes
import gc
import importlib
import logging

import pytest
import torch
from torch import nn

import llmarch
from llmarch import native
from llmarch.native import bf16 as bf16_native
from llmarch.native import fp32 as fp32_native
from llmarch.native import int8 as int8_native
from llmarch.infer.quantize import Int8Linear, quantize

# Skipped only where the kernel cannot be built; a kernel that builds but computes wrong fails below.
pytestmark = pytest.mark.skipif(native.library("gemv") is None,
                                reason="no AVX-512 / AVX2 CPU or no C compiler: the native kernel cannot be built here")
qz = importlib.import_module("llmarch.infer.quantize")


def test_kernels_pass_their_self_checks():
    assert int8_native.available() and fp32_native.available() and bf16_native.available()


def _ref(x, q, s):
    return (x.double() @ q.double().T * s.double()).float()


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 6, 7, 8, 9, 12, 13, 14, 16, 31])
@pytest.mark.parametrize("n,k", [(1, 1), (16, 64), (37, 21), (50, 130), (100, 33)])
def test_kernel_is_the_fp32_product(rows, n, k):
    """Ragged N (padding of the last block), K not a multiple of 4 (the tail loop), 1-8 rows per tile and more,
    blocks read several at once and one at a time (100 outputs: a group of 4 blocks and one of 3; past 8 rows, tiles
    of 2-4 blocks on AVX-512)."""
    g = torch.Generator().manual_seed(rows * 1000 + n + k)
    q = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    s, x = torch.rand(n, generator=g) + 0.1, torch.randn(rows, k, generator=g)
    got, want = int8_native.mm(x, q, s), _ref(x, q, s)
    assert got.shape == (rows, n)
    # fp32 up to summation order; bf16 activations (torch's kernel) miss this by ~100x
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8, 9, 12, 13, 32])
@pytest.mark.parametrize("n,k", [(1, 1), (37, 21), (50, 130), (100, 33)])
@pytest.mark.parametrize("bias", [False, True])
def test_fp32_kernel_is_the_fp32_product(rows, n, k, bias):
    g = torch.Generator().manual_seed(rows * 1000 + n + k)
    w, x = torch.randn(n, k, generator=g), torch.randn(rows, k, generator=g)
    b = torch.randn(n, generator=g) if bias else None
    got = fp32_native.mm(x, fp32_native.Blocked(w), b)
    want = (x.double() @ w.double().T + (0 if b is None else b.double())).float()
    assert got.shape == (rows, n)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8, 9, 32])
@pytest.mark.parametrize("n,k", [(1, 1), (37, 21), (50, 130), (100, 33)])
@pytest.mark.parametrize("bias", [False, True])
def test_bf16_kernel_is_the_product_of_the_bf16_weights_rounded_once(rows, n, k, bias):
    """bf16 weights (and activations) widened to fp32, summed in fp32, the result rounded to bf16 once: within
    half a bf16 ulp of the exact product, plus fp32 summation error."""
    g = torch.Generator().manual_seed(rows * 1000 + n + k)
    w, x = torch.randn(n, k, generator=g).bfloat16(), torch.randn(rows, k, generator=g).bfloat16()
    b = torch.randn(n, generator=g).bfloat16() if bias else None
    got = bf16_native.mm(x, fp32_native.Blocked(w), b)
    exact = x.double() @ w.double().T + (0 if b is None else b.double())
    assert got.shape == (rows, n) and got.dtype == torch.bfloat16
    assert ((got.double() - exact).abs() <= exact.abs() * 2 ** -8 + 1e-5 * exact.abs().max()).all()


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 6, 7, 8, 9, 12, 13, 14, 17])
@pytest.mark.parametrize("n,k", [(37, 21), (50, 130), (16, 1), (100, 64), (200, 65)])
def test_bf16_dot_product_kernel_is_the_widening_one(rows, n, k):
    """On CPUs with AVX-512 BF16, bf16 activations take VDPBF16PS (pairs of k, an odd last k paired with zeros;
    tiles of 1-8 rows by one block, and past 8 rows by 1-4, whole and partial groups of blocks, activations rounded
    32 at a time and then one at a time):
    before rounding, the fp32 product of the bf16 operands as the widening kernel gives it, up to summation order;
    after rounding, equal but for a rare flip; fp32 activations keep the widening kernel."""
    if "avx512_bf16" not in native._cpu()[1] or native.library("gemv") is None:
        pytest.skip("the CPU has no AVX-512 BF16 (or no C compiler): the dot-product kernel is not built here")
    g = torch.Generator().manual_seed(rows * 1000 + n + k)
    w, x = torch.randn(n, k, generator=g).bfloat16(), torch.randn(rows, k, generator=g).bfloat16()
    b = torch.randn(n, generator=g).bfloat16()
    blocked = fp32_native.Blocked(w)
    fn = native.library("gemv").llmarch_bf16_gemv_dp  # as built for this CPU, whatever its self-check says
    fn.argtypes, fn.restype = bf16_native._DP.argtypes, ctypes.c_int
    dp = bf16_native._call_dp(fn, x, blocked, b)
    wide = bf16_native._call(bf16_native._KERNEL.fn(), x, blocked, b)
    exact = x.double() @ w.double().T + b.double()
    torch.testing.assert_close(dp.double(), exact, rtol=1e-5, atol=1e-5 * exact.abs().max().item())
    torch.testing.assert_close(dp, wide, rtol=1e-5, atol=1e-5 * exact.abs().max().item())
    assert bf16_native.dp_available()  # it passes its self-check
    assert (bf16_native.mm(x, blocked, b) == dp.bfloat16()).all()  # bf16 activations: this kernel
    assert (bf16_native.mm(x.float(), blocked, b) == wide.bfloat16()).all()  # fp32 ones: the widening kernel


def test_the_avx2_build_is_the_fp32_product_too(tmp_path):
    """The AVX2 variant of gemv.c, built without AVX-512 (on an AVX-512 CPU the default build is the other one),
    over both weight types, every row count up to 9 and ragged block groups."""
    cc = native._compiler()
    out = tmp_path / "gemv-avx2.so"
    error = native._build(native.Path(native.__file__).with_name("gemv.c"), out, cc, extra=("-mno-avx512f",))
    assert error is None, error
    lib = native.ctypes.CDLL(str(out))
    f32, i8, b16 = lib.llmarch_f32_gemv, lib.llmarch_int8_gemv, lib.llmarch_bf16_gemv
    for fn in (f32, i8, b16):
        fn.argtypes, fn.restype = fp32_native._KERNEL.argtypes, None
    g = torch.Generator().manual_seed(0)
    for rows in range(1, 10):
        for n, k in [(37, 21), (100, 33), (130, 64)]:
            w, b, x = torch.randn(n, k, generator=g), torch.randn(n, generator=g), torch.randn(rows, k, generator=g)
            want = (x.double() @ w.double().T + b.double()).float()
            got = fp32_native._call(f32, x, fp32_native.Blocked(w), b)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
            q = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
            s = torch.rand(n, generator=g) + 0.1
            got = int8_native._call(i8, x, *int8_native.block(q, s), n, b)
            want = (x.double() @ q.double().T * s.double() + b.double()).float()
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
            w16 = w.bfloat16()  # the bf16 kernel before its rounding: the fp32 product of the bf16 weights
            got = bf16_native._call(b16, x, fp32_native.Blocked(w16), b)
            want = (x.double() @ w16.double().T + b.double()).float()
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def test_int8_linear_decodes_through_the_kernel_in_fp32(monkeypatch):
    calls = []
    real = int8_native.mm
    monkeypatch.setattr(int8_native, "mm", lambda *a: calls.append(1) or real(*a))
    torch.manual_seed(0)
    q = Int8Linear.from_linear(nn.Linear(96, 40, bias=True))
    x = torch.randn(2, 3, 96)
    with torch.no_grad():
        got = q(x)
        bf = q(x.bfloat16())
    want = x @ q.dequantize().T + q.bias
    assert calls and got.shape == (2, 3, 40) and bf.dtype == torch.bfloat16
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        q(torch.randn(qz.INT8_ONEDNN_MIN_ROWS, 96))  # a prefill: oneDNN's bf16 route where the CPU has it
    assert len(calls) == (2 if qz._BF16_ONEDNN else 3)


def test_quantized_model_equals_its_dequantized_fp32_model():
    """Decode-sized batches: an int8 model's logits are the fp32 model with the dequantized weights."""
    cfg = llmarch.preset("llama-tiny").replace(vocab_size=211, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                                               d_ff=128, max_seq_len=64)
    torch.manual_seed(0)
    qmodel = quantize(llmarch.build(cfg).eval(), "int8")
    ref = copy.deepcopy(qmodel)
    for name, m in list(ref.named_modules()):
        if isinstance(m, Int8Linear):
            lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
            lin.weight.data = m.dequantize()
            parent, _, attr = name.rpartition(".")
            setattr(ref.get_submodule(parent) if parent else ref, attr, lin)
    ids = torch.randint(0, 211, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(qmodel(ids).logits, ref(ids).logits, rtol=1e-4, atol=1e-4)


def test_blocked_weight_follows_edits_and_goes_with_its_weight():
    torch.manual_seed(0)
    q = Int8Linear.from_linear(nn.Linear(64, 48, bias=False))
    x = torch.randn(2, 64)
    with torch.no_grad():
        before = q(x)
        q.qweight.neg_()
        torch.testing.assert_close(q(x), -before, rtol=1e-5, atol=1e-5)
        q.load_state_dict({"qweight": q.qweight.neg(), "scales": q.scales * 2})
        torch.testing.assert_close(q(x), 2 * before, rtol=1e-5, atol=1e-5)
        q.qweight = q.qweight.clone()  # a new tensor: a new entry
        torch.testing.assert_close(q(x), 2 * before, rtol=1e-5, atol=1e-5)
    key = id(q.qweight)
    assert key in int8_native._blocked
    del q
    gc.collect()
    assert key not in int8_native._blocked


def test_threads_give_the_same_bits():
    g = torch.Generator().manual_seed(0)
    q = torch.randint(-127, 128, (300, 96), dtype=torch.int8, generator=g)
    s, x = torch.rand(300, generator=g), torch.randn(5, 96, generator=g)
    one = int8_native.mm(x, q, s)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert torch.equal(int8_native.mm(x, q, s), one)
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """An empty kernel cache; the loaded kernels forgotten before and after."""
    monkeypatch.setenv("LLMARCH_CACHE", str(tmp_path))
    int8_native.reset()
    fp32_native.reset()
    bf16_native.reset()
    yield tmp_path
    monkeypatch.undo()
    int8_native.reset()
    fp32_native.reset()
    bf16_native.reset()


def test_disabled_falls_back_to_torch(fresh, monkeypatch):
    monkeypatch.setenv("LLMARCH_NATIVE", "0")
    assert not int8_native.available() and not fp32_native.available()
    q = Int8Linear.from_linear(nn.Linear(64, 48))
    with torch.no_grad(), torch.profiler.profile() as prof:
        q(torch.randn(3, 64))
    assert "aten::_weight_int8pack_mm" in {e.key for e in prof.key_averages()}
    assert not (fresh / "kernels").exists()


def test_build_is_cached_atomic_and_a_failure_is_remembered(fresh, monkeypatch, caplog):
    assert int8_native.available()
    built = list((fresh / "kernels").iterdir())
    assert len(built) == 1 and built[0].suffix == ".so"  # no temporary file left behind
    int8_native.reset()
    monkeypatch.setattr(native, "_build", lambda *a: pytest.fail("rebuilt a cached kernel"))
    assert int8_native.available()

    monkeypatch.undo()
    monkeypatch.setenv("LLMARCH_CACHE", str(fresh / "other"))
    monkeypatch.setenv("CC", "false")  # a "compiler" that always fails
    monkeypatch.setattr(native, "_compiler", lambda: "/bin/false")
    int8_native.reset()
    with caplog.at_level(logging.WARNING):
        assert not int8_native.available()
    assert "could not compile" in caplog.text
    assert list((fresh / "other" / "kernels").glob("*.failed"))
    int8_native.reset()
    monkeypatch.setattr(native, "_build", lambda *a: pytest.fail("retried a failed build"))
    assert not int8_native.available()
    marker = next((fresh / "other" / "kernels").glob("*.failed"))  # a day later: one more try
    old = marker.stat().st_mtime - native.RETRY_AFTER_S - 1
    native.os.utime(marker, (old, old))
    tried = []
    monkeypatch.setattr(native, "_build", lambda *a, **k: tried.append(1) or "still failing")
    int8_native.reset()
    assert not int8_native.available() and tried == [1]
    assert marker.stat().st_mtime > old + native.RETRY_AFTER_S  # failed again: remembered for another day


def test_no_compiler_falls_back(fresh, monkeypatch):
    monkeypatch.setattr(native, "_compiler", lambda: None)
    assert not int8_native.available()
    q = Int8Linear.from_linear(nn.Linear(64, 48))
    x = torch.randn(3, 64)
    with torch.no_grad():
        assert (q(x) - (x @ q.dequantize().T + q.bias)).abs().max() < 2e-2  # torch's bf16 kernel


def test_an_unwritable_cache_falls_back(fresh, monkeypatch, caplog):
    blocker = fresh / "not-a-dir"
    blocker.write_text("a file where the cache directory would go")
    monkeypatch.setenv("LLMARCH_CACHE", str(blocker))
    with caplog.at_level(logging.WARNING):
        assert not int8_native.available() and not fp32_native.available()
    assert "could not compile" in caplog.text
    assert blocker.read_text().startswith("a file")  # nothing of the user's touched
