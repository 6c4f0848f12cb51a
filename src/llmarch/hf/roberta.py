"""model_type "roberta": BERT's encoder with positions counted from ``pad_token_id + 1`` (padding is skipped), one
token type, and its own LM head (dense -> GELU -> LayerNorm -> tied decoder + bias). Heads: RobertaForMaskedLM,
RobertaForSequenceClassification."""
from __future__ import annotations

from llmarch.hf.base import FAMILIES
from llmarch.hf.bert import BertLike, linear, output_bias
from llmarch.hf.convert import rule


@FAMILIES.register("roberta")
class Roberta(BertLike):
    model_type, architecture = "roberta", "RobertaForMaskedLM"
    heads = {"mlm": "RobertaForMaskedLM", "classification": "RobertaForSequenceClassification"}
    prefixes = ("roberta.",)
    top_level = ("lm_head.", "classifier.")
    # lm_head.decoder.*: copies of the word embeddings and of lm_head.bias (tied) in older files;
    # embeddings.position_ids: an index buffer older checkpoints stored
    ignore = (r"^lm_head\.decoder\.(weight|bias)$", r"embeddings\.position_ids$")

    def ignore_for(self, cfg):
        if cfg.head == "mlm":  # released RoBERTa checkpoints carry a pooler the LM head does not use
            return self.ignore + (r"^pooler\.",)
        return self.ignore

    def position_offset(self, hf):
        pad = hf.get("pad_token_id", 1)
        return pad + 1

    def to_config(self, hf):
        cfg = super().to_config(hf)
        if cfg.head == "mlm" and cfg.activation != "gelu":
            raise ValueError(f"config.json hidden_act={hf.get('hidden_act')!r}: the roberta LM head always uses "
                             "exact gelu, so only hidden_act='gelu' is supported")
        return cfg

    def accepts_variant(self, cfg):
        if cfg.pad_token_id is None or cfg.position_offset != cfg.pad_token_id + 1:
            return "roberta counts positions from pad_token_id + 1 (set pad_token_id and position_offset to it + 1)"
        if cfg.head == "mlm" and cfg.activation != "gelu":
            return "the roberta LM head uses exact gelu: needs activation='gelu'"
        return None

    def head_rules(self, cfg):
        if cfg.head == "classification":
            return linear("lm_head.pooler.dense", "classifier.dense") + linear("lm_head.out", "classifier.out_proj")
        rules = (linear("lm_head.dense", "lm_head.dense") + linear("lm_head.norm", "lm_head.layer_norm")
                 + [output_bias("lm_head.decoder.bias", "lm_head.decoder.bias", "lm_head.bias", cfg.tie_embeddings)])
        if not cfg.tie_embeddings:
            rules.append(rule("lm_head.decoder.weight", "lm_head.decoder.weight"))
        return rules
