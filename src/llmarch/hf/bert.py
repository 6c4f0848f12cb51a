"""model_type "bert": a post-norm encoder with learned positions, token types and a LayerNorm on the embeddings;
separate q/k/v (fused into our ``qkv``). The head follows ``architectures``: BertForPreTraining (masked LM + next
sentence), BertForMaskedLM, BertForSequenceClassification. ``BertLike`` is shared with RoBERTa."""
from __future__ import annotations

from typing import Any

from llmarch.config import ModelConfig
from llmarch.hf.base import FAMILIES, Family, activation_from_hf, activation_to_hf, require, tokens_from_hf, \
    tokens_to_hf
from llmarch.hf.convert import cat_rows, rule, split_rows

BERT_FIXED = dict(kind="encoder", norm="layernorm", norm_bias=True, norm_placement="post", ffn="mlp", ffn_bias=True,
                  qkv_bias=True, out_bias=True, position="learned", embed_norm=True, final_norm=False,
                  attn_scale=None, pattern=("dense",), scale_embeddings=False, scale_head=False, head_bias=False,
                  n_decoder_layers=None)


def labels_to_hf(n: int) -> dict[str, Any]:
    return dict(id2label={str(i): f"LABEL_{i}" for i in range(n)}, label2id={f"LABEL_{i}": i for i in range(n)})


class BertLike(Family):
    """Shared by bert and roberta: the same encoder under different prefixes and heads."""

    heads: dict[str, str] = {}  # our head -> HF architecture
    default_head = "mlm"

    def head_from_hf(self, hf: dict[str, Any]) -> str:
        by_arch = {arch: head for head, arch in self.heads.items()}
        for arch in hf.get("architectures") or ():
            if arch in by_arch:
                return by_arch[arch]
        return self.default_head

    def position_offset(self, hf: dict[str, Any]) -> int:
        return 0

    def to_config(self, hf):
        vocab, d, L, H, F, n_pos = require(hf, "vocab_size", "hidden_size", "num_hidden_layers",
                                           "num_attention_heads", "intermediate_size", "max_position_embeddings")
        if hf.get("is_decoder") or hf.get("add_cross_attention"):
            raise ValueError(f"config.json is_decoder / add_cross_attention: only the {self.model_type} encoder "
                             "is supported")
        if hf.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"config.json position_embedding_type={hf['position_embedding_type']!r} is not "
                             "supported (only 'absolute')")
        head = self.head_from_hf(hf)
        n_labels = len(hf.get("id2label") or {}) or int(hf.get("num_labels", 2))
        return ModelConfig(**BERT_FIXED, vocab_size=vocab, d_model=d, n_layers=L, n_heads=H, d_ff=F,
                           max_seq_len=n_pos, norm_eps=hf.get("layer_norm_eps", 1e-12),
                           activation=activation_from_hf(hf.get("hidden_act", "gelu")),
                           type_vocab_size=hf.get("type_vocab_size", 2), position_offset=self.position_offset(hf),
                           dropout=hf.get("hidden_dropout_prob", 0.0),
                           attn_dropout=hf.get("attention_probs_dropout_prob", 0.0),
                           tie_embeddings=bool(hf.get("tie_word_embeddings", True)), head=head,
                           n_labels=n_labels if head == "classification" else 2, **tokens_from_hf(hf, vocab))

    def from_config(self, cfg):
        out = dict(model_type=self.model_type, architectures=[self.heads[cfg.head]], vocab_size=cfg.vocab_size,
                   hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
                   intermediate_size=cfg.d_ff, hidden_act=activation_to_hf(cfg.activation),
                   max_position_embeddings=cfg.max_seq_len, type_vocab_size=cfg.type_vocab_size,
                   layer_norm_eps=cfg.norm_eps, hidden_dropout_prob=cfg.dropout,
                   attention_probs_dropout_prob=cfg.attn_dropout, tie_word_embeddings=cfg.tie_embeddings,
                   **tokens_to_hf(cfg))
        if cfg.head == "classification":
            out.update(labels_to_hf(cfg.n_labels))
        return out

    def accepts(self, cfg):
        for k, v in BERT_FIXED.items():
            if getattr(cfg, k) != v:
                return f"{self.model_type} needs {k}={v!r}, config has {getattr(cfg, k)!r}"
        if cfg.head not in self.heads:
            return f"{self.model_type} has no {cfg.head!r} head; it has {sorted(self.heads)}"
        if cfg.kv_heads != cfg.n_heads or cfg.dh * cfg.n_heads != cfg.d_model:
            return f"{self.model_type} needs multi-head attention with head_dim = d_model / n_heads"
        if cfg.type_vocab_size < 1:
            return f"{self.model_type} always has token-type embeddings (type_vocab_size >= 1)"
        return self.accepts_variant(cfg)

    def accepts_variant(self, cfg) -> str | None:
        return None

    def encoder_rules(self, cfg) -> list:
        D = cfg.d_model
        qkv = dict(to_ours=cat_rows, to_theirs=split_rows([D, D, D]))
        layer, e = "encoder.layers.{layer}.", "encoder.layer.{layer}."
        rules = [rule("embed.tokens.weight", "embeddings.word_embeddings.weight"),
                 rule("embed.token_types.weight", "embeddings.token_type_embeddings.weight"),
                 rule("encoder.positions.weight", "embeddings.position_embeddings.weight"),
                 rule("embed.norm.weight", "embeddings.LayerNorm.weight"),
                 rule("embed.norm.bias", "embeddings.LayerNorm.bias")]
        for p in ("weight", "bias"):
            rules.append(rule(f"{layer}attn.qkv.{p}",
                              *[f"{e}attention.self.{n}.{p}" for n in ("query", "key", "value")], **qkv))
            for ours, theirs in (("attn.out", "attention.output.dense"), ("attn_norm", "attention.output.LayerNorm"),
                                 ("ffn.up", "intermediate.dense"), ("ffn.down", "output.dense"),
                                 ("ffn_norm", "output.LayerNorm")):
                rules.append(rule(f"{layer}{ours}.{p}", f"{e}{theirs}.{p}"))
        return rules

    def rules(self, cfg):
        return self.encoder_rules(cfg) + self.head_rules(cfg)

    def head_rules(self, cfg) -> list:
        raise NotImplementedError


def linear(ours: str, theirs: str) -> list:
    return [rule(f"{ours}.{p}", f"{theirs}.{p}") for p in ("weight", "bias")]


def output_bias(ours: str, decoder_bias: str, head_bias: str, tied: bool):
    """The vocabulary bias. Tied heads store it once (``head_bias``); an untied head's forward uses the decoder
    Linear's own bias, and transformers still expects the separate copy, so both are written."""
    if tied:
        return rule(ours, head_bias)
    return rule(ours, decoder_bias, head_bias, to_ours=lambda ts: ts[0], to_theirs=lambda t: [t, t.clone()])


@FAMILIES.register("bert")
class Bert(BertLike):
    model_type, architecture = "bert", "BertForPreTraining"
    heads = {"pretraining": "BertForPreTraining", "mlm": "BertForMaskedLM",
             "classification": "BertForSequenceClassification"}
    prefixes = ("bert.",)
    top_level = ("cls.", "classifier.")
    # cls.predictions.decoder.*: copies of the word embeddings and of cls.predictions.bias (tied) in older files;
    # embeddings.position_ids: an index buffer older checkpoints stored
    ignore = (r"^cls\.predictions\.decoder\.(weight|bias)$", r"embeddings\.position_ids$")

    def ignore_for(self, cfg):
        if cfg.head == "mlm":  # released BERT checkpoints labelled BertForMaskedLM still carry the NSP head
            return self.ignore + (r"^pooler\.", r"^cls\.seq_relationship\.")
        return self.ignore

    def accepts_variant(self, cfg):
        if cfg.position_offset != 0:
            return "bert positions start at 0 (position_offset=0)"
        return None

    def head_rules(self, cfg):
        mlm = "lm_head.mlm" if cfg.head == "pretraining" else "lm_head"
        if cfg.head == "classification":
            return linear("lm_head.pooler.dense", "pooler.dense") + linear("lm_head.out", "classifier")
        rules = (linear(f"{mlm}.dense", "cls.predictions.transform.dense")
                 + linear(f"{mlm}.norm", "cls.predictions.transform.LayerNorm")
                 + [output_bias(f"{mlm}.decoder.bias", "cls.predictions.decoder.bias", "cls.predictions.bias",
                                cfg.tie_embeddings)])
        if not cfg.tie_embeddings:
            rules.append(rule(f"{mlm}.decoder.weight", "cls.predictions.decoder.weight"))
        if cfg.head == "pretraining":
            rules += linear("lm_head.pooler.dense", "pooler.dense") + linear("lm_head.nsp", "cls.seq_relationship")
        return rules
