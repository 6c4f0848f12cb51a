"""model_type "llava": LLaVA (Liu et al. 2023) as transformers' LlavaForConditionalGeneration — a CLIP or SigLIP
tower, a two-layer MLP projector and a llama-like text model whose image-token slots take the projected features.
The text and vision halves are translated by their own families; this one nests and prefixes them. Files use
``language_model.model.*`` / ``language_model.lm_head`` / ``vision_tower.*`` / ``multi_modal_projector.*`` (what
transformers 5 writes); the in-memory layout (``model.language_model.*``) and older ``vision_tower.vision_model.*``
names are renamed on load."""
from __future__ import annotations

import dataclasses
import re
from typing import Any

from llmarch.config import ModelConfig
from llmarch.hf.base import FAMILIES, Family, activation_from_hf, activation_to_hf
from llmarch.hf.clip import linear
from llmarch.hf.convert import Rule

# transformers' LlamaConfig defaults, for text configs that list only what differs (llava-1.5's do)
LLAMA_DEFAULTS = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, max_position_embeddings=2048)
TEXT_TYPES = ("llama", "mistral", "qwen2")
VISION_TYPES = ("clip_vision_model", "siglip_vision_model")
RENAMES = ((r"^model\.language_model\.", "language_model.model."), (r"^lm_head\.", "language_model.lm_head."),
           (r"^model\.vision_tower\.", "vision_tower."), (r"^model\.multi_modal_projector\.", "multi_modal_projector."),
           (r"^vision_tower\.vision_model\.", "vision_tower."))


def prefixed(rules: list[Rule], ours: str, theirs) -> list[Rule]:
    """The rules with ``ours`` before our names and ``theirs(name)`` for each checkpoint name."""
    return [dataclasses.replace(r, ours=ours + r.ours, theirs=tuple(theirs(t) for t in r.theirs)) for r in rules]


def renamed(tensors: dict, renames) -> dict:
    """``tensors`` with each name rewritten by the (regex, replacement) pairs of ``renames``, in order."""
    out = {}
    for name, t in tensors.items():
        for pattern, new in renames:
            name = re.sub(pattern, new, name)
        out[name] = t
    return out


def text_name(name: str) -> str:
    return "language_model." + name if name.startswith("lm_head") else "language_model.model." + name


@FAMILIES.register("llava")
class Llava(Family):
    model_type, architecture = "llava", "LlavaForConditionalGeneration"
    takes_images = True

    def halves(self, cfg: ModelConfig) -> tuple[Family, Family]:
        """The text family and the tower family that represent ``cfg``'s two halves."""
        text = next((FAMILIES[n]() for n in TEXT_TYPES if FAMILIES[n]().fits(cfg.replace(vision=None)) is None),
                    FAMILIES["llama"]())
        vision = next((FAMILIES[n]() for n in VISION_TYPES if FAMILIES[n]().fits(cfg.vision) is None),
                      FAMILIES["clip_vision_model"]())
        return text, vision

    def to_config(self, hf):
        text_hf, vision_hf = dict(hf.get("text_config") or {}), dict(hf.get("vision_config") or {})
        text_type = text_hf.setdefault("model_type", "llama")
        if text_type not in TEXT_TYPES:
            raise ValueError(f"config.json text_config.model_type={text_type!r}: llava is supported with a "
                             "llama, mistral or qwen2 text model")
        if text_type == "llama":
            text_hf = {**LLAMA_DEFAULTS, **text_hf}
        vision_type = vision_hf.setdefault("model_type", "clip_vision_model")
        if vision_type not in VISION_TYPES:
            raise ValueError(f"config.json vision_config.model_type={vision_type!r}: supported are "
                             "clip_vision_model and siglip_vision_model")
        layer = hf.get("vision_feature_layer", -2)
        many = isinstance(layer, (list, tuple))  # several hidden states, concatenated on the feature axis
        ints = [i for i in (layer if many else [layer]) if isinstance(i, int) and not isinstance(i, bool)]
        if not ints or len(ints) != (len(layer) if many else 1):
            raise ValueError(f"config.json vision_feature_layer={layer!r}: expected a layer index or a non-empty "
                             "list of them")
        vision = FAMILIES[vision_type]().to_config(vision_hf).replace(
            feature_layer=-2 if many else layer, feature_layers=tuple(layer) if many else (),
            feature_select=hf.get("vision_feature_select_strategy", "default"),
            projector_activation=activation_from_hf(hf.get("projector_hidden_act", "gelu"), "projector_hidden_act"),
            projector_bias=bool(hf.get("multimodal_projector_bias", True)), fusion="projector",
            image_token_id=hf.get("image_token_index", hf.get("image_token_id", 32000)))
        text = FAMILIES[text_type]().to_config(text_hf)
        return text.replace(vision=vision)

    def from_config(self, cfg):
        text, vision = self.halves(cfg)
        v = cfg.vision
        text_hf = {k: val for k, val in text.from_config(cfg.replace(vision=None)).items() if k != "architectures"}
        vision_hf = {k: val for k, val in vision.from_config(v).items() if k != "architectures"}
        return dict(model_type=self.model_type, architectures=[self.architecture], text_config=text_hf,
                    vision_config=vision_hf, image_token_index=v.image_token_id,
                    projector_hidden_act=activation_to_hf(v.projector_activation),
                    vision_feature_select_strategy=v.feature_select,
                    vision_feature_layer=list(v.feature_layers) if v.feature_layers else v.feature_layer,
                    image_seq_length=v.image_tokens, multimodal_projector_bias=v.projector_bias,
                    tie_word_embeddings=cfg.tie_embeddings)

    def accepts(self, cfg):
        v = cfg.vision
        if v.fusion != "projector":
            return f"llava fuses with a projector, config has vision.fusion={v.fusion!r}"
        reasons = [FAMILIES[n]().fits(v) for n in VISION_TYPES]
        if all(reasons):
            return f"the vision tower fits no transformers tower: {reasons}"
        reasons = [FAMILIES[n]().fits(cfg.replace(vision=None)) for n in TEXT_TYPES]
        return f"the text model fits no llava text model: {reasons}" if all(reasons) else None

    def rename(self, tensors):
        return renamed(tensors, RENAMES)

    def ignore_for(self, cfg):
        text, vision = self.halves(cfg)
        tied = (r"^language_model\.lm_head\.weight$",) if cfg.tie_embeddings else ()
        # the text and tower buffers their families skip (rotary tables, position ids)
        return tuple(p.lstrip("^") for p in text.ignore + vision.ignore) + tied

    def rules(self, cfg):
        text, vision = self.halves(cfg)
        v = cfg.vision
        rules = prefixed(list(text.rules(cfg.replace(vision=None))), "", text_name)
        rules += prefixed(list(vision.rules(v)), "vision.", lambda n: "vision_tower." + n)
        projector = linear("projector.proj_in", "multi_modal_projector.linear_1")
        projector += linear("projector.proj_out", "multi_modal_projector.linear_2")
        return rules + [r for r in projector if v.projector_bias or r.ours.endswith("weight")]

    def model_prefix(self) -> str:
        return ""
