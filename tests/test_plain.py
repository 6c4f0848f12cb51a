"""``llmarch.native.plain``: the few-row products over a plain fp32 weight and the non-temporal zero fill, against
float64 products written here (odd sizes, strided rows, unaligned outputs, the copied-operand paths); and an
expert bank's training through them (``llmarch.nn.banks``) against the loop dispatcher."""
from __future__ import annotations

import pytest
import torch

from llmarch import native
from llmarch.native import plain
from llmarch.nn import banks, dense

# skipped only where the kernels cannot be built; a kernel that builds but fails its self-check fails these tests
pytestmark = pytest.mark.skipif(native.library("plain") is None, reason="no AVX2 + FMA CPU or no C compiler")


def test_the_kernels_pass_their_self_check():
    assert plain.available()


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def close(got, want):
    """Within 1e-5 where the sums are short; over long sums, at most 4x the error of torch's own fp32 product
    (``want`` is float64: its error is that of the fp32 product of the same operands, rounded)."""
    assert got.dtype == torch.float32 and got.shape == want.shape
    error = (got.double() - want).abs().max().item()
    assert error <= max(1e-5, 4 * TORCH_ERROR.get(tuple(want.shape), 0.0)), error


TORCH_ERROR: dict[tuple, float] = {}


def reference(a, b):
    """a @ b in float64, remembering the error of torch's fp32 product for :func:`close`."""
    want = a.double() @ b.double()
    TORCH_ERROR[tuple(want.shape)] = ((a.float() @ b.float()).double() - want).abs().max().item()
    return want


@pytest.mark.parametrize("R", [2, 3, 5, 12])
@pytest.mark.parametrize("K,N", [(1, 8), (3, 9), (7, 9), (64, 48), (37, 130), (512, 2048)])
def test_mm_equals_the_product(R, K, N):
    x, w = rand(R, K), rand(K, N, seed=1)
    close(plain.mm(x, w), reference(x, w))


@pytest.mark.parametrize("R", [2, 4, 7, 8])
@pytest.mark.parametrize("I,O", [(5, 9), (33, 64), (130, 37), (512, 2048)])
def test_mm_t_equals_the_product(R, I, O):
    g, w = rand(R, O), rand(I, O, seed=1)
    close(plain.mm_t(g, w), reference(g, w.T))


@pytest.mark.parametrize("n", [1, 3, 4, 5, 8])  # above 4 rows g is copied when its rows are 4 KiB-strided
@pytest.mark.parametrize("I,O", [(3, 9), (64, 64), (65, 200), (512, 1024), (20, 2048)])
def test_outer_equals_the_product(n, I, O):
    x, g = rand(n, I), rand(n, O, seed=1)
    out = torch.full((I, O), float("nan"))
    assert plain.outer(x, g, out) is out
    close(out, reference(x.T, g))


# plain.c's register tiles past a few rows (AVX-512 hosts; the AVX2 kernels take these rows elsewhere): tiles of
# 1-6 rows, 12-row tasks with a tail, one to four vectors of g's rows and more than 64 of them, column tails, sums
# longer than the 256 terms summed in registers at a time; mm_t as W g^T (11, 13, 32 rows) and over the transposed
# panel (20, 33, 65, 130: tiles.c's by_panel)
MANY_ROWS = [5, 6, 11, 13, 20, 32, 33, 65, 130]


@pytest.fixture
def every_row_count(monkeypatch):
    for name in ("mm", "mm_t", "outer"):
        monkeypatch.setitem(plain.ROWS, name, (1, 512))


def products_of_many_rows(kernel, R, shapes, rand, close, reference, dtype=torch.float32):
    """``kernel`` at R rows over each shape (mm: K, N; mm_t: I, O; outer: I, O) against ``reference``; also run by
    tests/test_plain_bf16.py."""
    for a, b in shapes:
        if kernel == "mm":
            x, w = rand(R, a), rand(a, b, seed=1)
            close(plain.mm(x, w), reference(x, w))
        elif kernel == "mm_t":
            g, w = rand(R, b), rand(a, b, seed=1)
            close(plain.mm_t(g, w), reference(g, w.T))
        else:
            x, g = rand(R, a), rand(R, b, seed=1)
            out = torch.full((a, b), float("nan"), dtype=dtype)
            assert plain.outer(x, g, out) is out
            close(out, reference(x.T, g))


def products_on_threads(x, w, g, threads, dtype=torch.float32):
    """mm, mm_t and outer on ``threads`` threads equal to the same on one (each kernel splits its outputs across
    OpenMP threads, torch's count: each output made by one thread, the same sums in the same order); returns the
    one-thread results. Also run by tests/test_plain_bf16.py."""
    before = torch.get_num_threads()
    results = []
    for t in (threads, 1):
        torch.set_num_threads(t)
        try:
            results.append([plain.mm(x, w), plain.mm_t(g, w),
                            plain.outer(x, g, torch.empty(x.shape[1], g.shape[1], dtype=dtype))])
        finally:
            torch.set_num_threads(before)
    for a, b in zip(*results):
        assert torch.equal(a, b)
    return results[1]


def many_rows_strided_and_on_threads(rand, close, reference, dtype=torch.float32):
    """Strided rows, an unaligned output, and the same values on 1 and 3 threads."""
    for rows in (32, 37):  # mm_t as W g^T, over the transposed panel
        strided_rows_and_an_unaligned_output(rand, close, reference, dtype, rows=rows)
        x, w, g = rand(rows, 200), rand(200, 150, seed=1), rand(rows, 150, seed=2)
        close(products_on_threads(x, w, g, 3, dtype)[1], reference(g, w.T))


@pytest.mark.parametrize("R", MANY_ROWS)
@pytest.mark.parametrize("kernel,shapes", [("mm", [(7, 9), (37, 130), (300, 64), (600, 80)]),
                                           ("mm_t", [(5, 9), (25, 130), (64, 300), (13, 600), (150, 70)]),
                                           ("outer", [(3, 9), (13, 130), (64, 80), (100, 600)])])
def test_products_of_many_rows(every_row_count, kernel, shapes, R):
    """The outer product's 80 columns: whole lines, the last panel partial."""
    products_of_many_rows(kernel, R, shapes, rand, close, reference)


def test_many_rows_strided_and_on_threads(every_row_count):
    many_rows_strided_and_on_threads(rand, close, reference)


def test_one_row(monkeypatch):
    """One row (taken on AVX-512 hosts, ``plain.ROWS``; held here on any host)."""
    monkeypatch.setitem(plain.ROWS, "mm", (1, 12))
    monkeypatch.setitem(plain.ROWS, "mm_t", (1, 8))
    x, w, g = rand(1, 37), rand(37, 130, seed=1), rand(1, 130, seed=2)
    close(plain.mm(x, w), reference(x, w))
    close(plain.mm_t(g, w), reference(g, w.T))


def strided_rows_and_an_unaligned_output(rand, close, reference, dtype=torch.float32, rows=6):
    """Row strides larger than the rows (slices of wider tensors), and an output one element off alignment (plain
    stores instead of non-temporal ones); also run by tests/test_plain_bf16.py."""
    x, w, g = rand(rows, 40)[:, 3:30], rand(50, 70, seed=1)[:27, 5:69], rand(rows, 90, seed=2)[:, 10:74]
    close(plain.mm(x, w), reference(x, w))
    w2 = rand(40, 100, seed=3)[:, 20:84]  # [40, 64], row stride 100
    close(plain.mm_t(g, w2), reference(g, w2.T))
    buf = torch.full((27 * 64 + 1,), float("nan"), dtype=dtype)
    out = buf[1:].view(27, 64)
    assert out.data_ptr() % 32 != 0
    plain.outer(x, g, out)
    close(out, reference(x.T, g))
    assert torch.isnan(buf[0])  # nothing written before the output


def test_strided_rows_and_an_unaligned_output():
    strided_rows_and_an_unaligned_output(rand, close, reference)


@pytest.mark.parametrize("threads", [1, 3])
def test_values_do_not_depend_on_the_threads(threads):
    """3 threads split 200 columns / rows unevenly."""
    x, w, g = rand(5, 200), rand(200, 200, seed=1), rand(5, 200, seed=2)
    close(products_on_threads(x, w, g, threads)[0], reference(x, w))


def test_outputs_given_are_written_in_place():
    x, w = rand(3, 16), rand(16, 24, seed=1)
    y = torch.empty(3, 24)
    assert plain.mm(x, w, out=y) is y
    z = torch.empty(3, 16)
    assert plain.mm_t(y, w, out=z) is z
    close(z, reference(y, w.T))


@pytest.mark.parametrize("case", ["too many rows", "too few rows", "bf16 without its kernels", "mixed dtypes",
                                  "columns strided", "shapes", "bad out", "nothing to sum"])
def test_what_the_kernels_leave_to_torch(case, monkeypatch):
    x, w, out = rand(4, 16), rand(16, 24, seed=1), None
    if case == "too many rows":
        x = rand(plain.ROWS["mm"][1] + 1, 16)
    elif case == "too few rows":  # one on AVX2 hosts (BLAS ahead there), none on AVX-512 hosts
        x = rand(plain.ROWS["mm"][0] - 1, 16)
    elif case == "bf16 without its kernels":  # tests/test_plain_bf16.py: where they build (AVX-512 BF16)
        x, w = x.bfloat16(), w.bfloat16()
        monkeypatch.setattr(plain, "bf16_available", lambda: False)
    elif case == "mixed dtypes":
        x = x.bfloat16()
    elif case == "columns strided":
        x = rand(16, 4).T
    elif case == "shapes":
        w = rand(15, 24)
    elif case == "bad out":
        out = torch.empty(4, 23)
    elif case == "nothing to sum":  # K = 0: torch gives zeros
        x, w = rand(4, 0), rand(0, 24)
        assert plain.mm_t(rand(4, 0), rand(24, 0)) is None  # the same for the input gradient's O = 0
    assert plain.mm(x, w, out=out) is None


def test_a_flop_counter_sees_torch_products_instead():
    from torch.utils.flop_counter import FlopCounterMode

    x, w = rand(4, 16), rand(16, 24, seed=1)
    with FlopCounterMode(display=False) as counter:
        assert plain.mm(x, w) is None and not plain.zero(torch.ones(8))
        banks.bank_linear(x, torch.stack([w, w]), [2, 2])
    assert counter.get_total_flops() == 2 * 4 * 16 * 24


def test_outer_refuses_more_rows_than_it_takes():
    n = plain.ROWS["outer"][1] + 1
    assert plain.outer(rand(n, 8), rand(n, 8), torch.empty(8, 8)) is None


@pytest.mark.parametrize("offset,size", [(0, 1), (1, 7), (3, 1000), (0, 4096), (5, 300_001)])
def test_zero_writes_zeros_there_and_nowhere_else(offset, size):
    buf = torch.arange(1.0, size + 20.0)
    assert plain.zero(buf[offset:offset + size])
    assert (buf[offset:offset + size] == 0).all()
    torch.testing.assert_close(buf[:offset], torch.arange(1.0, offset + 1.0))
    torch.testing.assert_close(buf[offset + size:], torch.arange(offset + size + 1.0, size + 20.0))


def test_zero_refuses_a_tensor_with_gaps_and_takes_a_column_major_one():
    t = torch.ones(4, 6)[:, :3]
    assert not plain.zero(t) and (t == 1).all()
    bank = torch.ones(5, 6, 7).transpose(1, 2).contiguous().transpose(1, 2)  # a bf16 bank's layout on the CPU
    assert plain.zero(bank[1:3]) and (bank[1:3] == 0).all() and (bank[0] == 1).all() and (bank[3:] == 1).all()


# experts 1-2 and 6 get no rows; the last has more rows than any kernel takes (13 on AVX2 hosts, 1025 on AVX-512)
COUNTS = [3, 0, 0, 5, 1, 8, 0, 2, max(hi for _, hi in plain.ROWS.values()) + 1]


def _bank_grads(x, bank, counts):
    xi, bi = x.clone().requires_grad_(), bank.clone().requires_grad_()
    y = banks.bank_linear(xi, bi, counts)
    (y * rand(*y.shape, seed=9)).sum().backward()  # a gradient with contiguous rows (a sum's would be expanded)
    return y.detach(), xi.grad, bi.grad, y.grad_fn


@pytest.fixture(params=[False, True], ids=["blas route", "onednn route"])
def host_route(monkeypatch, request):
    """The kernels serve both fp32 routes: products on torch's BLAS (an AVX2 host) or on oneDNN (AVX-512 hosts,
    ``dense.ONEDNN_FP32``), for the rows they take; the route has the rest."""
    monkeypatch.setattr(dense, "ONEDNN_FP32", request.param)
    return request.param


def counting_kernels(monkeypatch) -> dict[str, int]:
    """Counts the products llmarch's kernels serve (one call per expert, for a bank or one matrix) and the
    non-temporal zero fills; also used by tests/test_plain_bf16.py."""
    calls = {name: 0 for name in ("mm", "mm_t", "outer", "zero")}
    real_kernel, real_zero = plain._kernel, plain.zero

    def counting_kernel(name, dtype):
        fn, key = real_kernel(name, dtype), name.removesuffix("_round")  # bf16 mm / mm_t rounding their sums
        return None if fn is None else lambda *a: calls.__setitem__(key, calls[key] + 1) or fn(*a)

    def counting_zero(t):
        calls["zero"] += (served := real_zero(t))
        return served
    monkeypatch.setattr(plain, "_kernel", counting_kernel)
    monkeypatch.setattr(plain, "zero", counting_zero)
    return calls


def test_bank_training_through_the_kernels_equals_torch(monkeypatch, host_route):
    x, bank = rand(sum(COUNTS), 48), rand(len(COUNTS), 48, 72, seed=1) * 0.3
    calls = counting_kernels(monkeypatch)
    y1, gx1, gb1, node = _bank_grads(x, bank, COUNTS)
    assert type(node).__name__ == "_BankBackward"
    # 6 experts with rows: the last on the host's route, and the 1-row one's forward and input gradient where
    # the kernels start at 2 rows (AVX2 hosts); two runs of empty experts
    one = plain.ROWS["mm"][0] == 1 and plain.ROWS["mm_t"][0] == 1
    assert calls == {"mm": 4 + one, "mm_t": 4 + one, "outer": 5, "zero": 2}
    g = rand(*y1.shape, seed=9)

    def products(dtype):  # the forward, the input gradient and the weight gradient, each expert's in turn
        xs, gs, b = x.to(dtype).split(COUNTS), g.to(dtype).split(COUNTS), bank.to(dtype)
        return [torch.cat([xe @ b[e] for e, xe in enumerate(xs) if COUNTS[e]]),
                torch.cat([ge @ b[e].T for e, ge in enumerate(gs) if COUNTS[e]]),
                torch.stack([xe.T @ ge for xe, ge in zip(xs, gs)])]

    want = products(torch.float64)
    for ref, fp32 in zip(want, products(torch.float32)):  # torch's own fp32 error (the longest sum)
        TORCH_ERROR[tuple(ref.shape)] = (fp32.double() - ref).abs().max().item()
    for got, ref in zip((y1, gx1, gb1), want):
        close(got, ref)


def test_the_unused_experts_gradient_is_written_as_zeros(monkeypatch, host_route):
    """The gradient bank starts as garbage (NaN here): every expert without rows must be written."""
    x, bank = rand(sum(COUNTS), 16), rand(len(COUNTS), 16, 24, seed=1)
    real = torch.empty_like
    monkeypatch.setattr(torch, "empty_like", lambda t, **k: real(t, **k).fill_(float("nan")))
    _, _, gb, _ = _bank_grads(x, bank, COUNTS)
    assert not gb.isnan().any()
    assert all((gb[e] == 0).all() for e, c in enumerate(COUNTS) if not c)


@pytest.mark.parametrize("tokens", [1, 4, 16, 96])  # 96: ~24 rows per expert, the register tiles on AVX-512
def test_moe_training_on_the_kernels_equals_the_loop(monkeypatch, host_route, tokens):
    """``auto`` sends fp32 CPU training to ``sliced`` (the kernels) at every size; gradients equal ``loop``'s."""
    from llmarch import MoEConfig
    from llmarch.nn import dispatch
    from llmarch.nn.moe import MoE

    torch.manual_seed(0)
    layers = {name: MoE(32, 48, "silu", moe=MoEConfig(n_experts=8, top_k=2, dispatch=name))
              for name in ("auto", "loop")}
    layers["loop"].load_state_dict(layers["auto"].state_dict())
    x = rand(1, tokens, 32, seed=3)
    chosen = []
    real = dispatch.sliced_dispatch
    monkeypatch.setattr(dispatch, "sliced_dispatch", lambda *a: chosen.append(1) or real(*a))
    grads = {}
    for name, m in layers.items():
        xi = x.clone().requires_grad_()
        (m(xi) * rand(1, tokens, 32, seed=4)).sum().backward()
        grads[name] = [xi.grad] + [p.grad for p in m.parameters()]
    assert chosen
    for a, b in zip(grads["auto"], grads["loop"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("threads,tokens,skewed,want", [(2, 64, False, "padded"), (1, 64, False, "sliced"),
                                                        (2, 64, True, "sliced"), (2, 16, False, "sliced")])
def test_auto_pads_on_threads_when_padding_is_cheap(monkeypatch, host_route, threads, tokens, skewed, want):
    """fp32 CPU training on more than one thread takes ``padded`` once experts average 8 rows and the padded batch
    is at most 1.5x the assignments; on one thread, with 4 rows per expert, or with one expert taking most tokens,
    ``sliced``. Where oneDNN is the fp32 route, ``sliced`` always (padded measured slower there)."""
    from llmarch import MoEConfig
    from llmarch.nn import dispatch
    from llmarch.nn.moe import MoE

    torch.manual_seed(0)
    m = MoE(32, 48, "silu", moe=MoEConfig(n_experts=8, top_k=2))
    x = torch.zeros(1, tokens, 32)
    x[0, torch.arange(tokens), torch.arange(tokens) % 8] = 5.0  # token t points along dimension t % 8
    x += rand(1, tokens, 32, seed=3) * 0.01
    with torch.no_grad():  # token t goes to experts t % 8 and t % 8 + 1: tokens / 4 rows each, no padding
        w = torch.zeros(8, 32)
        w[torch.arange(8), torch.arange(8)] = 1.0
        w[torch.arange(8), (torch.arange(8) - 1) % 8] = 0.5
        if skewed:
            w[:2, :8] = 2.0  # experts 0 and 1 win every token: one expert's rows padded for all 8
        m.router.proj.weight.copy_(w)
    chosen = []
    for name in ("padded", "sliced"):
        real = getattr(dispatch, f"{name}_dispatch")
        monkeypatch.setattr(dispatch, f"{name}_dispatch", lambda *a, _n=name, _r=real: chosen.append(_n) or _r(*a))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        xi = x.clone().requires_grad_()
        m(xi).sum().backward()
    finally:
        torch.set_num_threads(before)
    assert chosen == ["sliced" if host_route else want]
