"""The gated delta rule (Yang, Kautz & Hatamizadeh 2024, "Gated Delta Networks") in three forms that compute the
same thing: the quadratic ``parallel`` form (the readable spec), the ``chunked`` form (training and prefill, linear
in length) and the ``recurrent`` form (decoding: O(1) work and state per token).

Per head, with a state S [Dk, Dv], decay g_t <= 0 (log space) and write strength beta_t in (0, 1):

    S_t = exp(g_t) S_{t-1} + k_t u_tᵀ,   u_t = beta_t (v_t - exp(g_t) S_{t-1}ᵀ k_t),   o_t = S_tᵀ q_t

(u_t is the delta: the part of v_t the decayed state does not already predict). Unrolled, with G = cumsum(g) and
Γ(t, j) = exp(G_t - G_j): u = (I + A)⁻¹ (beta v - beta exp(G) K S_0) with A[t, j] = beta_t Γ(t, j) k_t·k_j (j < t),
and o_t = exp(G_t) S_0ᵀ q_t + Σ_{j<=t} Γ(t, j) (q_t·k_j) u_j — the "WY / UT transform" the two matrix forms use.

Shapes (one row of heads): q, k [B, H, T, Dk]; v [B, H, T, Dv]; g, beta [B, H, T]; state [B, H, Dk, Dv].
q and k arrive already L2-normalised (and q scaled); everything runs in fp32. Each form returns (o [B, H, T, Dv],
the final state [B, H, Dk, Dv]).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def _zero_state(k: Tensor, v: Tensor, state: Tensor | None) -> Tensor:
    if state is not None:
        return state.float()
    B, H, Dk = k.shape[0], k.shape[1], k.shape[-1]
    return k.new_zeros(B, H, Dk, v.shape[-1], dtype=torch.float32)


def _block(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The within-block quantities of a block of C steps (leading dims [..., C, *]): u0 and w with
    u = u0 - w @ S_0, the causal score matrix qk ⊙ Γ [.., C, C] and the cumulative log decay G [.., C]."""
    C = k.shape[-2]
    G = g.cumsum(-1)  # [.., C]
    future = torch.ones(C, C, dtype=torch.bool, device=k.device).triu(1)
    gamma = (G[..., :, None] - G[..., None, :]).masked_fill(future, float("-inf")).exp()  # Γ(t, j), 0 for j > t
    kb = k * beta[..., None]
    A = ((kb @ k.transpose(-1, -2)) * gamma).tril(-1)  # [.., C, C] strictly lower
    eye = torch.eye(C, dtype=k.dtype, device=k.device)
    rhs = torch.cat([v * beta[..., None], kb * G.exp()[..., None]], dim=-1)  # [.., C, Dv + Dk]
    sol = torch.linalg.solve_triangular(eye + A, rhs, upper=False, unitriangular=True)
    u0, w = sol.split([v.shape[-1], k.shape[-1]], dim=-1)
    return u0, w, (q @ k.transpose(-1, -2)) * gamma, G


def parallel(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor,
             state: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The whole sequence at once: one T x T triangular system (O(T² d) work, O(T²) memory)."""
    S0 = _zero_state(k, v, state)
    u0, w, scores, G = _block(q, k, v, g, beta)
    u = u0 - w @ S0  # [B, H, T, Dv]
    o = (q * G.exp()[..., None]) @ S0 + scores @ u
    G_T = G[..., -1:]  # [B, H, 1]
    S = S0 * G_T.exp()[..., None] + (k * (G_T - G).exp()[..., None]).transpose(-1, -2) @ u
    return o, S


def chunked(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, state: Tensor | None = None,
            chunk_size: int = 64) -> tuple[Tensor, Tensor]:
    """Blocks of ``chunk_size`` steps solved like :func:`parallel`, the state carried from block to block:
    O(T·C·d + T·d²) work, so linear in T. The tail block is zero-padded (g = beta = 0 there changes nothing)."""
    B, H, T, Dk = k.shape
    Dv, C = v.shape[-1], chunk_size
    pad = (-T) % C
    if pad:
        q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
        g, beta = (F.pad(x, (0, pad)) for x in (g, beta))
    n = (T + pad) // C
    q, k, v = (x.reshape(B, H, n, C, x.shape[-1]) for x in (q, k, v))
    g, beta = (x.reshape(B, H, n, C) for x in (g, beta))
    u0, w, scores, G = _block(q, k, v, g, beta)  # all chunks at once: [B, H, n, C, *]
    q_in = q * G.exp()[..., None]  # reads the state left by the previous chunks
    k_out = k * (G[..., -1:] - G).exp()[..., None]  # writes into the state handed to the next chunk
    chunk_decay = G[..., -1].exp()[..., None, None]  # [B, H, n, 1, 1]
    S = _zero_state(q, v, state)
    out = []
    for i in range(n):
        u = u0[:, :, i] - w[:, :, i] @ S  # [B, H, C, Dv]
        out.append(q_in[:, :, i] @ S + scores[:, :, i] @ u)
        S = S * chunk_decay[:, :, i] + k_out[:, :, i].transpose(-1, -2) @ u
    o = torch.stack(out, dim=2).reshape(B, H, n * C, Dv)[:, :, :T]
    return o, S


def recurrent(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor,
              state: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """One step at a time (the definition): O(Dk·Dv) work and memory per token and head."""
    S = _zero_state(k, v, state)
    out = []
    for t in range(k.shape[2]):
        S = S * g[:, :, t].exp()[..., None, None]
        u = beta[:, :, t, None] * (v[:, :, t] - (S * k[:, :, t, :, None]).sum(-2))  # [B, H, Dv]
        S = S + k[:, :, t, :, None] * u[..., None, :]
        out.append((S * q[:, :, t, :, None]).sum(-2))
    return torch.stack(out, dim=2), S


FORMS = {"parallel": parallel, "chunked": chunked, "recurrent": recurrent}
