"""Training-compute planner: FLOPs for a token budget (or tokens for a FLOP budget), GPU-hours at an MFU and an
accelerator's peak, and the compute-optimal token count.

Training FLOPs = 6·N·D (Kaplan et al. 2020: 2 per parameter per token forward, 4 backward) + the attention term
3·(forward attention FLOPs per token)·D that 6·N·D leaves out, counting only the (query, key) pairs the mask allows
(causal, sliding windows, sparse patterns), at the sequence length the preset's paper pre-trained at unless one is
given; for MoE, N is the parameters active per token.
Chinchilla-optimal tokens ≈ 20 per parameter (Hoffmann et al. 2022). Published figures are printed beside the
computed ones (:data:`PUBLISHED`); formulas are never adjusted to match them.
"""
from __future__ import annotations

from dataclasses import dataclass

from llmarch.analysis.flops import forward_flops
from llmarch.analysis.params import count_params

CHINCHILLA_TOKENS_PER_PARAM = 20.0
# dense bf16/fp16 tensor-core peak, FLOP/s, from the vendors' data sheets (no sparsity)
ACCELERATORS = {"a100": 312e12, "h100": 989e12, "h200": 989e12, "v100": 125e12, "tpu-v4": 275e12}
# memory bandwidth, bytes/s, from the same data sheets (A100 80GB SXM, H100 SXM, H200 SXM, V100 SXM2, TPU v4)
BANDWIDTH = {"a100": 2.039e12, "h100": 3.35e12, "h200": 4.8e12, "v100": 0.9e12, "tpu-v4": 1.2e12}


@dataclass(frozen=True)
class Published:
    preset: str
    tokens: float | None  # None: the source gives compute only; the planner shows the tokens it implies
    flops: float | None
    source: str
    gpu_hours: float | None = None
    accelerator: str | None = None
    note: str = ""


PUBLISHED = [
    Published("gpt3-175b", 300e9, 3.14e23, "Brown et al. 2020, Table D.1 (total train compute)"),
    Published("llama-2-70b", 2e12, 1.7e23, "a seed document's comparison table", gpu_hours=1_720_320,
              accelerator="a100",
              note="6·N·D at 2T tokens gives ~8.3e23, not 1.7e23; the Llama 2 paper (Touvron et al. 2023b, Table 2) "
                   "reports 1,720,320 A100 GPU-hours for 70B, which may be where a '1.7' came from"),
    Published("mistral-7b", None, 2.5e22, "a seed document's table (Mistral AI publishes no token count)",
              note="the tokens shown are what 2.5e22 implies at 6·N + attention per token"),
    Published("gpt4-speculated", None, 2e25, "a seed document's speculation (~2e25 FLOPs)",
              note="N is the speculated MoE's active parameters (top-2 of 16); its architecture is assumed, see "
                   "the preset"),
]


@dataclass
class Plan:
    params: int  # N used in 6·N·D (active per token for MoE)
    tokens: float
    six_nd: float
    attention: float  # only the (query, key) pairs the mask allows (causal, windows, sparse patterns)
    seq_len: int
    attention_dense: float = 0.0  # the same term over the full T×T score matrix
    seq_len_source: str = ""  # where seq_len came from
    counting: str = ""  # how the attention term was counted

    @property
    def flops(self) -> float:
        return self.six_nd + self.attention


def default_seq_len(cfg, name: str | None = None) -> tuple[int, str]:
    """The length to cost training at: the preset's paper's pre-training context (:mod:`llmarch.presets.training`),
    else the model's ``max_seq_len`` — with a note saying which."""
    from llmarch.presets.training import training_context

    found = training_context(name)
    if found is not None:
        return min(found.tokens, cfg.max_seq_len), f"the pre-training context of {name}: {found.source}"
    return cfg.max_seq_len, (f"max_seq_len: no recorded pre-training context for {name or 'this config'}; pass "
                             "--seq-len to cost another length")


def attention_training_flops_per_token(cfg, seq_len: int) -> tuple[float, float, str]:
    """3 × the forward attention FLOPs per token at this sequence length: (mask-allowed pairs, dense T×S, how the
    first was counted)."""
    f = forward_flops(cfg, seq_len, 1)
    dense = 3 * f.attention / seq_len
    if f.attention_useful is None:
        return dense, dense, f"dense T×T (a pattern is too long to count at T={seq_len})"
    frac = f.attention_useful / f.attention if f.attention else 1.0
    from llmarch.analysis.layers import stacks

    parts = ["causal"] if any(st.causal for st in stacks(cfg)) else []
    parts += [p + (f" W={cfg.window}" if p == "sliding" else "") for p in dict.fromkeys(cfg.pattern) if p != "dense"]
    if not parts:
        return 3 * f.attention_useful / seq_len, dense, "dense T×T (bidirectional, no sparse pattern)"
    return (3 * f.attention_useful / seq_len, dense,
            f"only the pairs the {' + '.join(parts)} mask allows ({100 * frac:.1f}% of T×T)")


def _seq_len(cfg, seq_len: int | None, name: str | None) -> tuple[int, str]:
    return (seq_len, "given (--seq-len)") if seq_len else default_seq_len(cfg, name)


def plan_tokens(cfg, tokens: float, seq_len: int | None = None, name: str | None = None) -> Plan:
    """Training FLOPs for ``tokens`` training tokens of length ``seq_len`` (default :func:`default_seq_len`)."""
    s, source = _seq_len(cfg, seq_len, name)
    n = count_params(cfg).active
    attn, dense, counting = attention_training_flops_per_token(cfg, s)
    return Plan(n, tokens, 6.0 * n * tokens, attn * tokens, s, dense * tokens, source, counting)


def plan_flops(cfg, flops: float, seq_len: int | None = None, name: str | None = None) -> Plan:
    """The token count a FLOP budget buys (6·N + attention per token)."""
    s, _ = _seq_len(cfg, seq_len, name)
    n = count_params(cfg).active
    per_token = 6.0 * n + attention_training_flops_per_token(cfg, s)[0]
    return plan_tokens(cfg, flops / per_token, seq_len, name)


def peak_flops(accelerator: str | float) -> float:
    if isinstance(accelerator, (int, float)):
        return float(accelerator)
    key = accelerator.lower()
    if key not in ACCELERATORS:
        try:
            return float(accelerator)
        except ValueError:
            raise ValueError(f"accelerator: unknown {accelerator!r}; choose one of {sorted(ACCELERATORS)} or give "
                             "a peak in FLOP/s (e.g. 989e12)") from None
    return ACCELERATORS[key]


def gpu_hours(flops: float, accelerator: str | float = "h100", mfu: float = 0.4) -> float:
    """Device-hours to do ``flops`` at ``mfu`` (model FLOPs utilisation, 0..1) of the accelerator's peak."""
    if not 0 < mfu <= 1:
        raise ValueError(f"mfu: must be in (0, 1], got {mfu}")
    return flops / (peak_flops(accelerator) * mfu) / 3600.0


def chinchilla_tokens(n_params: float) -> float:
    return CHINCHILLA_TOKENS_PER_PARAM * n_params


def published_checks() -> list[dict]:
    """Each published figure beside what the formulas give for the preset (computed, published, ratio)."""
    from llmarch import presets

    rows = []
    for pub in PUBLISHED:
        cfg = presets.get(pub.preset)
        p = plan_tokens(cfg, pub.tokens, name=pub.preset) if pub.tokens else plan_flops(cfg, pub.flops,
                                                                                       name=pub.preset)
        row = dict(preset=pub.preset, params=p.params, tokens=p.tokens, tokens_implied=pub.tokens is None,
                   six_nd=p.six_nd, with_attention=p.flops, published=pub.flops, source=pub.source, note=pub.note,
                   ratio_6nd_to_published=p.six_nd / pub.flops if pub.flops else None)
        if pub.gpu_hours:
            peak = peak_flops(pub.accelerator)
            row.update(published_gpu_hours=pub.gpu_hours, accelerator=pub.accelerator,
                       implied_mfu=p.six_nd / (pub.gpu_hours * 3600.0 * peak))
        rows.append(row)
    return rows


def decode_roofline(cfg, accelerator: str = "h100", context: int = 2048, batch: int = 1,
                    dtype: str = "bf16") -> dict:
    """Tokens/s of batched decoding at ``context`` on ``accelerator`` by the roofline: each step reads the weights
    the step uses (all of them for a dense model; for MoE, the active parameters times the batch, at most all of
    them: distinct tokens rarely share all their experts) and the KV cache, and does ``batch`` tokens' FLOPs; the step takes the longer of the two."""
    from llmarch.analysis.flops import decode_flops_per_token
    from llmarch.analysis.memory import dtype_bytes, kv_cache_bytes

    key = accelerator.lower()
    if key not in BANDWIDTH:
        raise ValueError(f"accelerator: no bandwidth recorded for {accelerator!r}; choose one of {sorted(BANDWIDTH)}")
    pc = count_params(cfg)
    weights = pc.total if pc.active == pc.total else min(pc.total, pc.active * batch)
    read = weights * dtype_bytes(dtype) + kv_cache_bytes(cfg, context, batch, dtype)
    flops = batch * (decode_flops_per_token(cfg, context) or 0)
    t_mem, t_compute = read / BANDWIDTH[key], flops / ACCELERATORS[key]
    return dict(accelerator=key, context=context, batch=batch, dtype=dtype, bytes_per_step=read,
                flops_per_step=flops, tokens_per_s=batch / max(t_mem, t_compute),
                bound="memory" if t_mem >= t_compute else "compute")
