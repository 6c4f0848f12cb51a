"""The mixture of attention types: softmax weights sum to one per token, the output is the weighted sum of its
components run separately, the controller is causal, and cached decoding / left padding behave (both
controllers)."""
from __future__ import annotations

import pytest
import torch

import llmarch
from llmarch.model import Stack  # noqa: F401  (the model's stack builds the mixer)
from llmarch.nn.attention import AttnContext

BASE = dict(vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, norm_bias=False,
            layer_mixers=["mixture", "attention"], sparse=dict(random_keys=2, seed=1),
            mixture=dict(components=["attention", "linear", "random", "local"], window=3, controller_dim=8),
            ssm=dict(chunk_size=4))


def model(controller="mean", components=("attention", "linear", "random", "local")):
    torch.manual_seed(0)
    m = llmarch.build(llmarch.ModelConfig(**BASE).replace(mixture=dict(controller=controller,
                                                                       components=components))).eval()
    with torch.no_grad():  # sharpen the controller so the weights differ clearly between tokens
        m.decoder.layers[0].attn.controller.proj.weight.normal_(0, 2.0)
    return m


def context(m, x):
    stack = m.decoder
    B, T, _ = x.shape
    return AttnContext(0, T, stack.positions, torch.arange(T).expand(B, T), None, causal=True, device=x.device)


@pytest.mark.parametrize("controller", ["mean", "recurrent"])
def test_weights_sum_to_one_and_output_is_the_weighted_sum_of_parts(controller):
    m = model(controller)
    mix = m.decoder.layers[0].attn
    x = torch.randn(2, 9, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        w = mix.weights(x, context(m, x))
        assert w.shape == (2, 9, 4) and torch.allclose(w.sum(-1), torch.ones(2, 9))
        assert w.std(dim=1).max() > 1e-2, "the weights depend on the input"
        parts = [c(x, context(m, x)) for c in mix.components]
        want = sum(w[..., j, None] * parts[j] for j in range(4))
        assert torch.allclose(mix(x, context(m, x)), want, atol=1e-6)
        later = x.clone()
        later[:, 5:] = torch.randn(2, 4, 32)
        assert torch.allclose(mix.weights(later, context(m, later))[:, :5], w[:, :5], atol=1e-6), "causal"


@pytest.mark.parametrize("controller", ["mean", "recurrent"])
def test_mixture_caches_and_ignores_left_padding(controller):
    m = model(controller)
    ids = torch.randint(1, 97, (2, 11), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = m(ids).logits
        cache = m.new_cache()
        steps = [m(ids[:, :6], cache=cache).logits] + [m(ids[:, t:t + 1], cache=cache).logits for t in range(6, 11)]
    assert torch.allclose(torch.cat(steps, 1), full, atol=1e-5)
    # random keys are drawn per slot (like every pattern's rule), so a padded row sees other random keys: the
    # padding check holds the controller and the other components to it
    m = model(controller, components=("attention", "linear", "local"))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    with torch.no_grad():
        both = m(ids.masked_fill(mask == 0, 5), attention_mask=mask).logits
        alone = m(ids[1:, 3:]).logits
    assert torch.allclose(both[1, 3:], alone[0], atol=1e-5)


def test_mixture_config_is_validated():
    with pytest.raises(ValueError, match="mixture.components"):
        llmarch.ModelConfig(**BASE).replace(mixture=dict(components=["attention", "nope"]))
    with pytest.raises(ValueError, match="mixture.controller"):
        llmarch.ModelConfig(**BASE).replace(mixture=dict(controller="max"))
