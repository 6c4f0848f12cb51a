"""The fusions share one protocol (every ``vision.fusion`` entry answers Fusion's hooks and no others); a per-token
image mask is refused by fusions that have none; a tiled tower reads list-valued feature layers beside its
intermediate layers (width Dv x (selected + intermediate)); train --images refuses tiled towers in one line."""
import pytest
import torch

import llmarch
from llmarch.analysis import count_params
from llmarch.cli import main
from llmarch.nn.vision import FUSIONS
from llmarch.nn.vision.fusion import Fusion


def test_every_fusion_implements_the_one_protocol():
    hooks = {name for name in vars(Fusion) if not name.startswith("_")}
    assert {"enter", "place", "cross_for", "block_for", "text_tokens", "check", "feature_norm"} <= hooks
    for key in ("projector", "cross_attention", "cross_blocks", "joint"):
        cls = FUSIONS[key]
        assert issubclass(cls, Fusion)
        extra = {name for name in vars(cls) if not name.startswith("_")} - hooks
        assert not extra, f"fusion {key!r} adds hooks outside the protocol: {extra}"


@pytest.mark.parametrize("name", ["llava-tiny-xattn", "llava-tiny-joint"])
def test_fusions_without_a_token_mask_refuse_one(name):
    cfg = llmarch.preset(name)
    model = llmarch.build(cfg).eval()
    v = cfg.vision
    ids = torch.randint(0, 200, (1, 6))
    with pytest.raises(ValueError, match="cross_attention_mask: only vision.fusion='cross_blocks'"):
        model(ids, pixel_values=torch.randn(1, 3, v.image_size, v.image_size),
              cross_attention_mask=torch.ones(1, 6, 1, 1))


def test_tiled_tower_reads_feature_layers_and_intermediate_layers():
    base = llmarch.preset("mllama-tiny")
    cfg = base.replace(vision=base.vision.replace(feature_layers=(-1, 2)))  # last global block, local block 2
    v = cfg.vision
    assert v.selected_layers == (5, 2) and v.feature_depth == 5
    assert v.feature_dim == v.d_model * (2 + len(v.intermediate_layers)) == 128
    torch.manual_seed(0)
    model = llmarch.build(cfg).eval()
    assert model.projector.proj_in.in_features == 128
    assert count_params(cfg).total == sum(p.numel() for p in model.parameters())
    pixels = torch.randn(1, 2, 3, v.image_size, v.image_size)
    ratio, tiles = torch.tensor([2]), torch.tensor([[1, 1]])
    with torch.no_grad():
        s = model.vision(pixels, ratio, tiles).hidden_states  # every state, [1, 2 tiles x 24 padded, 32]
        naive = torch.cat([s[5], s[2]] + [torch.stack([s[1][..., d], s[3][..., d]], -1) for d in range(32)], -1)
        naive = naive.view(1, 2, 24, 128)[:, :, :17].reshape(1, 34, 128)  # padding dropped, class tokens kept
        assert torch.equal(model.vision.features(pixels, ratio, tiles), naive)
        ids = torch.tensor([[1, 256, 5, 6]])
        out = model(ids, pixel_values=pixels[:, None], aspect_ratio_ids=ratio[:, None],
                    aspect_ratio_mask=tiles[:, None], cross_attention_mask=torch.ones(1, 4, 1, 2))
    assert out.logits.shape == (1, 4, cfg.vocab_size)
    assert llmarch.ModelConfig.from_dict(cfg.to_dict()) == cfg


def test_train_images_refuses_a_tiled_tower(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--preset", "mllama-tiny", "--images", "digits", "--steps", "1", "--out", str(out),
                 "--no-progress"]) != 0
    err = capsys.readouterr().err
    assert "vision.positions" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
