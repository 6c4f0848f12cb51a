"""The linear-time mixers (Mamba-2 SSD, linear attention): their three forms agree in outputs and gradients,
linear attention equals a naive Katharopoulos et al. loop, cached decoding equals full recomputation (also in a
hybrid with attention layers), and left padding does not leak into the recurrent state."""
from __future__ import annotations

import pytest
import torch

import llmarch
from llmarch.nn.cache import StateCache
from llmarch.nn.linear_attention import elu_feature_map, linear_attention
from llmarch.nn.ssd import SSD_FORMS

FORMS = ("parallel", "chunked", "recurrent")
BASE = dict(vocab_size=101, d_model=32, n_layers=2, n_heads=4, d_ff=64, position="none", norm_bias=False,
            ssm=dict(d_state=8, n_groups=2, expand=2, head_dim=8, chunk_size=4))
CONFIGS = {
    "mamba2": dict(BASE, mixer="mamba2", ffn="none"),
    "linear": dict(BASE, mixer="linear", n_kv_heads=2),
    "hybrid": dict(BASE, n_layers=3, layer_mixers=["mamba2", "linear", "attention"], position="rope"),
}


def scan_inputs(seed=0, B=2, T=11, H=3, P=4, N=5):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    return [r(B, T, H, P), torch.rand(B, T, H, generator=g, dtype=torch.float64), -torch.rand(H, generator=g,
            dtype=torch.float64), r(B, T, H, N), r(B, T, H, N), r(B, H, P, N)]


def run_scan(form, inputs):
    inputs = [t.clone().requires_grad_(True) for t in inputs]
    y, state = SSD_FORMS[form](*inputs, chunk_size=4)
    (y.sin().sum() + state.cos().sum()).backward()
    return [y, state] + [t.grad for t in inputs]


def test_ssd_forms_agree_in_outputs_and_gradients():
    ref = run_scan("recurrent", scan_inputs())
    for form in ("parallel", "chunked"):
        for name, a, b in zip(["y", "state", "dx", "ddt", "dA", "dB", "dC", "dstate"], run_scan(form, scan_inputs()),
                              ref):
            assert torch.allclose(a, b, atol=1e-10), f"{form} {name}: {(a - b).abs().max():.3g}"


def test_linear_attention_is_katharopoulos():
    """φ = elu + 1, causal, with the normaliser: the textbook loop written out."""
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 9, 3, 4, generator=g, dtype=torch.float64) for _ in range(3))
    fq, fk = elu_feature_map(q), elu_feature_map(k)
    want = torch.zeros_like(v)
    for t in range(9):
        S = torch.einsum("bshd,bshe->bhde", fk[:, :t + 1], v[:, :t + 1])  # Σ φ(k) vᵀ
        z = fk[:, :t + 1].sum(1)  # Σ φ(k)
        want[:, t] = torch.einsum("bhd,bhde->bhe", fq[:, t], S) / (torch.einsum("bhd,bhd->bh", fq[:, t], z)[..., None]
                                                                  + 1e-6)
    for form in FORMS:
        y, state = linear_attention(fq, fk, v, form, chunk_size=4)
        assert torch.allclose(y, want, atol=1e-10), form
        assert torch.allclose(state[:, :, -1], fk.sum(1)), "last state row is the normaliser Σ φ(k)"


@pytest.mark.parametrize("mixer", ["mamba2", "linear"])
def test_mixer_forms_agree_with_parameter_gradients(mixer):
    models = {f: llmarch.build(llmarch.ModelConfig(**dict(CONFIGS[mixer], n_layers=1)).replace(ssm=dict(form=f)))
              for f in FORMS}
    state = models["parallel"].state_dict()
    ids = torch.randint(0, 101, (2, 10), generator=torch.Generator().manual_seed(2))
    grads = {}
    for f, m in models.items():
        m.load_state_dict(state)
        out = m(ids).logits
        out.pow(2).mean().backward()
        grads[f] = (out.detach(), {n: p.grad for n, p in m.named_parameters() if p.grad is not None})
    for f in ("chunked", "recurrent"):
        assert torch.allclose(grads[f][0], grads["parallel"][0], atol=1e-5)
        for n, gr in grads["parallel"][1].items():
            assert torch.allclose(grads[f][1][n], gr, atol=1e-5, rtol=1e-4), f"{f}: grad of {n}"


def perturbed(cfg):
    """A model whose mixers matter: larger weights than the scaled init."""
    torch.manual_seed(0)
    m = llmarch.build(llmarch.ModelConfig(**cfg)).eval()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n.endswith(("attn.out.weight", "attn.in_proj.weight", "attn.qkv.weight")):
                p.normal_(0, 0.3)
    return m


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_cached_decoding_equals_full_recomputation(name):
    m = perturbed(CONFIGS[name])
    ids = torch.randint(0, 101, (2, 13), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = m(ids).logits
        cache = m.new_cache()
        assert isinstance(cache, StateCache)
        steps = [m(ids[:, :7], cache=cache).logits] + [m(ids[:, t:t + 1], cache=cache).logits for t in range(7, 13)]
    assert torch.allclose(torch.cat(steps, 1), full, atol=1e-5)
    sizes = {i: t.shape for i, t in cache.state.items()}
    with torch.no_grad():
        m(ids[:, :1], cache=cache)
    assert {i: t.shape for i, t in cache.state.items()} == sizes, "the recurrent state does not grow"


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_left_padding_does_not_leak(name):
    """A left-padded row gives the logits (and, decoding on, the generations) of the same row alone."""
    m = perturbed(CONFIGS[name])
    ids = torch.randint(1, 101, (2, 9), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    padded = ids.masked_fill(mask == 0, 7)  # whatever the pad ids are, they must not matter
    with torch.no_grad():
        both = m(padded, attention_mask=mask).logits
        alone = m(ids[1:, 4:]).logits
    assert torch.allclose(both[1, 4:], alone[0], atol=1e-5)
    gen = llmarch.generate(m, padded, attention_mask=mask, max_new_tokens=5)
    assert torch.equal(gen[1, 9:], llmarch.generate(m, ids[1:, 4:], max_new_tokens=5)[0, 5:])


def test_ssm_config_errors_name_the_field():
    cfg = llmarch.ModelConfig(**CONFIGS["mamba2"])
    for change, field in ((dict(head_dim=7), "ssm.head_dim"), (dict(n_groups=3), "ssm.n_groups"),
                          (dict(form="fast"), "ssm.form"), (dict(time_step_limit_low=0.1, time_step_limit_high=0.05), "ssm.time_step_limit_low")):
        with pytest.raises(ValueError, match=field.replace(".", r"\.")):
            cfg.replace(ssm=change)
