"""Vision towers and vision-language models. CLIP ViT-L/14 at 336 px (Radford et al. 2021; the tower of
openai/clip-vit-large-patch14-336), SigLIP so400m/14 at 384 px (Zhai et al. 2023; Alabdulmohsin et al. 2023,
google/siglip-so400m-patch14-384), LLaVA-1.5-7B (Liu et al. 2023b, llava-hf/llava-1.5-7b-hf: Vicuna-7B v1.5 +
that CLIP tower, feature layer -2, class token dropped, GELU MLP projector). Sizes from the released config.json
files; counts are those of transformers' models built from the same files (the towers alone: CLIPVisionModel,
SiglipVisionModel), matching the 7.06B of the LLaVA card."""
from llmarch.presets import register
from llmarch.presets.llama import LLAMA2
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
