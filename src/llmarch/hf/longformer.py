"""model_type "longformer": RoBERTa's encoder and LM head (the rules of :mod:`llmarch.hf.roberta`) with sliding
window + global attention (pattern ``longformer``) and a second q/k/v set for the global rows (mixer
``longformer``: ``query_global``/``key_global``/``value_global`` fused into our ``qkv_global``). Head:
LongformerForMaskedLM.

transformers' ``attention_window`` w (even, per layer) spans w/2 keys on each side: our window W = w/2 + 1
(|i - j| < W). It pads the sequence to a multiple of w with masked pad tokens, which changes nothing for the real
tokens, so no padding is needed here. Global tokens come per batch through ``global_attention_mask``.
"""
from __future__ import annotations

from llmarch.hf.base import FAMILIES
from llmarch.hf.convert import cat_rows, rule, split_rows
from llmarch.hf.roberta import Roberta


def window_from_hf(hf) -> int:
    """Our W from ``attention_window`` (an int or one value per layer; all equal, even and > 0)."""
    w = hf.get("attention_window", 512)
    ws = set(w) if isinstance(w, list) else {w}
    if len(ws) != 1:
        raise ValueError(f"config.json attention_window={w}: different windows per layer are not supported; "
                         "use one value for every layer")
    (w,) = ws
    if not isinstance(w, int) or w <= 0 or w % 2:
        raise ValueError(f"config.json attention_window={w} must be a positive even integer")
    return w // 2 + 1


@FAMILIES.register("longformer")
class Longformer(Roberta):
    model_type, architecture = "longformer", "LongformerForMaskedLM"
    heads = {"mlm": "LongformerForMaskedLM"}
    prefixes = ("longformer.",)
    top_level = ("lm_head.",)

    def to_config(self, hf):
        return super().to_config(hf).replace(pattern=("longformer",), window=window_from_hf(hf), mixer="longformer")

    def from_config(self, cfg):
        return dict(super().from_config(cfg), attention_window=[2 * (cfg.window - 1)] * cfg.n_layers)

    def accepts(self, cfg):
        if cfg.pattern != ("longformer",):
            return f"longformer needs pattern=('longformer',), config has {cfg.pattern}"
        if cfg.mixer != "longformer":
            return "longformer projects global rows separately: needs mixer='longformer'"
        if cfg.window is None or cfg.window < 2:
            return f"longformer needs window >= 2 (attention_window = 2 (window - 1)), config has {cfg.window}"
        if cfg.sparse.global_tokens:
            return "longformer takes global tokens per batch (global_attention_mask), not sparse.global_tokens"
        return super().accepts(cfg.replace(pattern=("dense",), mixer="attention", window=None))

    def rules(self, cfg):
        D = cfg.d_model
        e = "encoder.layer.{layer}.attention.self."
        names = ("query_global", "key_global", "value_global")
        return super().rules(cfg) + [
            rule(f"encoder.layers.{{layer}}.attn.qkv_global.{p}", *[f"{e}{n}.{p}" for n in names], to_ours=cat_rows,
                 to_theirs=split_rows([D, D, D])) for p in ("weight", "bias")]
