"""Activations a training step keeps for the backward, per component, as llmarch's blocks save them (bytes).

Each term is a tensor autograd saves in our modules, counted once per storage (views share one): checked against
``torch.autograd.graph.saved_tensors_hooks`` measurements in tests/test_analysis_activations.py. ``a`` is the
activation dtype's bytes per number; statistics kept in fp32 count 4. Per token:

- norm: LayerNorm its input + fp32 mean and 1/std (a·D + 8); RMSNorm an fp32 copy of its input, the fp32 1/rms
  and the normalised input (4·D + 4 + a·D; fp32 for the zero-centred gain: 8·D + 4). Its output is the next
  projection's input, counted there.
- attention: the qkv projection's input (a·D) and output (a·(H+2G)·Dh: v stays a view of it), the rotated q|k
  (a·(H+G)·Dh, one tensor) when RoPE rotates, the SDPA output (a·H·Dh, which the output projection reads as a
  view, or as a copy when partial RoPE concatenates q: a·H·Dh more) and its fp32 log-sum-exp (4·H). Scores
  only when a kernel materialises them (``memory.score_bytes_per_token``).
- FFN: its input (a·D), then [*, F] tensors: MLP up(x) and act(up(x)) (2); SwiGLU gate|up and the product (3,
  the fused gate recomputes silu); another GLU also act(gate) (4).
- MoE (sorted dispatch): the router's input, fp32 logits and probabilities (8·E + 4); per visit (K) the dispatched
  input, the expert's [*, F] tensors, its output and weighted output, int64 ids and fp32 weights (3·a·D + 32);
  a gated shared expert also its output and fp32 gate (a·D + 4).
- residual adds save nothing; dropout keeps a 1-byte mask per element.
- ALiBi: its fp32 score bias per layer, shared by the batch, where torch's attention runs and saves it
  (:func:`score_bias_bytes_per_token`; llmarch's attention kernels add it from the slopes and save none).
- around the stack: token ids (8), the embedding norm if any, RoPE's fp32 cos/sin tables (8·R; in another
  dtype the copy each layer casts, 2·a·R·L), the final norm, the head's input (a·D), and the training loss
  (``ce_sum``): the logits and their fp32 log-sum-exp (a·V + 4; vocabulary-parallel logits keep the fp32
  log-softmax of the local V / tp instead), labels (8).
"""
from __future__ import annotations

import weakref

from llmarch.analysis.ffn import ffn_cost, shared_width
from llmarch.analysis.layers import mixer_cost

# FFN kind -> saved [*, F] tensors per token: MLP up(x), act(up(x)); GLU gate|up (2), act(gate), product
FFN_SAVED_F = {"mlp": 2, "glu": 4}
SILU_GLU_SAVED_F = 3  # the fused SwiGLU gate saves gate|up only and recomputes silu(gate) in the backward


def norm_bytes_per_token(cfg, a: float) -> float:
    """What one norm over D keeps per token (its output excluded: the next projection's input)."""
    D = cfg.d_model
    if cfg.norm == "layernorm":
        return a * D + 8
    return 4 * D + 4 + (4 * D if cfg.norm == "rmsnorm_zero" else a * D)


def rotary_dim(cfg) -> int:
    """The rotated dims R of each head (0 without RoPE)."""
    return int(cfg.dh * cfg.rope.fraction) if cfg.position == "rope" else 0


def _mixer_widths(cfg, layer: int | None = None) -> tuple[int, int]:
    """(q/k/v output width, o input width) per token of the token mixer of ``layer``."""
    cost = mixer_cost(cfg, layer)
    if hasattr(cost, "widths"):
        return cost.widths(cfg)
    return (cfg.n_heads + 2 * cfg.kv_heads) * cfg.dh, cfg.n_heads * cfg.dh


def ffn_saved_f(cfg, kind: str) -> int:
    """[*, F] tensors an FFN of ``kind`` keeps per token."""
    if kind == "glu" and cfg.activation == "silu":
        return SILU_GLU_SAVED_F
    return FFN_SAVED_F.get(kind, 2)


def layer_activation_bytes_per_token(cfg, layer: int, act_bytes: float, cross: bool = False,
                                     seq_len: int | None = None) -> float:
    """Bytes one token's activations in one block keep for the backward (attention scores excluded). A mixer
    whose cost entry has ``saved_bytes(cfg, a, T)`` adds what its kernel saves beyond the projections (at
    ``seq_len``, default ``max_seq_len``)."""
    D, a = cfg.d_model, act_bytes
    masks = D if cfg.dropout > 0 else 0  # one byte per element per residual dropout mask
    norm = norm_bytes_per_token(cfg, a)
    qkv, o_in = _mixer_widths(cfg, layer)
    attn = norm + a * D + a * qkv + a * o_in + masks  # norm, qkv in, qkv out, o in
    cost = mixer_cost(cfg, layer)
    if hasattr(cost, "saved_bytes"):
        attn += cost.saved_bytes(cfg, a, seq_len or cfg.max_seq_len)
    elif cfg.mixer == "attention":  # + rotated q|k, the log-sum-exp of SDPA
        R = rotary_dim(cfg)
        attn += (a * (cfg.n_heads + cfg.kv_heads) * cfg.dh if R else 0) + 4 * cfg.n_heads
        attn += a * o_in if 0 < R < cfg.dh else 0  # q from a concatenation: the o input is a copy, not a view
    if cross:  # norm, q in, q, o in (+ the source's k/v, counted per target token)
        H, G, Dh = cfg.n_heads, cfg.kv_heads, cfg.dh
        attn += norm + a * D + a * (H + 2 * G) * Dh + a * H * Dh + masks
    ffn = ffn_cost(cfg, layer)
    if ffn.kind == "none":  # a mixer-only block: no norm, no FFN
        return attn
    if ffn.kind != "moe":
        return attn + norm + a * D + a * ffn_saved_f(cfg, ffn.kind) * cfg.d_ff + masks
    m, K = cfg.moe, cfg.moe.top_k  # router logits and probabilities in fp32 (+ 4: a per-token fp32 sum); each
    # of the K visits keeps its dispatched input, its [*, F] tensors, its output and weighted output, and 32 bytes of
    # int64 ids (top-k, sorted, combine) and fp32 weights (top-k, combine)
    saved_f = ffn_saved_f(cfg, m.expert_ffn)
    gated = a * D + 4 if m.shared_gate and shared_width(cfg) else 0  # the shared output and its fp32 gate
    return (attn + norm + a * D + 8 * m.n_experts + 4 + K * (3 * a * D + a * saved_f * m.expert_d_ff(cfg.d_ff) + 32)
            + a * saved_f * shared_width(cfg) + gated + masks)


def alibi_bias_saved(seq_len: int) -> bool:
    """Whether a training step here saves ALiBi's score bias: torch's attention keeps it as its mask input, while
    llmarch's own attention kernels (:mod:`llmarch.native.flash`, on CPUs where they build, from its fewest
    queries on) add the bias themselves from the slopes and keep nothing of it. The plan describes this host, as
    the measurement it is held to does (the first call may build the kernels)."""
    from llmarch.native import flash

    return not (seq_len >= flash.MIN_QUERIES and flash.available())


def score_bias_bytes_per_token(cfg, seq_len: int, batch: int, saved: bool | None = None) -> float:
    """ALiBi's fp32 score bias [1, H, T, S], built in each layer and shared by the batch: 4·H·T / B per token and
    layer where the step saves it (``saved``; default :func:`alibi_bias_saved`), else 0; 0 for other position
    schemes."""
    if cfg.position != "alibi" or not (alibi_bias_saved(seq_len) if saved is None else saved):
        return 0.0
    return 4 * cfg.n_heads * seq_len / batch


def outer_bytes_per_token(cfg, act_bytes: float, n_layers: int, vocab_shards: int = 1, first: bool = True,
                          last: bool = True) -> float:
    """Per token, what lies outside the blocks: token ids and RoPE tables (``first``: the embedding's stage),
    the final norm, head input and loss (``last``); ``vocab_shards`` > 1: vocabulary-parallel logits keep the
    fp32 log-softmax of the local V / shards."""
    a = act_bytes
    R = rotary_dim(cfg)
    out = 8 * R if a == 4 else 2 * a * R * n_layers  # fp32 cos|sin (each stage builds them), or a cast per layer
    if first:
        out += 8 + (norm_bytes_per_token(cfg, a) if cfg.embed_norm else 0)
    if last:
        loss = a * cfg.vocab_size + 4 if vocab_shards == 1 else 4 * cfg.vocab_size / vocab_shards
        out += (norm_bytes_per_token(cfg, a) if cfg.final_norm else 0) + a * cfg.d_model + loss + 8
    return out


class _Saved:
    """One tensor autograd saved; its release (after its node's backward) decrements its storage's count."""

    def __init__(self, t, release):
        self.t = t
        weakref.finalize(self, release)


def measure_saved_bytes(step, params=()) -> int:
    """Peak bytes of the distinct storages autograd holds for the backward while ``step()`` runs (one forward:
    all it saved; a pipeline schedule: its most micro-batches in flight), the storages of ``params`` (also through
    views, e.g. a sharded weight's transpose) and of other grad-requiring leaves excluded: the measurement this
    module's counts are held to. The input a custom autograd function saves is a grad-requiring view made inside
    its forward: it counts."""
    import torch

    def local(t):  # the plain tensor under a DTensor and/or an async collective's result
        t = t.trigger_wait() if hasattr(t, "trigger_wait") else t
        t = t._local_tensor if hasattr(t, "_local_tensor") else t
        return t.trigger_wait() if hasattr(t, "trigger_wait") else t

    skip = {local(p).untyped_storage().data_ptr() for p in params}
    live: dict[int, list] = {}  # data_ptr -> [storage, saved tensors holding it]
    total, peak = [0], [0]

    def release(ptr):
        entry = live[ptr]
        entry[1] -= 1
        if entry[1] == 0:
            total[0] -= entry[0].nbytes()
            del live[ptr]

    def pack(t):
        x = local(t)
        if x.requires_grad and x.grad_fn is None and x._base is None:
            return t
        try:
            storage = x.untyped_storage()
        except RuntimeError:  # FSDP2's all-gathered weights: storage freed after use, not an activation
            return t
        ptr = storage.data_ptr()
        if ptr in skip:
            return t
        if ptr not in live:
            live[ptr] = [storage, 0]
            total[0] += storage.nbytes()
            peak[0] = max(peak[0], total[0])
        live[ptr][1] += 1
        return _Saved(t, lambda: release(ptr))

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda s: s.t if isinstance(s, _Saved) else s):
        step()
    return peak[0]


__all__ = ["FFN_SAVED_F", "norm_bytes_per_token", "layer_activation_bytes_per_token", "outer_bytes_per_token",
           "score_bias_bytes_per_token", "alibi_bias_saved", "ffn_saved_f", "rotary_dim", "measure_saved_bytes"]
