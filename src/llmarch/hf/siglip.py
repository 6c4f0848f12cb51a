"""model_type "siglip_vision_model": SigLIP's image encoder (Zhai et al. 2023) as transformers'
SiglipVisionModel — no class token, a bias on the patch convolution, a LayerNorm on every final position and
(``vision_use_head``) multi-head attention pooling with a learned probe."""
from __future__ import annotations

from llmarch.hf.base import FAMILIES
from llmarch.hf.clip import SIGLIP_FIXED, VisionFamily


@FAMILIES.register("siglip_vision_model")
class SiglipVision(VisionFamily):
    model_type, architecture = "siglip_vision_model", "SiglipVisionModel"
    fixed = SIGLIP_FIXED
    # transformers' SiglipVisionConfig defaults (base, patch 16, 224)
    defaults = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                    num_channels=3, image_size=224, patch_size=16, hidden_act="gelu_pytorch_tanh",
                    layer_norm_eps=1e-6)
    ignore = (r"embeddings\.position_ids$",)  # an index buffer older checkpoints stored

    def pool_from_hf(self, hf):
        return dict(pool="attention" if hf.get("vision_use_head", True) else "none")

    def extra(self, cfg):
        return dict(vision_use_head=cfg.pool == "attention")

    def accepts(self, cfg):
        if cfg.pool == "class_token":
            return "siglip_vision_model pools with attention (vision_use_head) or not at all"
        return super().accepts(cfg)
