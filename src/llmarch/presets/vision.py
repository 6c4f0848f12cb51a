"""Vision towers and vision-language models. CLIP ViT-L/14 at 336 px (Radford et al. 2021; the tower of
openai/clip-vit-large-patch14-336), SigLIP so400m/14 at 384 px (Zhai et al. 2023; Alabdulmohsin et al. 2023,
google/siglip-so400m-patch14-384), LLaVA-1.5-7B (Liu et al. 2023b, llava-hf/llava-1.5-7b-hf: Vicuna-7B v1.5 +
that CLIP tower, feature layer -2, class token dropped, GELU MLP projector). Sizes from the released config.json
files; counts are those of transformers' models built from the same files (the towers alone: CLIPVisionModel,
SiglipVisionModel), matching the 7.06B of the LLaVA card."""
from llmarch.presets import register
from llmarch.presets.llama import LLAMA2, LLAMA3
from llmarch.vision_config import VisionConfig

CLIP = dict(class_token=True, pre_norm=True, post_norm="pooled", pool="class_token", patch_bias=False,
            activation="quick_gelu", norm_eps=1e-5)
SIGLIP = dict(class_token=False, pre_norm=False, post_norm="all", pool="attention", patch_bias=True,
              activation="gelu_tanh", norm_eps=1e-6)
CLIP_L_336 = dict(CLIP, image_size=336, patch_size=14, d_model=1024, n_layers=24, n_heads=16, d_ff=4096)
CLIP_TINY = dict(CLIP, image_size=16, patch_size=4, d_model=32, n_layers=2, n_heads=4, d_ff=64)

register("clip-vit-large-patch14-336", CLIP_L_336, 303_507_456, cls=VisionConfig)
register("siglip-so400m", dict(SIGLIP, image_size=384, patch_size=14, d_model=1152, n_layers=27, n_heads=16,
                               d_ff=4304), 428_225_600, cls=VisionConfig)
register("clip-vit-tiny", CLIP_TINY, cls=VisionConfig)
register("siglip-tiny", dict(SIGLIP, image_size=16, patch_size=4, d_model=32, n_layers=2, n_heads=4, d_ff=64),
         cls=VisionConfig)

# LLaVA-1.5: the image token is id 32000 of a 32064-row table (pad 32001); 576 image tokens per 336 px image.
register("llava-1.5-7b", dict(LLAMA2, vocab_size=32064, d_model=4096, n_layers=32, n_heads=32, d_ff=11008,
                              pad_token_id=32001,
                              vision=dict(CLIP_L_336, feature_layer=-2, feature_select="default",
                                          fusion="projector", projector_activation="gelu", image_token_id=32000)),
         7_063_427_072)
LLAVA_TINY_TEXT = dict(LLAMA2, vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128,
                       max_seq_len=256, bos_token_id=None, eos_token_id=None)
register("llava-tiny", dict(LLAVA_TINY_TEXT, vision=dict(CLIP_TINY, feature_layer=-2, image_token_id=255)))
# the same parts fused by tanh-gated cross-attention in decoder layer 1 (Flamingo-style; no image tokens needed)
register("llava-tiny-xattn", dict(LLAVA_TINY_TEXT, vision=dict(CLIP_TINY, feature_layer=-2, fusion="cross_attention",
                                                               cross_layers=(1,))))
# ... or by joint layers: both decoder layers run over [image features; text] (images a bidirectional prefix)
register("llava-tiny-joint", dict(LLAVA_TINY_TEXT, vision=dict(CLIP_TINY, feature_layer=-2, fusion="joint",
                                                               cross_layers=(0, 1))))

# Llama 3.2 11B Vision (meta-llama/Llama-3.2-11B-Vision config.json): Llama 3.1 8B text with 8 gated
# cross-attention blocks in place of layers 3, 8, ..., 38 (40 layers), 8 extra embedding rows (image token
# 128256); a tiled ViT-H/14 at 560 px (4 tiles, 32 local + 8 gated global blocks, 5 intermediate states ->
# 7680-wide features) and one linear projector. The count is transformers' MllamaForConditionalGeneration
# built from that config (10.67B; the card rounds it to 10.6B).
MLLAMA_TOWER = dict(class_token=True, pre_norm=True, post_norm="local", pool="none", patch_bias=False,
                    positions="gated_tiles", pad_to=8, attn_bias=False, feature_layer=-1, feature_select="full",
                    activation="gelu", norm_eps=1e-5, fusion="cross_blocks", projector="linear", extra_token_rows=8)
register("llama-3.2-11b-vision", dict(
    LLAMA3, d_model=4096, n_layers=40, n_heads=32, n_kv_heads=8, d_ff=14336, max_seq_len=131072,
    eos_token_id=128001, pad_token_id=128004,
    rope=dict(theta=500000.0, scaling="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
              original_max_seq_len=8192),
    vision=dict(MLLAMA_TOWER, image_size=560, patch_size=14, d_model=1280, n_layers=32, n_heads=16, d_ff=5120,
                max_num_tiles=4, global_layers=8, intermediate_layers=(4, 8, 16, 24, 31), image_token_id=128256,
                cross_layers=(3, 8, 13, 18, 23, 28, 33, 38))), 10_670_220_835)
# tiny: 2 tiles of 28 px (4 x 4 patches of 7 + class token, padded 17 -> 24), cross-attention block in layer 1
register("mllama-tiny", dict(LLAVA_TINY_TEXT, n_layers=3, norm_eps=1e-5, rope=dict(theta=500000.0), bos_token_id=1,
                             vision=dict(MLLAMA_TOWER, image_size=28, patch_size=7, d_model=32, n_layers=3, n_heads=4,
                                         d_ff=64, max_num_tiles=2, global_layers=2, intermediate_layers=(1, 3),
                                         image_token_id=256, cross_layers=(1,))))
