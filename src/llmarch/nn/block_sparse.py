"""Block-sparse execution of a sparse attention pattern: time and memory grow with the keys a pattern allows, not
with T x S.

A pattern's :class:`BlockPlan` names, for each query block of ``block`` slots, a superset of the keys it may
attend, in up to four parts that partition the allowed keys:

- ``table`` [nq, K]: key blocks gathered per query block (a band of neighbours, BigBird's random and global
  blocks). Memory O(T * K * block).
- shared keys: slots every query may see (Longformer's global tokens, the fixed pattern's summary columns):
  ``shared`` positions plus, with ``shared_global``, the batch's ``global_attention_mask``.
- ``stride`` l: the Sparse Transformer's strided columns (i - j divisible by l), run on the l residue classes.
- dense rows: queries that see every key (global tokens): ``rows`` plus, with ``rows_global``, the batch's
  global tokens. Memory O(R * T).

Inside each part the exact element rule ``pattern.allows`` (with causality, padding and "not already counted by
an earlier part") is applied, so the result equals the dense masked reference; tests hold it to that, outputs
and gradients. The parts' softmaxes are merged through their log-sum-exp. Softmax runs in fp32.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

NEG_INF = float("-inf")
CHUNK_SCORES = 1 << 22  # score elements held at once per chunk of query blocks (16 MiB in fp32)


@dataclass
class BlockPlan:
    table: torch.Tensor  # [nq, K] long, key block ids per query block, -1 = none
    shared: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))  # [Kg] slots
    shared_global: bool = False
    rows: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))  # [R] slots
    rows_global: bool = False
    stride: int | None = None

    @staticmethod
    def band_table(length: int, block: int, reach: int) -> torch.Tensor:
        """Key blocks holding slots within ``reach`` of any query of the block. [nq, K]"""
        nq = math.ceil(length / block)
        offsets = torch.arange(-math.ceil(reach / block), (block - 1 + reach) // block + 1)
        table = torch.arange(nq)[:, None] + offsets[None, :]
        return torch.where((table >= 0) & (table < nq), table, -1)

    @classmethod
    def band(cls, length: int, block: int, reach: int, **parts) -> "BlockPlan":
        return cls(cls.band_table(length, block, reach), **parts)


def _pad_slots(x: torch.Tensor, n: int, dim: int = 2) -> torch.Tensor:
    """Zero-pad dim ``dim`` of x to n slots."""
    extra = n - x.shape[dim]
    if extra == 0:
        return x
    shape = list(x.shape)
    shape[dim] = extra
    return torch.cat([x, x.new_zeros(shape)], dim=dim)


def _flag_list(flags: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean [B, N] -> the flagged slots [B, R] (padded with N) and their validity [B, R]."""
    counts = flags.sum(-1)
    R = int(counts.max()) if flags.numel() else 0
    order = torch.sort((~flags).to(torch.int8), dim=-1, stable=True).indices[:, :R]
    ok = torch.arange(R, device=flags.device)[None, :] < counts[:, None]
    return torch.where(ok, order, flags.shape[-1]), ok


def _softmax(scores: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked softmax over the last dim in fp32, and its log-sum-exp (-inf, probabilities 0, where nothing is
    visible)."""
    scores = scores.float().masked_fill_(~mask, NEG_INF)
    mx = scores.amax(-1, keepdim=True)
    mx = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx))
    p = torch.exp(scores - mx)
    total = p.sum(-1, keepdim=True)
    seen = total > 0
    total = torch.where(seen, total, torch.ones_like(total))
    lse = torch.where(seen, mx + total.log(), torch.full_like(total, NEG_INF))
    return p / total, lse.squeeze(-1)


def _merge(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor]):
    """Combine two partial attentions (out [..., T, Dv], lse [..., T]) over disjoint key sets."""
    (out_a, lse_a), (out_b, lse_b) = a, b
    mx = torch.maximum(lse_a, lse_b)
    mx = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx))
    wa, wb = torch.exp(lse_a - mx), torch.exp(lse_b - mx)
    total = wa + wb
    seen = total > 0
    total = torch.where(seen, total, torch.ones_like(total))
    out = (out_a * wa[..., None] + out_b * wb[..., None]) / total[..., None]
    return out, torch.where(seen, mx + total.log(), torch.full_like(total, NEG_INF))


class _Slots:
    """What every part needs: the rule and the per-slot flags, padded to Np slots."""

    def __init__(self, pattern, T: int, Np: int, causal: bool, key_padding, global_mask, device):
        self.pattern, self.T, self.causal = pattern, T, causal
        real = torch.arange(Np, device=device) < T
        self.key_ok = real[None] if key_padding is None else _pad_slots(key_padding.bool(), Np, 1) & real  # [B|1,Np]
        self.glob = None if global_mask is None else _pad_slots(global_mask.bool(), Np, 1)  # [B, Np]

    def rule(self, qpos: torch.Tensor, kpos: torch.Tensor, batch_q: bool = False) -> torch.Tensor:
        """Element mask for query slots qpos and key slots kpos (broadcastable; a leading batch dim allowed)."""
        gq = gk = None
        if self.glob is not None and self.pattern.uses_global_mask:
            gq, gk = _take(self.glob, qpos, batch_q), _take(self.glob, kpos, batch_q)
        m = self.pattern.allows(qpos, kpos, self.T, gq, gk)
        ok = _take(self.key_ok, kpos, batch_q)
        m = ok if m is None else m & ok
        return m & (kpos <= qpos) if self.causal else m


def _take(flags: torch.Tensor, pos: torch.Tensor, batched: bool) -> torch.Tensor:
    """flags [B, N] at slots ``pos`` -> [B, *pos.shape] (pos may already carry the batch dim when ``batched``)."""
    if batched:
        B = max(flags.shape[0], pos.shape[0])
        flat = pos.expand(B, *pos.shape[1:]).reshape(B, -1)
        return flags.expand(B, -1).gather(1, flat).view(B, *pos.shape[1:])
    return flags[:, pos]


def block_sparse_attention(q, k, v, pattern, plan: BlockPlan, *, block: int, scale: float, causal: bool,
                           key_padding=None, global_mask=None) -> torch.Tensor:
    """Self-attention over slots [0, T) with the pattern's plan. q [B, H, T, Dh], k [B, G, T, Dh],
    v [B, G, T, Dv], key_padding / global_mask [B, T] bool -> [B, H, T, Dv]."""
    B, H, T, Dh = q.shape
    G, Dv = k.shape[1], v.shape[-1]
    r, b = H // G, block
    nq = math.ceil(T / b)
    Np = nq * b
    dev = q.device
    slots = _Slots(pattern, T, Np, causal, key_padding, global_mask, dev)
    qf = _pad_slots(q.float() * scale, Np).view(B, G, r, nq, b, Dh)
    kf, vf = _pad_slots(k.float(), Np), _pad_slots(v.float(), Np)  # [B, G, Np, *]
    qpos = torch.arange(Np, device=dev).view(nq, b)

    table = plan.table.to(dev)
    if causal:  # key blocks after the query block are never visible
        table = torch.where(table > torch.arange(nq, device=dev)[:, None], -1, table)
    table = torch.sort(table, dim=-1, descending=True).values
    table = table[:, : int((table >= 0).sum(-1).max())]  # drop columns that are empty in every row
    K = table.shape[1]

    shared_flag = torch.zeros(1, Np, dtype=torch.bool, device=dev)
    shared_flag[:, plan.shared[plan.shared < T].to(dev)] = True
    if plan.shared_global and slots.glob is not None:
        shared_flag = shared_flag | slots.glob
    shared = None
    shared_pos, shared_ok = _flag_list(shared_flag)  # [B|1, Kg]
    if shared_pos.shape[1]:
        idx = shared_pos.clamp(max=Np - 1)
        shared = (idx, shared_ok, kf.gather(2, idx[:, None, :, None].expand(B, G, -1, Dh)),
                  vf.gather(2, idx[:, None, :, None].expand(B, G, -1, Dv)))  # k/v [B, G, Kg, *]
    qn = qf.permute(0, 1, 3, 2, 4, 5).reshape(B, G, nq, r * b, Dh)  # query blocks as matmul batches
    step = max(1, CHUNK_SCORES // (H * b * (K * b + shared_pos.shape[1])))  # bounds the live score memory
    parts = [_table_part(qn[:, :, s0:s0 + step], kf, vf, table[s0:s0 + step], qpos[s0:s0 + step], slots,
                         shared_flag, shared, b, r) for s0 in range(0, nq, step)]
    out = torch.cat([o for o, _ in parts], dim=2).permute(0, 1, 3, 2, 4, 5).reshape(B, G, r, Np, Dv)
    lse = torch.cat([m for _, m in parts], dim=2).permute(0, 1, 3, 2, 4).reshape(B, G, r, Np)
    result = (out, lse)

    if plan.stride is not None:
        covered = torch.zeros(nq, nq + 1, dtype=torch.bool, device=dev)
        covered.scatter_(1, torch.where(table >= 0, table, nq), True)
        strided = _strided_part(qf.view(B, G, r, Np, Dh), kf, vf, plan.stride, slots, covered[:, :nq], b,
                                shared_flag)
        result = _merge(result, strided)
    out = result[0]
    rows_flag = torch.zeros(1, Np, dtype=torch.bool, device=dev)
    rows_flag[:, plan.rows[plan.rows < T].to(dev)] = True
    if plan.rows_global and slots.glob is not None:
        rows_flag = rows_flag | slots.glob
    if bool(rows_flag.any()):
        out = _dense_rows(out, qf.view(B, G, r, Np, Dh), kf, vf, rows_flag, slots)
    return out.reshape(B, H, Np, Dv)[:, :, :T].to(q.dtype)


def _table_part(qn, kf, vf, table, qpos, slots: _Slots, shared_flag, shared, b: int, r: int):
    """Query blocks qn [B, G, n, r*b, Dh] against their gathered key blocks ``table`` [n, K] and the shared keys
    -> (out [B, G, n, r, b, Dv], lse [B, G, n, r, b])."""
    B, G, n, _, Dh = qn.shape
    Dv, nk, K = vf.shape[-1], kf.shape[2] // b, table.shape[1]
    safe = table.clamp(min=0)
    ks = kf.view(B, G, nk, b, Dh)[:, :, safe].reshape(B, G, n, K * b, Dh)
    vs = vf.view(B, G, nk, b, Dv)[:, :, safe].reshape(B, G, n, K * b, Dv)
    kpos = (safe[..., None] * b + torch.arange(b, device=qn.device)).view(n, K * b)  # [n, Kb]
    mask = slots.rule(qpos[:, :, None], kpos[:, None, :]) & (table >= 0).repeat_interleave(b, dim=-1)[:, None, :]
    mask = mask & ~shared_flag[:, kpos][:, :, None, :]  # [B|1, n, b, Kb]
    scores = qn @ ks.transpose(-1, -2)  # [B, G, n, r*b, Kb]
    if shared is not None:
        idx, ok, k_sh, v_sh = shared
        scores = torch.cat([scores, qn @ k_sh.transpose(-1, -2)[:, :, None]], dim=-1)
        sh_mask = slots.rule(qpos[None, :, :, None], idx[:, None, None, :], batch_q=True) & ok[:, None, None, :]
        Bm = max(mask.shape[0], sh_mask.shape[0])
        mask = torch.cat([mask.expand(Bm, -1, -1, -1), sh_mask.expand(Bm, -1, -1, -1)], dim=-1)
    probs, lse = _softmax(scores.view(B, G, n, r, b, -1), mask[:, None, :, None])
    probs = probs.view(B, G, n, r * b, -1)
    out = probs[..., : K * b] @ vs
    if shared is not None:
        out = out + probs[..., K * b:] @ shared[3][:, :, None]
    return out.view(B, G, n, r, b, Dv), lse


def _strided_part(qf, kf, vf, stride: int, slots: _Slots, covered, b: int, shared_flag):
    """Keys j with (i - j) % l == 0 not already gathered: the l residue classes, each a small dense problem.
    qf [B, G, r, Np, Dh], kf/vf [B, G, Np, *] -> (out [B, G, r, Np, Dv], lse [B, G, r, Np])."""
    B, G, r, Np, Dh = qf.shape
    Dv, l = vf.shape[-1], stride
    m = math.ceil(Np / l)
    Nl = m * l
    q2 = _pad_slots(qf, Nl, 3).view(B, G, r, m, l, Dh).transpose(3, 4)  # [B, G, r, l, m, Dh]
    k2 = _pad_slots(kf, Nl).view(B, G, m, l, Dh).transpose(2, 3)  # [B, G, l, m, Dh]
    v2 = _pad_slots(vf, Nl).view(B, G, m, l, Dv).transpose(2, 3)
    pos = torch.arange(Nl, device=qf.device).view(m, l).t()  # [l, m]: slot of (residue, group)
    qpos, kpos = pos[:, :, None], pos[:, None, :]  # [l, m, 1], [l, 1, m]
    nq = covered.shape[0]
    mask = slots.rule(qpos.clamp(max=Np - 1), kpos.clamp(max=Np - 1)) & (qpos < Np) & (kpos < Np)
    mask = mask & ~covered[(qpos // b).clamp(max=nq - 1), (kpos // b).clamp(max=nq - 1)]
    mask = mask & ~_pad_slots(shared_flag, Nl, 1)[:, kpos]
    probs, lse = _softmax(torch.einsum("bgrlqd,bglkd->bgrlqk", q2, k2), mask[:, None, None])
    out = torch.einsum("bgrlqk,bglkd->bgrlqd", probs, v2)  # [B, G, r, l, m, Dv]
    out = out.transpose(3, 4).reshape(B, G, r, Nl, Dv)[:, :, :, :Np]
    return out, lse.transpose(3, 4).reshape(B, G, r, Nl)[..., :Np]


def _dense_rows(out, qf, kf, vf, rows_flag, slots: _Slots):
    """Recompute the flagged query rows against every key and put them in place. out [B, G, r, Np, Dv]."""
    B, G, r, Np, Dh = qf.shape
    Dv = vf.shape[-1]
    rows, ok = _flag_list(rows_flag.expand(B, -1))  # [B, R]
    idx = rows.clamp(max=Np - 1)
    qr = qf.gather(3, idx[:, None, None, :, None].expand(B, G, r, -1, Dh))  # [B, G, r, R, Dh]
    kpos = torch.arange(Np, device=qf.device)
    mask = slots.rule(idx[:, :, None], kpos[None, None, :], batch_q=True) & ok[:, :, None]  # [B, R, Np]
    probs, _ = _softmax(torch.einsum("bgrqd,bgkd->bgrqk", qr, kf), mask[:, None, None])
    rows_out = torch.einsum("bgrqk,bgkd->bgrqd", probs, vf)  # [B, G, r, R, Dv]
    placed = out.new_zeros(B, G, r, Np + 1, Dv).scatter(3, rows[:, None, None, :, None].expand(B, G, r, -1, Dv),
                                                        rows_out)[:, :, :, :Np]
    return torch.where(rows_flag.expand(B, -1)[:, None, None, :, None], placed, out)
