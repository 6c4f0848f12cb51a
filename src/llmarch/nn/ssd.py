"""The state-space duality scan (Dao & Gu 2024, "Transformers are SSMs", SSD) in its three forms, held equal by
tests: ``parallel`` (the quadratic "attention" form, the readable spec), ``chunked`` (quadratic inside blocks of
Q tokens, a recurrence between blocks: linear in length) and ``recurrent`` (one step per token, O(1) work and
state per token). Linear attention is the same scan with no decay (A = 0, dt = 1), so both mixers share it.

The recurrence, per head h, with a_t = dt_t · A_h (A_h < 0: a decay) and state S [Dh, N]:
    S_t = exp(a_t) S_{t-1} + dt_t · x_t B_tᵀ        y_t = S_t C_t
which unrolls to y_t = Σ_{s≤t} exp(a_{s+1} + … + a_t) (C_t · B_s) dt_s x_s (+ the decayed initial state).

Shapes: x [B, T, H, Dh], dt [B, T, H] (a zero dt skips a token: padding), A [H], Bs and Cs [B, T, H, N], state
[B, H, Dh, N]. Every form returns (y [B, T, H, Dh], final state) and computes in fp32.
"""
from __future__ import annotations

from typing import Callable

import torch

Tensor = torch.Tensor


def segsum(a: Tensor) -> Tensor:
    """a [..., T] -> [..., T, T] with out[i, j] = a_{j+1} + … + a_i for j <= i and -inf above the diagonal.
    Summed by a masked cumulative sum rather than cumsum differences, which keeps precision on long spans."""
    T = a.shape[-1]
    ones = torch.ones(T, T, dtype=torch.bool, device=a.device)
    x = a[..., :, None].expand(*a.shape, T).masked_fill(~ones.tril(-1), 0.0)  # x[..., k, j] = a_k for k > j
    return x.cumsum(dim=-2).masked_fill(~ones.tril(), float("-inf"))


def _prepare(x, dt, A, Bs, Cs, state):
    """Heads-first fp32 views (fp64 stays fp64): x·dt [B, H, T, Dh], Bs and Cs [B, H, T, N], a = dt·A
    [B, H, T], and the initial state (zeros when none is given)."""
    f = torch.promote_types(x.dtype, torch.float32)
    x, dt, Bs, Cs = x.to(f), dt.to(f), Bs.to(f), Cs.to(f)
    a = (dt * A.to(f)).transpose(1, 2)  # [B, H, T]
    xdt = (x * dt[..., None]).transpose(1, 2)  # [B, H, T, Dh]
    if state is None:
        state = x.new_zeros(x.shape[0], x.shape[2], x.shape[3], Bs.shape[-1])
    return xdt, a, Bs.transpose(1, 2), Cs.transpose(1, 2), state.to(f)


def ssd_parallel(x: Tensor, dt: Tensor, A: Tensor, Bs: Tensor, Cs: Tensor,
                 state: Tensor | None = None, chunk_size: int = 0) -> tuple[Tensor, Tensor]:
    """The quadratic form: y = (L ∘ C Bᵀ) (dt · x) with L[t, s] = exp(a_{s+1} + … + a_t) for s <= t, plus the
    initial state read out through C and decayed to each step. O(T²) time and memory."""
    xdt, a, Bs, Cs, state = _prepare(x, dt, A, Bs, Cs, state)
    cum = a.cumsum(-1)  # [B, H, T]
    scores = (Cs @ Bs.transpose(-1, -2)) * torch.exp(segsum(a))  # [B, H, T, S]
    y = scores @ xdt + (Cs @ state.transpose(-1, -2)) * cum.exp()[..., None]  # [B, H, T, Dh]
    to_end = torch.exp(cum[..., -1:] - cum)  # [B, H, T]: decay from each step to the last
    final = state * cum[..., -1].exp()[..., None, None] + xdt.transpose(-1, -2) @ (Bs * to_end[..., None])
    return y.transpose(1, 2), final


def ssd_chunked(x: Tensor, dt: Tensor, A: Tensor, Bs: Tensor, Cs: Tensor,
                state: Tensor | None = None, chunk_size: int = 256) -> tuple[Tensor, Tensor]:
    """Blocks of Q = ``chunk_size`` tokens: the quadratic form inside each block, each block's contribution to
    the state, one recurrence over blocks, then each block's start state read out. O(T·Q) time, O(T/Q) states."""
    xdt, a, Bs, Cs, state = _prepare(x, dt, A, Bs, Cs, state)
    Bsz, H, T, Dh = xdt.shape
    Q = min(chunk_size, T)
    pad = (-T) % Q  # zero dt·x, B, C: padded steps neither decay nor add to the state
    if pad:
        xdt, Bs, Cs = (torch.nn.functional.pad(t, (0, 0, 0, pad)) for t in (xdt, Bs, Cs))
        a = torch.nn.functional.pad(a, (0, pad))
    n = (T + pad) // Q
    xdt, Bc, Cc = (t.reshape(Bsz, H, n, Q, t.shape[-1]) for t in (xdt, Bs, Cs))  # [B, H, n, Q, *]
    a = a.reshape(Bsz, H, n, Q)
    cum = a.cumsum(-1)  # [B, H, n, Q]
    # 1. inside each block: the parallel form
    scores = (Cc @ Bc.transpose(-1, -2)).mul_(torch.exp(segsum(a)))  # [B, H, n, Q, Q]
    y = scores @ xdt  # [B, H, n, Q, Dh]
    # 2. what each block adds to the state by its end, as [N, Dh]
    to_end = torch.exp(cum[..., -1:] - cum)  # [B, H, n, Q]
    added = (Bc * to_end[..., None]).transpose(-1, -2) @ xdt  # [B, H, n, N, Dh]
    # 3. the recurrence over blocks: the state entering each block
    block_decay = cum[..., -1].exp()  # [B, H, n]
    st = state.transpose(-1, -2)  # [B, H, N, Dh]
    starts = []
    for c in range(n):
        starts.append(st)
        st = st * block_decay[:, :, c, None, None] + added[:, :, c]
    start = torch.stack(starts, dim=2)  # [B, H, n, N, Dh]
    # 4. each block's start state read out through C, decayed to each step
    y = y + (Cc @ start) * cum.exp()[..., None]
    return y.reshape(Bsz, H, n * Q, Dh)[:, :, :T].transpose(1, 2), st.transpose(-1, -2)


def ssd_recurrent(x: Tensor, dt: Tensor, A: Tensor, Bs: Tensor, Cs: Tensor,
                  state: Tensor | None = None, chunk_size: int = 0) -> tuple[Tensor, Tensor]:
    """One step per token: S = exp(a_t) S + dt_t x_t B_tᵀ, y_t = S C_t. O(1) work and memory per token."""
    xdt, a, Bs, Cs, state = _prepare(x, dt, A, Bs, Cs, state)
    ys = []
    for t in range(xdt.shape[2]):
        state = state * a[:, :, t, None, None].exp() + xdt[:, :, t, :, None] * Bs[:, :, t, None, :]
        ys.append(state @ Cs[:, :, t, :, None])  # [B, H, Dh, 1]
    return torch.cat(ys, dim=-1).permute(0, 3, 1, 2), state


SSD_FORMS: dict[str, Callable[..., tuple[Tensor, Tensor]]] = {
    "parallel": ssd_parallel, "chunked": ssd_chunked, "recurrent": ssd_recurrent}
