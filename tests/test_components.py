"""Component tests: each unit against an independent reference (a textbook formula written here, or the
transformers function), and the efficient forms against the plain ones (SDPA / tiled vs naive attention, cached vs
full decoding)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import llmarch
from llmarch.nn import ACTIVATIONS, GLU, MLP, LayerNorm, RMSNorm
from llmarch.nn.attention import AttnContext
from llmarch.nn import kernels
from llmarch.nn.kernels import naive_attention, sdpa_attention, tiled_attention
from llmarch.nn.patterns import Dense, Sliding
from llmarch.nn.position import POSITIONS, AlibiPositions, NoPositions, alibi_slopes
from llmarch.nn.rope import RotaryEmbedding

# --- attention kernels -----------------------------------------------------------------------------------------


def _qkv(B=2, H=4, G=2, T=9, S=9, Dh=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H, T, Dh, generator=g), torch.randn(B, G, S, Dh, generator=g),
            torch.randn(B, G, S, Dh, generator=g))


def _padding(B, S, lengths):
    pad = torch.zeros(B, S, dtype=torch.bool)
    for i, n in enumerate(lengths):
        pad[i, S - n:] = True
    return pad


MASK_CASES = {  # name -> (pattern, key padding lengths or None, q_start (past keys), position scheme)
    "causal": (Dense(), None, 0, NoPositions()),
    "causal-cached-chunk": (Dense(), None, 6, NoPositions()),
    "sliding": (Sliding(3), None, 0, NoPositions()),
    "sliding-cached-chunk": (Sliding(4), None, 5, NoPositions()),
    "padded": (Dense(), (9, 5), 0, NoPositions()),
    "padded-sliding": (Sliding(3), (9, 4), 0, NoPositions()),
    "alibi-padded": (Dense(), (9, 6), 0, AlibiPositions(4)),
    "alibi-cached": (Dense(), None, 4, AlibiPositions(4)),
}


@pytest.mark.parametrize("G", [4, 2, 1], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("case", sorted(MASK_CASES))
def test_sdpa_naive_and_tiled_kernels_agree(case, G):
    pattern, lengths, past, positions = MASK_CASES[case]
    B, T = 2, 9 - past if past else 9
    S = past + T
    q, k, v = _qkv(B=B, G=G, T=T, S=S)
    key_padding = _padding(B, S, lengths) if lengths else None
    ctx = AttnContext(past, T, positions, torch.arange(past, S).expand(B, T), key_padding, causal=True,
                      device=q.device)
    mask, causal = ctx.mask(pattern, 0, S)
    bias = ctx.bias(0, S)
    args = dict(mask=mask, bias=bias, scale=0.3, causal=causal)
    ref = naive_attention(q, k, v, **args)
    # the written-out reference: a dense boolean matrix from the rules themselves
    allowed = torch.ones(B, 1, T, S, dtype=torch.bool) & pattern.render(S)[past:][None, None]
    if key_padding is not None:
        allowed &= key_padding[:, None, None, :]
    real = allowed.any(-1).expand(B, 4, T)  # queries with at least one visible key
    kk, vv = k.repeat_interleave(4 // G, 1), v.repeat_interleave(4 // G, 1)
    scores = q @ kk.transpose(-1, -2) * 0.3 + (0 if bias is None else bias)
    dense = scores.masked_fill(~allowed, float("-inf")).softmax(-1).nan_to_num() @ vv
    torch.testing.assert_close(ref[real], dense[real], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sdpa_attention(q, k, v, **args), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tiled_attention(q, k, v, block=4, **args), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("G", [4, 2, 1], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("B,S", [(1, 300), (8, 40), (2, 7)])
def test_single_query_sdpa_route_equals_naive(G, B, S, monkeypatch):
    """Decoding on the CPU: from SINGLE_QUERY_MIN_KEYS keys (batch x keys) the sdpa kernel runs one query as two
    products over the grouped heads; values as the naive kernel's, with a padding / window mask and without."""
    calls = []
    real = kernels._single_query
    monkeypatch.setattr(kernels, "_single_query", lambda *a: calls.append(1) or real(*a))
    q, k, v = _qkv(B=B, G=G, T=1, S=S)
    mask = torch.rand(B, 1, 1, S, generator=torch.Generator().manual_seed(1)) > 0.3
    mask[..., -1] = True  # the query's own position
    for m in (mask, None):
        torch.testing.assert_close(sdpa_attention(q, k, v, mask=m, scale=0.3),
                                   naive_attention(q, k, v, mask=m, scale=0.3), atol=1e-5, rtol=1e-5)
    assert len(calls) == (2 if B * S >= kernels.SINGLE_QUERY_MIN_KEYS else 0)
    q.requires_grad_(True)
    sdpa_attention(q, k, v, mask=mask).sum().backward()  # training keeps the fused kernel
    assert len(calls) == (2 if B * S >= kernels.SINGLE_QUERY_MIN_KEYS else 0) and q.grad is not None


def test_tiled_kernel_visits_keys_in_blocks():
    """A block smaller than S must still give the plain softmax (the online rescaling is what is tested)."""
    q, k, v = _qkv(T=17, S=17)
    for block in (1, 5, 64):
        torch.testing.assert_close(tiled_attention(q, k, v, causal=True, block=block),
                                   naive_attention(q, k, v, causal=True), atol=1e-5, rtol=1e-5)


# --- cached decoding == full recomputation ---------------------------------------------------------------------

TINY = dict(kind="decoder", vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
            max_seq_len=64)
ROPES = {"rope-none": dict(), "rope-linear": dict(scaling="linear", factor=2.0),
         # dynamic NTK changes the base once positions pass max_seq_len, so keys cached before that point were
         # rotated with another base: it is only self-consistent within max_seq_len (14 < 64 here)
         "rope-dynamic": dict(scaling="dynamic", factor=2.0),
         "rope-llama3": dict(scaling="llama3", factor=8.0, original_max_seq_len=8),
         "rope-yarn": dict(scaling="yarn", factor=4.0, original_max_seq_len=8),
         "rope-partial": dict(fraction=0.5)}
CACHE_CASES = {name: dict(position=name)
               for name in ("none", "learned", "sinusoidal", "sinusoidal_halves", "alibi", "relative")}
CACHE_CASES.update({name: dict(position="rope", rope=r) for name, r in ROPES.items()})
CACHE_CASES["sliding-window-3"] = dict(position="rope", pattern=("sliding",), window=3)
CACHE_CASES["mixed-dense-sliding-4"] = dict(position="alibi", pattern=("dense", "sliding"), window=4)


def test_every_position_scheme_is_covered():
    assert {c["position"] for c in CACHE_CASES.values()} == set(POSITIONS)


def _tiny_model(**fields):
    torch.manual_seed(0)
    model = llmarch.build(llmarch.ModelConfig(**{**TINY, **fields})).eval()
    with torch.no_grad():  # learned positions start at zero; make them matter
        for name, p in model.named_parameters():
            if "positions" in name:
                p.normal_(0, 0.5)
    return model


@pytest.mark.parametrize("padded", [True, False], ids=["left-padded", "no-mask"])
@pytest.mark.parametrize("name", sorted(CACHE_CASES))
def test_cached_decoding_equals_full_recomputation(name, padded):
    model = _tiny_model(**CACHE_CASES[name])
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 97, (2, 14), generator=g)
    mask = _padding(2, 14, (14, 10)).long() if padded else None  # the second row is left-padded

    def upto(t):
        return None if mask is None else mask[:, :t]

    with torch.no_grad():
        full = model(ids, attention_mask=mask).logits
        cache = model.new_cache()
        steps = [model(ids[:, :5], attention_mask=upto(5), cache=cache).logits]  # prefill, then one by one
        for t in range(5, 14):
            steps.append(model(ids[:, t:t + 1], attention_mask=upto(t + 1), cache=cache).logits)
    cached = torch.cat(steps, dim=1)
    real = mask.bool() if padded else torch.ones(2, 14, dtype=torch.bool)
    torch.testing.assert_close(cached[real], full[real], atol=1e-5, rtol=1e-5)
    for i in range(model.config.n_layers):  # a sliding layer keeps only the W-1 keys a future query can see
        lookback = model.decoder.layers[i].attn.pattern.lookback
        assert cache.k[i].shape[2] == (14 if lookback is None else lookback)


# --- ALiBi slopes ----------------------------------------------------------------------------------------------


def published_alibi_slopes(n: int) -> list[float]:
    """Press et al. 2022, section 3: for n a power of two, slope_h = 2^(-8h/n), h = 1..n. Otherwise take the
    slopes for the largest power of two c < n, then the odd-numbered slopes for 2c: 2^(-8(2j-1)/(2c))."""
    c = 2 ** int(math.log2(n))
    slopes = [2.0 ** (-8.0 * h / c) for h in range(1, c + 1)]
    slopes += [2.0 ** (-8.0 * (2 * j - 1) / (2 * c)) for j in range(1, n - c + 1)]
    return slopes


@pytest.mark.parametrize("n", [1, 4, 6, 8, 12, 16, 20, 112])
def test_alibi_slopes_match_the_paper_and_bloom(n):
    from transformers.models.bloom.modeling_bloom import _get_alibi_slopes

    torch.testing.assert_close(alibi_slopes(n), torch.tensor(published_alibi_slopes(n)))
    torch.testing.assert_close(alibi_slopes(n).float(), _get_alibi_slopes(n, torch.device("cpu")))


def test_alibi_bias_is_minus_slope_times_distance():
    bias = AlibiPositions(6).score_bias(torch.arange(3, 5), torch.arange(5))  # [1, H, T, S]
    slopes = published_alibi_slopes(6)
    for h in range(6):
        for i, q in enumerate((3, 4)):
            for kpos in range(5):
                assert bias[0, h, i, kpos].item() == pytest.approx(-slopes[h] * abs(q - kpos))


# --- norms, FFNs, activations ----------------------------------------------------------------------------------


def test_rmsnorm_matches_formula():
    norm = RMSNorm(16, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_()
    for scale in (4.0, 1e-3):  # at 1e-3 the mean square is ~eps, so eps matters
        x = torch.randn(3, 5, 16) * scale
        expected = norm.weight * x / torch.sqrt((x**2).mean(-1, keepdim=True) + 1e-6)
        torch.testing.assert_close(norm(x), expected, atol=1e-6, rtol=1e-5)
    xb = x.bfloat16()  # bf16 input: statistics in fp32, output in bf16 (rounded once, before the gain)
    ref = (xb.float() / torch.sqrt((xb.float()**2).mean(-1, keepdim=True) + 1e-6)).bfloat16()
    torch.testing.assert_close(norm.bfloat16()(xb), norm.weight.bfloat16() * ref)


@pytest.mark.parametrize("bias", [True, False])
def test_layernorm_matches_formula(bias):
    norm = LayerNorm(16, eps=1e-5, bias=bias)
    with torch.no_grad():
        for p in norm.parameters():
            p.normal_()
    x = torch.randn(3, 5, 16) * 3 + 1
    mu, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
    expected = (x - mu) / torch.sqrt(var + 1e-5) * norm.weight + (norm.bias if bias else 0)
    torch.testing.assert_close(norm(x), expected, atol=1e-5, rtol=1e-5)


ACTS = {"relu": lambda x: x.clamp(min=0), "silu": lambda x: x / (1 + torch.exp(-x)),
        "gelu": lambda x: 0.5 * x * (1 + torch.erf(x / math.sqrt(2))),
        "gelu_tanh": lambda x: 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3))),
        "sigmoid": lambda x: 1 / (1 + torch.exp(-x)), "tanh": lambda x: (torch.exp(2 * x) - 1) / (torch.exp(2 * x) + 1),
        "quick_gelu": lambda x: x / (1 + torch.exp(-1.702 * x)), "relu2": lambda x: x.clamp(min=0) ** 2,
        "swish_learned": lambda x: x / (1 + torch.exp(-x))}  # beta starts at 1


def test_every_activation_matches_its_formula():
    from llmarch.nn.activation import make_activation

    assert set(ACTS) == set(ACTIVATIONS)
    x = torch.linspace(-5, 5, 101)
    for name, f in ACTS.items():
        torch.testing.assert_close(make_activation(name)(x), f(x), atol=1e-5, rtol=1e-5, msg=name)


def test_learned_swish_trains_its_beta():
    """x * sigmoid(beta x) (Ramachandran et al. 2017) with beta a parameter of each FFN: any beta matches the
    formula, beta gets a gradient, and the model counts it."""
    torch.manual_seed(0)
    ffn = MLP(8, 12, "swish_learned")
    assert [n for n, _ in ffn.named_parameters()] == ["act.beta", "up.weight", "down.weight"]
    with torch.no_grad():
        ffn.act.beta.fill_(0.37)
    x = torch.randn(2, 3, 8)
    h = x @ ffn.up.weight.T
    torch.testing.assert_close(ffn(x), (h / (1 + torch.exp(-0.37 * h))) @ ffn.down.weight.T, atol=1e-5, rtol=1e-5)
    ffn(x).square().sum().backward()
    assert ffn.act.beta.grad is not None and ffn.act.beta.grad.abs() > 0
    cfg = llmarch.preset("llama-tiny").replace(activation="swish_learned")
    model = llmarch.build(cfg)
    betas = [p for n, p in model.named_parameters() if n.endswith("act.beta")]
    assert len(betas) == cfg.n_layers and all(float(b) == 1.0 for b in betas)
    assert llmarch.analyze(cfg, seq_len=16).params.total == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("act", ["silu", "gelu", "relu", "sigmoid"])  # sigmoid: the original GLU (Dauphin 2017)
def test_glu_matches_written_out_math(act):
    torch.manual_seed(0)
    ffn = GLU(8, 12, act, bias=True)
    x = torch.randn(2, 3, 8)
    W, b = ffn.gate_up.weight, ffn.gate_up.bias
    gate, up = x @ W[:12].T + b[:12], x @ W[12:].T + b[12:]
    expected = (ACTS[act](gate) * up) @ ffn.down.weight.T + ffn.down.bias
    torch.testing.assert_close(ffn(x), expected, atol=1e-5, rtol=1e-5)


def test_mlp_matches_written_out_math():
    torch.manual_seed(0)
    ffn = MLP(8, 12, "gelu_tanh", bias=True)
    x = torch.randn(2, 3, 8)
    expected = ACTS["gelu_tanh"](x @ ffn.up.weight.T + ffn.up.bias) @ ffn.down.weight.T + ffn.down.bias
    torch.testing.assert_close(ffn(x), expected, atol=1e-5, rtol=1e-5)


# --- RoPE scalings vs transformers ----------------------------------------------------------------------------

HF_ROPES = {"linear": dict(scaling="linear", factor=4.0),
            "dynamic": dict(scaling="dynamic", factor=2.0),
            "llama3": dict(theta=500000.0, scaling="llama3", factor=8.0, original_max_seq_len=32),
            "yarn": dict(scaling="yarn", factor=4.0, original_max_seq_len=32),
            "yarn-factor": dict(scaling="yarn", factor=4.0, original_max_seq_len=32, attention_factor=1.3),
            "partial": dict(fraction=0.5, scaling="linear", factor=2.0)}


@pytest.mark.parametrize("name", sorted(HF_ROPES))
def test_rope_inv_freq_matches_transformers(name):
    import transformers
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from llmarch.hf.io import family

    cfg = llmarch.ModelConfig(**{**TINY, "head_dim": 16, "max_seq_len": 64}, rope=HF_ROPES[name])
    hf_cfg = transformers.LlamaConfig(**family("llama").from_config(cfg))
    ours = RotaryEmbedding(cfg.dh, cfg.rope, cfg.rope.original_max_seq_len or cfg.max_seq_len)
    for seq_len in (10, 64, 200):  # beyond max_seq_len only dynamic NTK changes
        inv, scale = ROPE_INIT_FUNCTIONS[cfg.rope.scaling](hf_cfg, "cpu", seq_len=seq_len)
        mine = ours.frequencies(torch.arange(seq_len)[None])
        torch.testing.assert_close(mine, inv.float(), atol=0, rtol=1e-6)
        assert ours.scale == pytest.approx(scale)


# --- decoding layout -------------------------------------------------------------------------------------------


def test_decode_layout_changes_strides_not_values_and_training_still_works():
    from llmarch.infer.layout import decode_layout

    cfg = llmarch.ModelConfig(**TINY, tie_embeddings=True)
    torch.manual_seed(0)
    a, b = llmarch.build(cfg), llmarch.build(cfg)
    b.load_state_dict(a.state_dict())
    ids = torch.randint(0, 97, (2, 6))
    out = llmarch.generate(a, ids, max_new_tokens=4)  # re-lays a's wide weights
    assert not a.lm_head.weight.is_contiguous() and a.lm_head.weight is a.embed.tokens.weight
    assert decode_layout(a) == 0  # idempotent
    assert torch.equal(out, llmarch.generate(b, ids, max_new_tokens=4))
    for model in (a, b):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        logits = model(out).logits
        F.cross_entropy(logits[:, :-1].flatten(0, 1), out[:, 1:].flatten()).backward()  # `out` is trainable input
        opt.step()
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5, msg=name)
