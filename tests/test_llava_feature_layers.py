"""LLaVA with a list-valued vision_feature_layer (transformers concatenates those hidden states on the feature axis,
each with the class token dropped under the default strategy): logits and greedy generation equal transformers' on
images + left-padded text; the features equal a concatenation written here; configs round-trip; bad lists fail."""
import json

import pytest
import torch

import llmarch
from tests.hf_util import assert_close_at, make_hf_model
from tests.test_llava import hf_logits, multimodal_batch


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    base = llmarch.preset("llava-tiny")
    cfg = base.replace(vision=base.vision.replace(feature_layers=(0, -2)))
    hf_model, path = make_hf_model(cfg, "llava", tmp_path_factory.mktemp("llava_layers"),
                                   model_class="LlavaForConditionalGeneration")
    return cfg, hf_model, llmarch.hf.load(path).eval(), path


def test_list_feature_layer_reads_and_round_trips(pair):
    cfg, hf_model, ours, path = pair
    assert json.loads((path / "config.json").read_text())["vision_feature_layer"] == [0, -2]
    assert ours.config == cfg and ours.projector.proj_in.in_features == 2 * cfg.vision.d_model
    assert hf_model.model.multi_modal_projector.linear_1.in_features == 2 * cfg.vision.d_model


def test_features_concatenate_the_selected_hidden_states(pair):
    cfg, _, ours, _ = pair
    pixels = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        out = ours.vision(pixels)  # every hidden state, the tower's own forward
        naive = torch.cat([out.hidden_states[0][:, 1:], out.hidden_states[-2][:, 1:]], dim=-1)
        assert torch.equal(ours.vision.features(pixels), naive)


def test_logits_and_generation_match_transformers(pair):
    cfg, hf_model, ours, _ = pair
    ids, mask, pixels = multimodal_batch(cfg, seed=11)
    with torch.no_grad():
        mine = ours(ids, attention_mask=mask, pixel_values=pixels).logits
    assert_close_at(mine, hf_logits(hf_model, ids, mask, pixels), mask)
    theirs = hf_model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=8,
                               do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(llmarch.generate(ours, ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=8),
                       theirs)


def test_bad_feature_layers_name_the_field():
    from llmarch.hf.io import family

    v = llmarch.preset("llava-tiny").vision
    with pytest.raises(ValueError, match="vision.feature_layers"):
        v.replace(feature_layers=(0, 5))
    hf = family("llava").from_config(llmarch.preset("llava-tiny"))
    for bad in ([], ["a"], [0, True]):
        with pytest.raises(ValueError, match="vision_feature_layer"):
            family("llava").to_config(dict(hf, vision_feature_layer=bad))
