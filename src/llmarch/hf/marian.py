"""model_type "marian" (MarianMTModel): the 2017 Transformer as transformers holds it. Post-norm encoder-decoder,
sinusoidal positions laid out [sin | cos] (not interleaved), embeddings optionally scaled by sqrt(d_model) and
shared by encoder, decoder and the tied head, biases everywhere, and a ``final_logits_bias`` on the logits."""
from __future__ import annotations

from llmarch.config import ModelConfig
from llmarch.hf.base import FAMILIES, Family, activation_from_hf, activation_to_hf, require, tokens_from_hf, \
    tokens_to_hf
from llmarch.hf.convert import cat_rows, rule, split_rows

MARIAN_FIXED = dict(kind="encoder_decoder", norm="layernorm", norm_bias=True, norm_eps=1e-5, norm_placement="post",
                    ffn="mlp", ffn_bias=True, qkv_bias=True, out_bias=True, position="sinusoidal_halves",
                    embed_norm=False, final_norm=False, head="lm", head_bias=True, attn_scale=None,
                    type_vocab_size=0, position_offset=0, scale_head=False, tie_embeddings=True, pattern=("dense",))


def row_bias():
    """final_logits_bias [1, V] <-> our lm_head.bias [V]."""
    return dict(to_ours=lambda ts: ts[0].reshape(-1), to_theirs=lambda t: [t.reshape(1, -1)])


@FAMILIES.register("marian")
class Marian(Family):
    model_type, architecture = "marian", "MarianMTModel"
    prefixes = ("model.",)
    top_level = ("lm_head", "final_logits_bias")
    # {encoder,decoder}.embed_tokens: copies of `shared`; embed_positions: the fixed sinusoid tables
    ignore = (r"^(encoder|decoder)\.embed_tokens\.weight$", r"^(encoder|decoder)\.embed_positions\.weight$")

    def to_config(self, hf):
        vocab, d, L, n_dec, H, F, n_pos = require(hf, "vocab_size", "d_model", "encoder_layers", "decoder_layers",
                                                  "encoder_attention_heads", "encoder_ffn_dim",
                                                  "max_position_embeddings")
        for ours, theirs, value in (("n_heads", "decoder_attention_heads", H), ("d_ff", "decoder_ffn_dim", F),
                                    ("vocab_size", "decoder_vocab_size", vocab)):
            if hf.get(theirs) not in (None, value):
                raise ValueError(f"config.json {theirs}={hf[theirs]} differs from the encoder's {value}; "
                                 f"one {ours} serves both stacks")
        if hf.get("share_encoder_decoder_embeddings", True) is False or hf.get("tie_word_embeddings", True) is False:
            raise ValueError("config.json: only Marian models whose encoder, decoder and head share one embedding "
                             "are supported (share_encoder_decoder_embeddings and tie_word_embeddings true)")
        tokens = tokens_from_hf(hf, vocab)
        start = hf.get("decoder_start_token_id")
        return ModelConfig(**MARIAN_FIXED, vocab_size=vocab, d_model=d, n_layers=L,
                           n_decoder_layers=None if n_dec == L else n_dec, n_heads=H, d_ff=F, max_seq_len=n_pos,
                           activation=activation_from_hf(hf.get("activation_function", "gelu"), "activation_function"),
                           scale_embeddings=bool(hf.get("scale_embedding", False)), dropout=hf.get("dropout", 0.0),
                           attn_dropout=hf.get("attention_dropout", 0.0),
                           decoder_start_token_id=tokens["pad_token_id"] if start is None else start, **tokens)

    def from_config(self, cfg):
        n_dec = cfg.n_decoder_layers or cfg.n_layers
        return dict(model_type="marian", architectures=[self.architecture], is_encoder_decoder=True,
                    vocab_size=cfg.vocab_size, decoder_vocab_size=cfg.vocab_size, d_model=cfg.d_model,
                    encoder_layers=cfg.n_layers, decoder_layers=n_dec, encoder_attention_heads=cfg.n_heads,
                    decoder_attention_heads=cfg.n_heads, encoder_ffn_dim=cfg.d_ff, decoder_ffn_dim=cfg.d_ff,
                    activation_function=activation_to_hf(cfg.activation), max_position_embeddings=cfg.max_seq_len,
                    scale_embedding=cfg.scale_embeddings, dropout=cfg.dropout, attention_dropout=cfg.attn_dropout,
                    activation_dropout=0.0, share_encoder_decoder_embeddings=True, tie_word_embeddings=True,
                    decoder_start_token_id=cfg.decoder_start_token_id, forced_eos_token_id=None,
                    **tokens_to_hf(cfg))

    def accepts(self, cfg):
        for k, v in MARIAN_FIXED.items():
            if getattr(cfg, k) != v:
                return f"marian needs {k}={v!r}, config has {getattr(cfg, k)!r}"
        if cfg.kv_heads != cfg.n_heads or cfg.dh * cfg.n_heads != cfg.d_model:
            return "marian needs multi-head attention with head_dim = d_model / n_heads"
        return None

    def rules(self, cfg):
        D = cfg.d_model
        qkv = dict(to_ours=cat_rows, to_theirs=split_rows([D, D, D]))
        kv = dict(to_ours=cat_rows, to_theirs=split_rows([D, D]))
        rules = [rule("embed.tokens.weight", "shared.weight"), rule("lm_head.bias", "final_logits_bias", **row_bias())]
        for stack, n in (("encoder", cfg.n_layers), ("decoder", cfg.n_decoder_layers or cfg.n_layers)):
            ours = theirs = f"{stack}.layers.{{layer}}."
            for p in ("weight", "bias"):
                rules.append(rule(f"{ours}attn.qkv.{p}", *[f"{theirs}self_attn.{x}_proj.{p}" for x in "qkv"], **qkv,
                                  layers=n))
                pairs = [("attn.out", "self_attn.out_proj"), ("attn_norm", "self_attn_layer_norm"),
                         ("ffn.up", "fc1"), ("ffn.down", "fc2"), ("ffn_norm", "final_layer_norm")]
                if stack == "decoder":
                    pairs += [("cross.q", "encoder_attn.q_proj"), ("cross.out", "encoder_attn.out_proj"),
                              ("cross_norm", "encoder_attn_layer_norm")]
                    rules.append(rule(f"{ours}cross.kv.{p}", *[f"{theirs}encoder_attn.{x}_proj.{p}" for x in "kv"],
                                      **kv, layers=n))
                rules += [rule(f"{ours}{a}.{p}", f"{theirs}{b}.{p}", layers=n) for a, b in pairs]
        return rules
