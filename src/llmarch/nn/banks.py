"""Expert-bank products: each expert's rows of a sorted batch times its matrix of a bank [E, in, out]
(``llmarch.nn.experts``), forward and backward: fp32 through llmarch's few-row kernels (:mod:`llmarch.native.plain`)
for the row counts they take, else the same oneDNN products as :mod:`llmarch.nn.dense` on hosts where oneDNN is
the fp32 route (``dense.ONEDNN_FP32``) and torch's BLAS elsewhere; bf16 through the bf16 few-row kernels on CPUs
with AVX-512 BF16, else oneDNN's bf16 products, and widened to fp32 on CPUs without bf16 products
(``llmarch.nn.widened``). An expert with no rows gets a zero gradient, written with non-temporal stores where the
kernels build."""
from __future__ import annotations

import torch

from llmarch.native import plain
from llmarch.nn import dense, widened


def _onednn(x: torch.Tensor) -> bool:
    """Whether an expert's product of these rows goes to oneDNN: bf16 (where the CPU has oneDNN's bf16 products,
    the caller checks), and fp32 where oneDNN is this host's fp32 route (``dense.ONEDNN_FP32``)."""
    return x.dtype != torch.float32 or dense.ONEDNN_FP32


def _few_rows(x: torch.Tensor) -> bool:
    """Whether an expert's products may go to :mod:`llmarch.native.plain` (which then takes them for its row
    counts): fp32, whichever the host's fp32 route. Measured against torch's BLAS on an AVX2 EPYC and against
    oneDNN on a Zen 5 EPYC (``benchmarks/train_rows.py``, at 2-8 rows: the forward 1.3-2.7x oneDNN's, the input
    gradient 1.0-1.75x, the weight gradient 1.6-2.6x). bf16 where the CPU has oneDNN's bf16 products (the bf16
    kernels need AVX-512 BF16; without bf16 products, bf16 takes the widened route)."""
    return x.dtype == torch.float32 or (x.dtype == torch.bfloat16 and dense.ONEDNN_BF16 and not widened.ROUTE)


def _plain_mm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor | None:
    """x @ w through :mod:`llmarch.native.plain` for w in either layout: its rows (``mm``) or its columns (``mm_t``
    over ``w.t()``: a column-major bf16 bank's), else None."""
    if w.stride(-1) == 1:
        return plain.mm(x, w)
    return plain.mm_t(x, w.t()) if w.stride(-2) == 1 else None


def _rows_mm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [n, k] @ w [k, m] for one expert: few rows through :mod:`llmarch.native.plain` over w in its own layout
    (:func:`_few_rows`, :func:`_plain_mm`); else oneDNN, but torch's BLAS for a single row (measured
    on an expert's 512 x 2048: 1 row 94 against 201 us; 4 rows 250 against 183 us) and for fp32 where oneDNN is not
    the route.
    bf16 without oneDNN's bf16 products: widened fp32 products (``widened.ROUTE``), but torch's kernel for fewer
    than ``widened.MIN_ROWS`` rows over a weight in nn.Linear's layout (``w.t()`` contiguous), the one it streams
    well."""
    if _few_rows(x) and (y := _plain_mm(x, w)) is not None:  # few rows, the bank's own layout
        return y
    if x.dtype == torch.bfloat16 and (widened.ROUTE or not dense.ONEDNN_BF16):
        few = x.shape[0] < widened.MIN_ROWS and w.t().is_contiguous()
        return widened.mm(x, w) if widened.ROUTE and not few else x @ w
    return x @ w if x.shape[0] == 1 or not _onednn(x) else dense._mm(x, w.t(), None)


def packed_mm(x: torch.Tensor, copy, matrix: torch.Tensor) -> torch.Tensor:
    """x [N, in] times an expert's packed matrix (from ``dense.packed_banks``) -> [N, out]; ``matrix`` is the same
    matrix [in, out] from the bank. A native blocked copy serves up to ``native_fp32.MAX_ROWS`` rows; more rows run
    over ``matrix`` (:func:`_rows_mm`), as a 2-D weight's prefill does."""
    if not isinstance(copy, dense.native_fp32.Blocked):
        return dense._mm(x, copy, None)
    y = dense.native_mm(x, copy)
    return _rows_mm(x, matrix) if y is None else y


def _bank_dtype(dtype: torch.dtype) -> bool:
    return dense.onednn_dtype(dtype) or (dtype == torch.bfloat16 and widened.ROUTE)


class _Bank(torch.autograd.Function):
    """y_e = x_e W_e for each expert's slice of rows, forward and both backward products through oneDNN where it is
    the host's fp32 route, else torch's BLAS (CPU training of an expert bank: fp32, and bf16 widened to fp32; see
    :func:`bank_linear`). The weight gradient is one new [E, in, out] tensor in the bank's layout, so
    AccumulateGrad keeps it without a copy; an expert with no rows gets zeros."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, bank: torch.Tensor, counts: list[int]) -> torch.Tensor:
        ctx.save_for_backward(x, bank)
        ctx.counts = counts
        return _bank_rows(x, bank, counts)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        x, bank = ctx.saved_tensors
        counts, pieces = ctx.counts, list(zip(x.split(ctx.counts), g.split(ctx.counts)))
        dx = dbank = None
        if ctx.needs_input_grad[0]:  # g_e @ W_e^T
            dx = _bank_rows(g, bank.transpose(1, 2), counts)
        if ctx.needs_input_grad[1]:
            dbank = torch.empty_like(bank)
            # few rows: llmarch's kernels (2-5x BLAS, 1.6-3.2x oneDNN), written into the bank's gradient
            done = plain.bank_outer(x, g, counts, dbank) if _few_rows(x) else None
            for e, (xe, ge) in enumerate(pieces):
                if not counts[e] or (done is not None and done[e]):
                    continue
                if xe.dtype == torch.bfloat16 and widened.ROUTE:  # [out, in] = g_e^T x_e
                    dbank[e].t().copy_(widened.mm(ge.t(), xe))  # contiguous there for a column-major bank
                elif xe.dtype == torch.bfloat16:  # oneDNN's bf16 product, written in place
                    if dbank[e].t().is_contiguous():
                        torch.mm(ge.t(), xe, out=dbank[e].t())
                    else:
                        dbank[e].copy_(xe.t() @ ge)
                elif counts[e] == 1 or not _onednn(xe):  # BLAS writes in place (outer product 107 against 276 us)
                    torch.mm(xe.t(), ge, out=dbank[e])
                else:
                    dbank[e].copy_(dense._mm(xe.t(), ge.t(), None))  # x_e^T g_e [in, out]
            _zero_unused(dbank, counts)
        return dx, dbank, None


def _bank_rows(a: torch.Tensor, mats: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """``cat(a_e @ mats[e])`` over the experts with rows (``mats``: a bank [E, k, n], or a bank transposed for the
    input gradient): few rows per expert through :func:`llmarch.native.plain.bank_mm`, all experts' products
    written into one output of a's dtype (bf16: each expert's fp32 sums rounded in its kernel call, while in cache;
    one pass over the batch's fp32 sums afterwards read them back from memory) with one Python check for the bank
    (a per-expert call cost ~10 us of checks, 48 of them per MoE layer's forward + backward); experts past its row
    limits, and banks it does not take, through :func:`_rows_mm`."""
    if _few_rows(a):
        out = torch.empty(a.shape[0], mats.shape[-1], dtype=a.dtype)
        done = plain.bank_mm(a, mats, counts, out)
        if done is not None:
            row0 = 0
            for e, R in enumerate(counts):
                if R and not done[e]:
                    out[row0:row0 + R].copy_(_rows_mm(a[row0:row0 + R], mats[e]))
                row0 += R
            return out
    return torch.cat([_rows_mm(ae, mats[e]) for e, ae in enumerate(a.split(counts)) if counts[e]])


def _zero_unused(dbank: torch.Tensor, counts: list[int]) -> None:
    """Zero the gradient of every expert that had no rows, each run of such experts at once (non-temporal stores
    where :func:`llmarch.native.plain.zero` serves: 2.6x ``zero_`` for an expert of 2-4 MB)."""
    e = 0
    while e < len(counts):
        if counts[e]:
            e += 1
            continue
        end = e
        while end < len(counts) and not counts[end]:
            end += 1
        run = dbank[e:end]
        if not plain.zero(run):
            run.zero_()
        e = end


def bf16_kernels(x: torch.Tensor) -> bool:
    """Whether bf16 rows train through llmarch's bf16 few-row kernels here (a CPU with oneDNN's bf16 products and
    AVX-512 BF16)."""
    return x.dtype == torch.bfloat16 and _few_rows(x) and plain.bf16_available()


def bank_linear(x: torch.Tensor, bank: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """x [A, in] sorted by expert (``counts[e]`` rows each, sum A > 0), bank [E, in, out] -> [A, out]: each expert's
    rows times its matrix (``cat(x_e @ bank[e])``). CPU inference (fp32, bf16) and fp32 CPU training go to oneDNN
    (fp32: where ``dense.ONEDNN_FP32``, else torch's BLAS), training through :class:`_Bank`; bf16 training there
    too where llmarch's bf16 few-row kernels build (AVX-512 BF16; without them it was level with
    ``torch._grouped_mm``, 0.9-1.07x, and is left to the ``grouped`` dispatcher); anything else
    multiplies ``unbind`` views of the bank with :func:`linear` (their backward stacks the expert gradients
    once). bf16 on CPUs without bf16 products (``widened.ROUTE``) runs like fp32, its products widened: through
    :class:`_Bank` for training, whose gradient comes in the bank's own (column-major) layout; the ``unbind`` form
    cost AccumulateGrad a transposing copy of the whole bank's gradient, 54 ms of a 60 ms step at one token."""
    fits, grad = dense._operands_fit(x, bank, None, _bank_dtype), dense._needs_grad(x, bank, None)
    if fits and grad and (x.dtype == torch.float32 or (x.dtype == torch.bfloat16 and widened.ROUTE)
                          or bf16_kernels(x)):
        return _Bank.apply(x, bank, counts)
    if fits and not grad:  # fp32 or bf16 inference over the bank itself (1.04-1.05x the per-expert calls, MoE layer)
        return _bank_rows(x, bank, counts)
    mats = bank.unbind(0)
    return torch.cat([dense.linear(xe, mats[e].t()) for e, xe in enumerate(x.split(counts)) if counts[e]])
