"""model_type "clip_vision_model": CLIP's image encoder (Radford et al. 2021) as transformers' CLIPVisionModel —
class token, pre-norm on the embeddings, post-norm on the pooled class token, quick_gelu MLPs. Older files nest
everything under ``vision_model.`` (stripped on load). ``vision_rules`` and ``vision_from_hf`` are shared with
SigLIP and with the LLaVA family, which embeds either tower."""
from __future__ import annotations

from typing import Any

from llmarch.hf.base import FAMILIES, Family, activation_from_hf, activation_to_hf
from llmarch.hf.convert import cat_rows, rule, split_rows
from llmarch.vision_config import VisionConfig

# the tower layout each model type fixes (the rest comes from config.json)
CLIP_FIXED = dict(class_token=True, pre_norm=True, post_norm="pooled", pool="class_token", patch_bias=False)
SIGLIP_FIXED = dict(class_token=False, pre_norm=False, post_norm="all", patch_bias=True)


def vision_from_hf(hf: dict[str, Any], defaults: dict[str, Any], fixed: dict[str, Any]) -> VisionConfig:
    """A VisionConfig from a vision config.json; absent keys take transformers' defaults (``defaults``)."""
    get = lambda k: hf.get(k, defaults[k])  # noqa: E731
    return VisionConfig(**fixed, image_size=get("image_size"), patch_size=get("patch_size"),
                        channels=get("num_channels"), d_model=get("hidden_size"), n_layers=get("num_hidden_layers"),
                        n_heads=get("num_attention_heads"), d_ff=get("intermediate_size"),
                        activation=activation_from_hf(get("hidden_act")), norm_eps=get("layer_norm_eps"))


def vision_to_hf(v: VisionConfig) -> dict[str, Any]:
    return dict(hidden_size=v.d_model, intermediate_size=v.d_ff, num_hidden_layers=v.n_layers,
                num_attention_heads=v.n_heads, num_channels=v.channels, image_size=v.image_size,
                patch_size=v.patch_size, hidden_act=activation_to_hf(v.activation), layer_norm_eps=v.norm_eps,
                attention_dropout=0.0)


def linear(ours: str, theirs: str) -> list:
    return [rule(f"{ours}.{p}", f"{theirs}.{p}") for p in ("weight", "bias")]


def vision_rules(v: VisionConfig, ours: str = "", theirs: str = "") -> list:
    """Tower parameters ``ours``+name <- checkpoint ``theirs``+name (CLIP and SigLIP share the layer names)."""
    D = v.d_model
    qkv = dict(to_ours=cat_rows, to_theirs=split_rows([D, D, D]), layers=v.n_layers)
    o, t = f"{ours}encoder.layers.{{layer}}.", f"{theirs}encoder.layers.{{layer}}."
    rules = [rule(f"{ours}patches.proj.weight", f"{theirs}embeddings.patch_embedding.weight"),
             rule(f"{ours}patches.positions", f"{theirs}embeddings.position_embedding.weight")]
    if v.patch_bias:
        rules.append(rule(f"{ours}patches.proj.bias", f"{theirs}embeddings.patch_embedding.bias"))
    if v.class_token:
        rules.append(rule(f"{ours}patches.class_token", f"{theirs}embeddings.class_embedding"))
    if v.pre_norm:
        rules += linear(f"{ours}pre_norm", f"{theirs}pre_layrnorm")
    for p in ("weight", "bias"):
        rules.append(rule(f"{o}attn.qkv.{p}", *[f"{t}self_attn.{n}_proj.{p}" for n in "qkv"], **qkv))
        for a, b in (("attn.out", "self_attn.out_proj"), ("attn_norm", "layer_norm1"), ("ffn_norm", "layer_norm2"),
                     ("ffn.up", "mlp.fc1"), ("ffn.down", "mlp.fc2")):
            rules.append(rule(f"{o}{a}.{p}", f"{t}{b}.{p}", layers=v.n_layers))
    if v.post_norm != "none":
        rules += linear(f"{ours}post_norm", f"{theirs}post_layernorm")
    if v.pool == "attention":
        h, p = f"{theirs}head.", f"{ours}pool."
        rules += [rule(f"{p}probe", f"{h}probe"), rule(f"{p}qkv.weight", f"{h}attention.in_proj_weight"),
                  rule(f"{p}qkv.bias", f"{h}attention.in_proj_bias")]
        rules += (linear(f"{p}out", f"{h}attention.out_proj") + linear(f"{p}norm", f"{h}layernorm")
                  + linear(f"{p}mlp.up", f"{h}mlp.fc1") + linear(f"{p}mlp.down", f"{h}mlp.fc2"))
    return rules


def check_fixed(model_type: str, v: VisionConfig, fixed: dict[str, Any]) -> str | None:
    for k, val in fixed.items():
        if getattr(v, k) != val:
            return f"{model_type} needs vision {k}={val!r}, config has {getattr(v, k)!r}"
    return None


class VisionFamily(Family):
    """A vision tower alone: VisionConfig both ways, the tower's rules, no model prefix on save."""

    config_type = VisionConfig
    prefixes = ("vision_model.",)
    fixed: dict[str, Any] = {}
    defaults: dict[str, Any] = {}

    def model_prefix(self) -> str:
        return ""  # transformers 5 writes the tower's names without vision_model.

    # a tower has no LM head: nothing to tie, no score head
    def tie_from_weights(self, cfg, tensors):
        return cfg

    def score_head_from_hf(self, hf, cfg):
        return cfg

    def score_head_to_hf(self, cfg, hf):
        return hf

    def accepts_score_head(self, cfg):
        return None

    def to_config(self, hf):
        return vision_from_hf(hf, self.defaults, self.fixed | self.pool_from_hf(hf))

    def pool_from_hf(self, hf) -> dict[str, Any]:
        return {}

    def from_config(self, cfg):
        return dict(model_type=self.model_type, architectures=[self.architecture], **vision_to_hf(cfg),
                    **self.extra(cfg))

    def extra(self, cfg) -> dict[str, Any]:
        return {}

    def accepts(self, cfg):
        return check_fixed(self.model_type, cfg, self.fixed)

    def rules(self, cfg):
        return vision_rules(cfg)


@FAMILIES.register("clip_vision_model")
class ClipVision(VisionFamily):
    model_type, architecture = "clip_vision_model", "CLIPVisionModel"
    fixed = CLIP_FIXED
    # transformers' CLIPVisionConfig defaults (ViT-B/32)
    defaults = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                    num_channels=3, image_size=224, patch_size=32, hidden_act="quick_gelu", layer_norm_eps=1e-5)
    # embeddings.position_ids: an index buffer older checkpoints stored
    ignore = (r"embeddings\.position_ids$",)
