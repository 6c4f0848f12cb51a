"""``llmarch.native.plain``'s bf16 kernels (``plain_bf16.c``, AVX-512 BF16): products of few bf16 rows with a plain
bf16 weight against the float64 products of the same values, rounded to bf16 (odd sizes reaching every tail,
strided rows, unaligned outputs, several threads); and a bf16 expert bank's training through them
(``llmarch.nn.banks``, ``auto`` dispatch) against the loop dispatcher's torch products."""
from __future__ import annotations

import pytest
import torch

from llmarch import native
from llmarch.native import plain
from llmarch.nn import banks, dense, widened

from tests.test_plain import (counting_kernels, many_rows_strided_and_on_threads, products_of_many_rows,
                              products_on_threads, strided_rows_and_an_unaligned_output)

# skipped only where the kernels cannot be built (they need AVX-512 BF16); one that builds but fails its self-check
# fails these tests
pytestmark = pytest.mark.skipif(native.library("plain_bf16") is None,
                                reason="no CPU with AVX-512 BF16 or no C compiler: the bf16 kernels cannot be built")
BF16 = torch.bfloat16


def test_the_kernels_pass_their_self_check():
    assert plain.bf16_available()


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(BF16)


def close(got, want):
    """``want`` float64. fp32 sums of exact products, rounded once: nearly all bit-equal to ``want`` rounded to
    bf16, the rest one rounding apart (where the fp32 sum lands on the other side of a rounding boundary)."""
    assert got.dtype == BF16 and got.shape == want.shape
    assert (got == want.to(BF16)).float().mean() >= 0.99
    torch.testing.assert_close(got.double(), want, rtol=2 ** -7, atol=1e-4)


def product(a, b):
    return a.double() @ b.double()


@pytest.mark.parametrize("R", [1, 2, 3, 5, 8, 12])
@pytest.mark.parametrize("K,N", [(1, 8), (3, 9), (7, 17), (64, 48), (37, 130), (33, 1000), (512, 2048)])
def test_mm_equals_the_product(R, K, N):
    """Rows of W in fours (K % 4 rows read as zeros), 16 columns at a time (N % 16 masked)."""
    x, w = rand(R, K), rand(K, N, seed=1)
    close(plain.mm(x, w), product(x, w))


@pytest.mark.parametrize("R", [1, 2, 4, 5, 7, 12])
@pytest.mark.parametrize("I,O", [(5, 9), (33, 64), (130, 37), (6, 100), (2048, 512)])
def test_mm_t_equals_the_product(R, I, O):
    """Dot products over 32 values at a time (O % 32 masked), four rows of W (I % 4) against four of g (R % 4)."""
    g, w = rand(R, O), rand(I, O, seed=1)
    close(plain.mm_t(g, w), product(g, w.T))


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 12])  # an odd count pairs its last row with zeros
@pytest.mark.parametrize("I,O", [(3, 9), (64, 64), (65, 200), (7, 96), (512, 1024), (20, 2048)])
def test_outer_equals_the_product(n, I, O):
    """64 columns at a time; the last O % 64 by the scalar loop; non-temporal stores where O % 32 == 0."""
    x, g = rand(n, I), rand(n, O, seed=1)
    out = torch.full((I, O), float("nan"), dtype=BF16)
    assert plain.outer(x, g, out) is out
    close(out, product(x.T, g))


def test_strided_rows_and_an_unaligned_output():
    strided_rows_and_an_unaligned_output(rand, close, product, BF16)


# plain_bf16.c's register tiles past a few rows: tiles of 1-6 rows, 12-row tasks with a tail, one to four vectors
# of g's rows and more than 64 of them, odd counts of the shared index (a last pair with a zero), column tails,
# sums of more than the 128 pairs summed in registers at a time; mm_t as W g^T (11, 13, 17, 32 rows) and over the
# transposed panel (33, 65, 130)
MANY_ROWS = [8, 11, 13, 17, 32, 33, 65, 130]


@pytest.fixture
def every_row_count(monkeypatch):
    for name in ("mm", "mm_t", "outer"):
        monkeypatch.setitem(plain.ROWS_BF16, name, (1, 512))


@pytest.mark.parametrize("R", MANY_ROWS)
@pytest.mark.parametrize("kernel,shapes", [("mm", [(7, 9), (37, 130), (300, 64), (601, 80)]),
                                           ("mm_t", [(5, 9), (25, 131), (64, 300), (13, 601), (150, 71)]),
                                           ("outer", [(3, 9), (13, 130), (64, 96), (100, 600)])])
def test_products_of_many_rows(every_row_count, kernel, shapes, R):
    """The outer product's 96 columns: whole lines, the last panel partial."""
    products_of_many_rows(kernel, R, shapes, rand, close, product, BF16)


@pytest.mark.parametrize("R", [5, 32, 40])  # the few-row kernels, the register tiles (mm_t: W g^T, the panel)
def test_an_odd_count_pairs_its_last_value_with_zero_not_with_the_next_one(every_row_count, R):
    """A pair past the end of a row of odd length is never read: an infinity right after each row (the next
    column of a wider tensor) would make inf * 0 = NaN."""
    def with_inf_after(t):
        wide = torch.cat([t, torch.full((t.shape[0], 1), float("inf"), dtype=BF16)], dim=1)
        return wide[:, :-1]
    x, w = with_inf_after(rand(R, 37)), rand(37, 50, seed=1)
    close(plain.mm(x, w), product(x, w))
    g, w2 = rand(R, 37, seed=2), with_inf_after(rand(30, 37, seed=3))
    close(plain.mm_t(g, w2), product(g, w2.T))


def test_many_rows_strided_and_on_threads(every_row_count):
    many_rows_strided_and_on_threads(rand, close, product, BF16)


@pytest.mark.parametrize("threads", [1, 3])
def test_values_do_not_depend_on_the_threads(threads):
    """3 threads split 200 columns / rows unevenly."""
    x, w, g = rand(5, 200), rand(200, 200, seed=1), rand(5, 200, seed=2)
    close(products_on_threads(x, w, g, threads, BF16)[0], product(x, w))


def test_outputs_given_are_written_in_place_and_nan_propagates():
    x, w = rand(3, 16), rand(16, 24, seed=1)
    y = torch.empty(3, 24, dtype=BF16)
    assert plain.mm(x, w, out=y) is y
    z = torch.empty(3, 16, dtype=BF16)
    assert plain.mm_t(y, w, out=z) is z
    close(z, product(y, w.T))
    x[1, 2] = float("nan")
    assert plain.mm(x, w)[1].isnan().all() and not plain.mm(x, w)[[0, 2]].isnan().any()


@pytest.mark.parametrize("layout", ["rows", "columns"])  # the bank's mm and (column-major) mm_t
def test_a_bank_rounded_in_the_call_equals_torchs_rounding_of_its_sums(layout):
    """``bank_mm`` into a bf16 output rounds each expert's fp32 sums in its kernel call as torch rounds them: ties
    to even (both ways), overflow to infinity, NaN; and 80 x 1024 sums of two experts, rounded on two threads."""
    c = torch.arange(64, dtype=torch.float64)
    w = torch.stack([1 + c * 2 ** -7, torch.ones(64)])  # [2, 64]: column c sums to a[r, 0] (1 + c 2^-7) + a[r, 1]
    w[0, 7] = 0
    mats = torch.stack([w, w * 2.0 ** 100]).to(BF16)  # expert 1's sums overflow fp32 where a has 2^100
    # ties half way between bf16 neighbours, one rounding down, 2^100 (x 2^100: infinity), infinity (x 0: NaN)
    a = torch.tensor([[1.0, 2 ** -8], [1.0, 3 * 2 ** -8], [1.0, 2 ** -9], [2.0 ** 100, 0], [float("inf"), 0]])
    big, wide = rand(80, 256, seed=3), rand(2, 256, 1024, seed=4)
    for a, mats in ((a.to(BF16).repeat(2, 1), mats), (big, wide)):
        if layout == "columns":
            mats = mats.transpose(1, 2).contiguous().transpose(1, 2)
        counts = [a.shape[0] // 2, a.shape[0] - a.shape[0] // 2]
        sums, rounded = torch.empty(a.shape[0], mats.shape[2]), torch.empty(a.shape[0], mats.shape[2], dtype=BF16)
        before = torch.get_num_threads()
        torch.set_num_threads(2)
        try:
            assert plain.bank_mm(a, mats, counts, sums) == [True, True]
            assert plain.bank_mm(a, mats, counts, rounded) == [True, True]
        finally:
            torch.set_num_threads(before)
        torch.testing.assert_close(rounded, sums.to(BF16), rtol=0, atol=0, equal_nan=True)
        if a.shape[0] == 10:
            ties = torch.cat([rounded[:2, 8:], rounded[5:7, 8:]]).float() - torch.cat([sums[:2, 8:], sums[5:7, 8:]])
            assert (ties > 0).any() and (ties < 0).any() and (ties != 0).all()
            assert sums[8].isinf().any() and sums[4, 7].isnan() and rounded[4, 7].isnan()
    assert rounded.shape == (80, 1024) and sums.isfinite().all()


@pytest.mark.parametrize("case", ["too many rows", "mixed dtypes", "columns strided", "not built"])
def test_what_the_kernels_leave_to_torch(case, monkeypatch):
    x, w = rand(4, 16), rand(16, 24, seed=1)
    if case == "too many rows":
        x = rand(plain.ROWS_BF16["mm"][1] + 1, 16)
    elif case == "mixed dtypes":
        w = w.float()
    elif case == "columns strided":
        x = rand(16, 4).T
    elif case == "not built":
        monkeypatch.setattr(plain, "bf16_available", lambda: False)
    assert plain.mm(x, w) is None and plain.mm_t(x, w.T.contiguous()) is None


# experts 1-2 and 6 get no rows; 40 rows take the register tiles; the last more rows than any kernel takes
COUNTS = [3, 0, 0, 5, 1, 8, 0, 2, 40, max(hi for _, hi in plain.ROWS_BF16.values()) + 1]


@pytest.fixture
def bf16_route(monkeypatch):
    """A CPU with oneDNN's bf16 products (this one, the kernels being built): the bf16 kernels' route."""
    monkeypatch.setattr(dense, "ONEDNN_BF16", True)
    monkeypatch.setattr(widened, "ROUTE", False)


def test_bank_training_through_the_kernels_equals_the_torch_products(monkeypatch, bf16_route):
    """A column-major bf16 bank (its CPU layout): the forward on ``mm_t``, the input gradient on ``mm``, the weight
    gradient on ``outer`` written into the column-major gradient, the last expert on oneDNN; values as torch's
    bf16 products per expert."""
    x = rand(sum(COUNTS), 48)
    bank = rand(len(COUNTS), 72, 48, seed=1).transpose(1, 2)  # [E, 48, 72], each expert's [72, 48] rows contiguous
    calls = counting_kernels(monkeypatch)
    g = rand(sum(COUNTS), 72, seed=9)
    grads = []
    for fn in (banks.bank_linear, lambda x, b, c: torch.cat([xe @ b[e] for e, xe in enumerate(x.split(c)) if c[e]])):
        xi, bi = x.clone().requires_grad_(), bank.clone().requires_grad_()
        y = fn(xi, bi, COUNTS)
        (y.float() * g.float()).sum().backward()
        grads.append((y.detach(), xi.grad, bi.grad, y.grad_fn))
    (y1, gx1, gb1, node), (y0, gx0, gb0, _) = grads
    assert type(node).__name__ == "_BankBackward"
    assert calls == {"mm": 6, "mm_t": 6, "outer": 6, "zero": 2}  # the 6 experts with 1-40 rows; 2 runs of empty ones
    assert gb1.stride() == bank.stride()  # the bank's own layout: AccumulateGrad keeps it without a copy
    for got, want in ((y1, y0), (gx1, gx0), (gb1, gb0)):
        assert got.dtype == BF16 and (got == want).float().mean() >= 0.99
        torch.testing.assert_close(got, want, rtol=2 ** -7, atol=1e-3)
    assert all((gb1[e] == 0).all() for e, c in enumerate(COUNTS) if not c)


@pytest.mark.parametrize("tokens,want", [(1, "sliced"), (16, "sliced"), (256, "sliced"), (260, "grouped")])
def test_auto_trains_bf16_on_the_kernels_while_experts_have_few_rows(monkeypatch, bf16_route, tokens, want):
    """``sliced`` while experts average at most 64 rows (top-2 of 8: up to 256 tokens), else ``grouped``; the
    gradients equal the loop dispatcher's."""
    from llmarch import MoEConfig
    from llmarch.nn import dispatch
    from llmarch.nn.moe import MoE

    torch.manual_seed(0)
    layers = {name: MoE(32, 48, "silu", moe=MoEConfig(n_experts=8, top_k=2, dispatch=name)).to(BF16)
              for name in ("auto", "loop")}
    layers["loop"].load_state_dict(layers["auto"].state_dict())
    chosen = []
    for name in ("sliced", "grouped"):
        real = getattr(dispatch, f"{name}_dispatch")
        monkeypatch.setattr(dispatch, f"{name}_dispatch", lambda *a, _n=name, _r=real: chosen.append(_n) or _r(*a))
    x, g = rand(1, tokens, 32, seed=3), rand(1, tokens, 32, seed=4)
    grads = {}
    for name, m in layers.items():
        xi = x.clone().requires_grad_()
        (m(xi).float() * g.float()).sum().backward()
        grads[name] = [xi.grad] + [p.grad for p in m.parameters()]
    assert chosen == [want]
    for a, b in zip(grads["auto"], grads["loop"]):
        torch.testing.assert_close(a.float(), b.float(), rtol=2 ** -6, atol=2e-3)


def test_the_widened_route_keeps_its_fp32_products(monkeypatch):
    """A CPU without bf16 products (emulated here) widens bf16 to fp32 products (``llmarch.nn.widened``): the bf16
    kernels are not its route, whatever this CPU builds."""
    monkeypatch.setattr(dense, "ONEDNN_BF16", False)
    monkeypatch.setattr(widened, "ROUTE", True)
    served = []
    for name in ("mm", "mm_t", "outer"):
        real = getattr(plain, name)
        monkeypatch.setattr(plain, name, lambda *a, _r=real, **k: served.append(a[0].dtype) or _r(*a, **k))
    x, bank = rand(sum(COUNTS), 48).requires_grad_(), rand(len(COUNTS), 72, 48, seed=1).transpose(1, 2)
    bank.requires_grad_()
    banks.bank_linear(x, bank, COUNTS).float().sum().backward()
    assert BF16 not in served and x.grad is not None and bank.grad is not None
