"""model_type "dpr": the question and context encoders of DPR (Karpukhin et al. 2020), each a BERT encoder without
pooler whose output is the final hidden state of [CLS] (our ``first_token`` head). The two differ only in their
weight prefix (``question_encoder.bert_model.`` / ``ctx_encoder.bert_model.``); loading accepts either, saving
writes a question encoder under "dpr" and a context encoder under "dpr-context"
(``llmarch.hf.save(model, path, model_type="dpr-context")``). Projections (``projection_dim`` > 0) and the reader
are not supported."""
from __future__ import annotations

from llmarch.hf.base import FAMILIES
from llmarch.hf.bert import BertLike


@FAMILIES.register("dpr")
class DPRQuestion(BertLike):
    model_type, architecture = "dpr", "DPRQuestionEncoder"
    heads = {"first_token": "DPRQuestionEncoder"}
    default_head = "first_token"
    prefixes = ("question_encoder.bert_model.", "ctx_encoder.bert_model.")
    top_level = ()
    # embeddings.position_ids: an index buffer older checkpoints stored
    ignore = (r"embeddings\.position_ids$",)

    def to_config(self, hf):
        if hf.get("projection_dim", 0):
            raise ValueError(f"config.json projection_dim={hf['projection_dim']}: DPR encoders with an output "
                             "projection are not supported (only projection_dim=0, as in the released models)")
        return super().to_config(dict(hf, architectures=[self.architecture])).replace(head="first_token")

    def from_config(self, cfg):
        out = super().from_config(cfg)
        out.update(projection_dim=0, architectures=[self.architecture])
        return out

    def accepts_variant(self, cfg):
        if cfg.position_offset != 0:
            return "dpr positions start at 0 (position_offset=0)"
        return None

    def head_rules(self, cfg):
        return []  # the [CLS] state has no parameters of its own


@FAMILIES.register("dpr-context")
class DPRContext(DPRQuestion):
    architecture = "DPRContextEncoder"
    heads = {"first_token": "DPRContextEncoder"}
    prefixes = ("ctx_encoder.bert_model.", "question_encoder.bert_model.")
