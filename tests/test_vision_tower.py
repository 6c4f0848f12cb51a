"""Vision towers exact vs transformers' CLIPVisionModel and SiglipVisionModel: tiny random towers converted with
the production converter, every hidden state (the LLaVA feature layer among them), the pooled output, position
interpolation for another image size, and the save round trip."""
import pytest
import torch

import llmarch
from llmarch.vision_config import VisionConfig
from tests.hf_util import TOL, assert_same_weights, make_hf_model

TINY = dict(image_size=16, patch_size=4, d_model=32, n_layers=3, n_heads=4, d_ff=64)
TOWERS = {
    "clip_vision_model": ("CLIPVisionModel", VisionConfig(**TINY, activation="quick_gelu")),
    "siglip_vision_model": ("SiglipVisionModel", VisionConfig(**TINY, activation="gelu_tanh", norm_eps=1e-6,
                                                              class_token=False, pre_norm=False, post_norm="all",
                                                              pool="attention", patch_bias=True)),
}


@pytest.fixture(scope="module", params=sorted(TOWERS))
def pair(request, tmp_path_factory):
    model_type = request.param
    cls, cfg = TOWERS[model_type]
    tmp = tmp_path_factory.mktemp(model_type)
    hf_model, path = make_hf_model(cfg, model_type, tmp, model_class=cls)
    return model_type, cfg, hf_model, llmarch.hf.load(path).eval(), tmp


def close(a, b, tol=TOL[torch.float32]):
    diff = (a - b).abs().max().item()
    assert diff <= tol, f"max abs diff {diff:.3g} > {tol}"


@torch.no_grad()
def both(ours, hf_model, x, **hf_kwargs):
    return ours(x), hf_model(pixel_values=x, **hf_kwargs)


def test_config_round_trip(pair):
    _, cfg, _, ours, _ = pair
    assert ours.config == cfg


def test_hidden_states_and_pooled_match(pair):
    _, cfg, hf_model, ours, _ = pair
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    mine, theirs = both(ours, hf_model, x, output_hidden_states=True)
    assert len(mine.hidden_states) == len(theirs.hidden_states) == cfg.n_layers + 1
    for i, (a, b) in enumerate(zip(mine.hidden_states, theirs.hidden_states)):
        close(a, b)
    close(mine.last_hidden_state, theirs.last_hidden_state)
    close(mine.pooled, theirs.pooler_output)
    for layer, select in ((-2, "default"), (-1, "full"), (1, "default")):  # the feature layer an LM reads
        tower = llmarch.build(cfg.replace(feature_layer=layer, feature_select=select))
        tower.load_state_dict(ours.state_dict())
        want = theirs.hidden_states[layer]
        with torch.no_grad():
            close(tower.features(x), want[:, 1:] if cfg.class_token and select == "default" else want)


def test_positions_interpolate_for_other_image_sizes(pair):
    _, _, hf_model, ours, _ = pair
    x = torch.randn(1, 3, 24, 24, generator=torch.Generator().manual_seed(1))
    mine, theirs = both(ours, hf_model, x, interpolate_pos_encoding=True)
    assert mine.last_hidden_state.shape[1] == theirs.last_hidden_state.shape[1]
    close(mine.last_hidden_state, theirs.last_hidden_state)


def test_save_reloads_in_transformers(pair):
    import transformers

    model_type, cfg, _, ours, tmp = pair
    out = llmarch.hf.save(ours, tmp / "saved")
    reloaded = getattr(transformers, TOWERS[model_type][0]).from_pretrained(out, dtype=torch.float32).eval()
    assert reloaded.config.model_type == model_type
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        close(ours(x).last_hidden_state, reloaded(pixel_values=x).last_hidden_state)
    assert_same_weights(ours, llmarch.hf.load(out))


@pytest.mark.parametrize("name", ["clip-vit-tiny", "siglip-tiny"])
def test_tower_flops_and_params_match_the_module(name):
    from torch.utils.flop_counter import FlopCounterMode

    from llmarch.analysis import count_params
    from llmarch.analysis.vision import tower_flops
    from llmarch.nn.kernels import KERNELS

    cfg = llmarch.preset(name)
    tower = llmarch.build(cfg).eval()
    assert count_params(cfg).total == sum(p.numel() for p in tower.parameters())
    for m in tower.modules():  # the reference kernel's matmuls are visible to the counter (SDPA's on CPU are not)
        if hasattr(m, "kernel"):
            m.kernel = KERNELS["naive"]
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        tower(torch.randn(1, cfg.channels, cfg.image_size, cfg.image_size))
    assert tower_flops(cfg) == counter.get_total_flops()
