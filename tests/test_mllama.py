"""Llama 3.2 Vision exact vs transformers' MllamaForConditionalGeneration (tiny, random): logits on a padded batch
of rows with different image counts and tile layouts (aspect-ratio ids and masks, per-token cross-attention masks
with rows that see no image), greedy generation, cached decoding against the full forward, save round trip, and
the 11B preset's parameter count against transformers' model of the same config."""
import json

import pytest
import torch

import llmarch
from llmarch.hf.io import family
from tests.hf_util import TOL, assert_close_at, assert_same_weights, hf_logits, make_hf_model

IMAGE = 256  # mllama-tiny's image token (the first row past the 256-word vocabulary)


def mllama_batch(cfg, seed: int = 0, T: int = 12):
    """Left-padded rows (row 0: two images, 1 and 2 tiles; row 1: one 2-tile image and a padding image), their
    masks, and the cross-attention mask: tokens before a row's first image token see no tile, later ones see the
    real tiles of the images met so far."""
    v = cfg.vision
    g = torch.Generator().manual_seed(seed)
    lengths, image_at = (T, T - 3), ((2, 5), (1,))
    ids = torch.zeros(2, T, dtype=torch.long)
    mask = torch.zeros_like(ids)
    cross = torch.zeros(2, T, 2, v.max_num_tiles, dtype=torch.long)
    tiles = torch.tensor([[[1, 0], [1, 1]], [[1, 1], [1, 0]]])  # aspect_ratio_mask [B, images, tiles]
    for b, (n, at) in enumerate(zip(lengths, image_at)):
        start = T - n
        ids[b, start:] = torch.randint(0, cfg.vocab_size, (n,), generator=g)
        mask[b, start:] = 1
        for j, a in enumerate(at):
            ids[b, start + a] = IMAGE
            cross[b, start + a:, j] = tiles[b, j]
    pixels = torch.randn(2, 2, v.max_num_tiles, v.channels, v.image_size, v.image_size, generator=g)
    ratio_ids = torch.tensor([[1, 2], [3, 0]])  # (1, 1), (1, 2); (2, 1), padding image
    return ids, mask, dict(pixel_values=pixels, aspect_ratio_ids=ratio_ids, aspect_ratio_mask=tiles,
                           cross_attention_mask=cross)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    cfg = llmarch.preset("mllama-tiny")
    tmp = tmp_path_factory.mktemp("mllama")
    hf_model, path = make_hf_model(cfg, "mllama", tmp, model_class="MllamaForConditionalGeneration")
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():  # scalar gates near +-1, where tanh(g) and g differ: the gating math is then tested
        for name, p in hf_model.named_parameters():
            if "gate" in name and p.numel() == 1:
                p.copy_((torch.rand(1, generator=g) + 0.5) * (1 if torch.rand(1, generator=g) < 0.5 else -1))
    hf_model.save_pretrained(path)
    return cfg, hf_model, llmarch.hf.load(path).eval(), tmp


def test_config_round_trip(pair):
    cfg, _, ours, _ = pair
    assert ours.config == cfg
    assert llmarch.hf.io.family("mllama").fits(cfg) is None


def test_logits_match_with_tiles_and_padded_text(pair):
    cfg, hf_model, ours, _ = pair
    ids, mask, images = mllama_batch(cfg)
    with torch.no_grad():
        mine = ours(ids, attention_mask=mask, **images).logits
        other = ours(ids, attention_mask=mask, **{**images, "pixel_values": images["pixel_values"].flip(1)}).logits
        text_only = ours(ids, attention_mask=mask).logits
        unmasked = {**images, "cross_attention_mask": None}  # every token sees every tile
        no_cross_mask = ours(ids, attention_mask=mask, **unmasked).logits
    assert_close_at(mine, hf_logits(hf_model, ids, mask, **images), mask)
    assert_close_at(text_only, hf_logits(hf_model, ids, mask), mask)
    assert_close_at(no_cross_mask, hf_logits(hf_model, ids, mask, **unmasked), mask)
    assert (mine[:, -1] - other[:, -1]).abs().max() > 1e-3  # the images matter
    # a token that sees no tile: its attention output is kept, its FFN branch is zeroed (as transformers does)
    assert (mine[0, 0] - text_only[0, 0]).abs().max() > 1e-4


def test_greedy_generation_with_images_matches(pair):
    cfg, hf_model, ours, _ = pair
    ids, mask, images = mllama_batch(cfg, seed=3)
    theirs = hf_model.generate(input_ids=ids, attention_mask=mask, **images, max_new_tokens=10, do_sample=False,
                               pad_token_id=0, eos_token_id=None)
    mine = llmarch.generate(ours, ids, attention_mask=mask, max_new_tokens=10, **images)
    assert torch.equal(mine, theirs), f"generations differ\n{mine}\n{theirs}"


def test_cached_decoding_equals_full_forward(pair):
    cfg, _, ours, _ = pair
    ids, mask, images = mllama_batch(cfg, seed=7)
    k = ids.shape[1] - 3
    with torch.no_grad():
        full = ours(ids, attention_mask=mask, **images).logits
        cache = ours.new_cache()
        prefill = {**images, "cross_attention_mask": images["cross_attention_mask"][:, :k]}
        steps = [ours(ids[:, :k], attention_mask=mask[:, :k], cache=cache, **prefill).logits[:, -1]]
        features = cache.memory.states
        for t in range(k, ids.shape[1]):  # no pixel values, no mask: the cached image and the last mask row
            steps.append(ours(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], cache=cache).logits[:, -1])
    assert cache.memory.states is features  # image features computed once
    cached = torch.stack(steps, dim=1)
    assert (cached - full[:, k - 1:]).abs().max() <= TOL[torch.float32]


def test_save_reloads_in_transformers(pair):
    import transformers

    cfg, _, ours, tmp = pair
    out = llmarch.hf.save(ours, tmp / "saved")
    reloaded = transformers.MllamaForConditionalGeneration.from_pretrained(out, dtype=torch.float32).eval()
    ids, mask, images = mllama_batch(cfg, seed=5)
    with torch.no_grad():
        mine = ours(ids, attention_mask=mask, **images).logits
    assert_close_at(mine, hf_logits(reloaded, ids, mask, **images), mask)
    assert_same_weights(ours, llmarch.hf.load(out))


def test_cross_blocks_at_zero_gates_leave_the_text_model_unchanged():
    torch.manual_seed(0)
    cfg = llmarch.preset("mllama-tiny")
    model = llmarch.build(cfg).eval()  # cross-block gates start at zero
    ids, mask, images = mllama_batch(cfg, seed=9)
    with torch.no_grad():
        with_images = model(ids, attention_mask=mask, **images).logits
        text_only = model(ids, attention_mask=mask).logits
        assert torch.equal(with_images[mask.bool()], text_only[mask.bool()])
        model.decoder.layers[1].attn_gate.fill_(0.5)
        opened = model(ids, attention_mask=mask, **images).logits
    assert (opened - text_only)[mask.bool()].abs().max() > 1e-3


def test_bad_image_inputs_name_the_field():
    cfg = llmarch.preset("mllama-tiny")
    model = llmarch.build(cfg).eval()
    ids, mask, images = mllama_batch(cfg)
    for bad in (None, images["aspect_ratio_ids"] + 9, images["aspect_ratio_ids"][:1]):
        with pytest.raises(ValueError, match="aspect_ratio_ids"):
            model(ids, attention_mask=mask, **{**images, "aspect_ratio_ids": bad})
    with pytest.raises(ValueError, match="aspect_ratio_mask"):
        model(ids, attention_mask=mask, **{**images, "aspect_ratio_mask": images["aspect_ratio_mask"][:, :1]})
    with pytest.raises(ValueError, match="cross_attention_mask"):
        model(ids, attention_mask=mask, **{**images, "cross_attention_mask": images["cross_attention_mask"][:, :, :1]})
    with pytest.raises(ValueError, match="pixel_values"):
        model(ids, attention_mask=mask, **{**images, "pixel_values": images["pixel_values"][:, :, :1]})


def test_11b_preset_count_equals_transformers(tmp_path):
    import transformers

    cfg = llmarch.preset("llama-3.2-11b-vision")
    (tmp_path / "config.json").write_text(json.dumps(family("mllama").from_config(cfg)))
    with torch.device("meta"):
        theirs = transformers.MllamaForConditionalGeneration(transformers.AutoConfig.from_pretrained(tmp_path))
    ours = llmarch.build(cfg, device="meta")
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())
    assert llmarch.hf.config_from_hf(tmp_path) == cfg


def test_analysis_counts_and_tower_flops_are_exact():
    from torch.utils.flop_counter import FlopCounterMode

    from llmarch.analysis import count_params
    from llmarch.analysis.vision import tower_flops
    from llmarch.nn.kernels import KERNELS

    cfg = llmarch.preset("mllama-tiny")
    assert count_params(cfg).total == sum(p.numel() for p in llmarch.build(cfg, device="meta").parameters())
    v = cfg.vision
    tower = llmarch.build(v).eval()
    assert count_params(v).total == sum(p.numel() for p in tower.parameters())
    for m in tower.modules():  # the reference kernel's matmuls are visible to the counter
        if hasattr(m, "kernel"):
            m.kernel = KERNELS["naive"]
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        tower(torch.randn(1, 2, 3, v.image_size, v.image_size), torch.tensor([2]), torch.tensor([[1, 1]]))
    assert tower_flops(v) == counter.get_total_flops()


def test_generate_cli_tiles_an_image_for_cross_blocks(tmp_path, capsys):
    from PIL import Image, ImageDraw

    from llmarch.cli import main
    from llmarch.image_tiles import TiledImageProcessor, cross_attention_mask

    path = tmp_path / "wide.png"
    im = Image.new("RGB", (60, 30), "white")
    ImageDraw.Draw(im).ellipse((5, 5, 25, 25), fill="red")
    im.save(path)
    assert main(["generate", "--preset", "mllama-tiny", "--image", str(path), "--prompt", "1 2 3",
                 "--max-new-tokens", "4", "--temperature", "0", "--no-stream"]) == 0
    printed = [int(t) for t in capsys.readouterr().out.split()]
    torch.manual_seed(0)  # the CLI's default seed, before it builds the preset
    model = llmarch.build(llmarch.preset("mllama-tiny")).eval()
    ids = [IMAGE, 1, 2, 3]  # one image token per image, leading the prompt
    images = TiledImageProcessor(size={"height": 28, "width": 28}, max_image_tiles=2)([[im]])
    assert images["num_tiles"] == [[2]]  # a wide image takes both tiles
    cross = cross_attention_mask([ids], IMAGE, images["num_tiles"], 2)
    want = llmarch.generate(model, torch.tensor([ids]), max_new_tokens=4, pixel_values=images["pixel_values"],
                            aspect_ratio_ids=images["aspect_ratio_ids"], aspect_ratio_mask=images["aspect_ratio_mask"],
                            cross_attention_mask=cross)
    assert printed == want[0].tolist()


def test_checkpoint_generates_with_an_image_like_transformers(tmp_path, capsys):
    """CLI --checkpoint --image against transformers: its image processor, the processor's cross-attention mask
    and its generate, on one random checkpoint with a tokenizer and a preprocessor_config.json."""
    import transformers
    from PIL import Image, ImageDraw
    from transformers.models.mllama.processing_mllama import (convert_sparse_cross_attention_mask_to_dense,
                                                              get_cross_attention_token_mask)

    from llmarch.cli import main
    from llmarch.infer.chat import Chat
    from llmarch.tokenizer import encode_prompt, load_tokenizer_for, train_tokenizer
    from tests.test_prompt_encoding import write_tokenizer

    bpe = train_tokenizer(["a small red circle on a white page, and a blue square beside it"] * 4, vocab_size=300,
                          special_tokens=["<unk>", "<s>", "</s>"])
    base = llmarch.preset("mllama-tiny")
    V = bpe.vocab_size
    cfg = base.replace(vocab_size=V, bos_token_id=1, vision=base.vision.replace(image_token_id=V))
    hf_model, d = make_hf_model(cfg, "mllama", tmp_path, model_class="MllamaForConditionalGeneration")
    write_tokenizer(bpe, d, {"add_bos_token": True}, template=True)
    theirs_proc = transformers.MllamaImageProcessorPil(size={"height": 28, "width": 28}, max_image_tiles=2)
    theirs_proc.save_pretrained(d)
    path = tmp_path / "tall.png"
    im = Image.new("RGB", (20, 50), "white")
    ImageDraw.Draw(im).rectangle((2, 30, 15, 45), fill="blue")
    im.save(path)
    prompt = "a small red"
    ids = encode_prompt(load_tokenizer_for(d), prompt)
    ids = ids[:1] + [V] + ids[1:]  # BOS, the image token, the text
    images = theirs_proc([[im]], return_tensors="pt")
    cross = convert_sparse_cross_attention_mask_to_dense([get_cross_attention_token_mask(ids, V)],
                                                         images["num_tiles"], 2, len(ids))
    out = hf_model.generate(input_ids=torch.tensor([ids]), pixel_values=images["pixel_values"],
                            aspect_ratio_ids=images["aspect_ratio_ids"], aspect_ratio_mask=images["aspect_ratio_mask"],
                            cross_attention_mask=torch.from_numpy(cross), max_new_tokens=6, do_sample=False,
                            pad_token_id=0, eos_token_id=None)
    new = out[0, len(ids):].tolist()
    new = new[:new.index(2)] if 2 in new else new  # the CLI stops at the tokenizer's EOS
    assert main(["generate", "--checkpoint", str(d), "--image", str(path), "--prompt", prompt,
                 "--max-new-tokens", "6", "--temperature", "0", "--no-stream"]) == 0
    assert capsys.readouterr().out == prompt + load_tokenizer_for(d).decode(new) + "\n"
    chat = Chat(llmarch.hf.load(d), load_tokenizer_for(d), max_new_tokens=3, repetition_penalty=1.3)
    chat.add_image(str(path))  # the image token (past the head's vocabulary) is left out of the penalty
    assert chat.prompt_ids("hi").count(V) == 1 and isinstance(chat.send("hi"), str)
