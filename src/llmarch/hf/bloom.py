"""model_type "bloom": ALiBi, LayerNorm on the embeddings, fused query_key_value laid out per head as
[H, (q, k, v), Dh] rows, GELU(tanh) MLP, biases everywhere, tied head."""
from __future__ import annotations


from llmarch.config import ModelConfig
from llmarch.hf.base import FAMILIES, Family, require, tokens_from_hf, tokens_to_hf
from llmarch.hf.convert import rule

BLOOM_FIXED = dict(kind="decoder", norm="layernorm", norm_bias=True, norm_placement="pre", ffn="mlp",
                   activation="gelu_tanh", ffn_bias=True, qkv_bias=True, out_bias=True, position="alibi",
                   embed_norm=True, final_norm=True, head_bias=False, attn_scale=None, pattern=("dense",))


def per_head_to_blocks(n_heads: int):
    """[H*3*Dh, ...] rows ordered (head, q|k|v, dim) -> [q (H*Dh) | k | v] rows, and back."""

    def to_ours(ts):
        t = ts[0]
        rest = t.shape[1:]
        return t.reshape(n_heads, 3, -1, *rest).transpose(0, 1).reshape(t.shape).contiguous()

    def to_theirs(t):
        rest = t.shape[1:]
        return [t.reshape(3, n_heads, -1, *rest).transpose(0, 1).reshape(t.shape).contiguous()]

    return dict(to_ours=to_ours, to_theirs=to_theirs)


@FAMILIES.register("bloom")
class Bloom(Family):
    model_type, architecture = "bloom", "BloomForCausalLM"
    prefixes = ("transformer.",)

    def to_config(self, hf):
        vocab, L = require(hf, "vocab_size", "n_layer")
        # BloomConfig: a legacy n_embed wins over hidden_size (default 64); n_head (alias num_attention_heads,
        # default 8)
        d = hf["n_embed"] if hf.get("n_embed") is not None else hf.get("hidden_size", 64)
        H = hf.get("n_head", hf.get("num_attention_heads", 8))
        if hf.get("apply_residual_connection_post_layernorm"):
            raise ValueError("config.json apply_residual_connection_post_layernorm=true is not supported")
        return ModelConfig(**BLOOM_FIXED, vocab_size=vocab, d_model=d, n_layers=L, n_heads=H, d_ff=4 * d,
                           max_seq_len=hf.get("seq_length", 2048), norm_eps=hf.get("layer_norm_epsilon", 1e-5),
                           tie_embeddings=hf.get("tie_word_embeddings", True), **tokens_from_hf(hf, vocab))

    def from_config(self, cfg):
        return dict(model_type="bloom", architectures=[self.architecture], vocab_size=cfg.vocab_size,
                    hidden_size=cfg.d_model, n_layer=cfg.n_layers, n_head=cfg.n_heads,
                    layer_norm_epsilon=cfg.norm_eps, tie_word_embeddings=cfg.tie_embeddings, seq_length=cfg.max_seq_len,
                    apply_residual_connection_post_layernorm=False, hidden_dropout=0.0, attention_dropout=0.0,
                    **tokens_to_hf(cfg))

    def accepts(self, cfg):
        for k, v in BLOOM_FIXED.items():
            if getattr(cfg, k) != v:
                return f"bloom needs {k}={v!r}, config has {getattr(cfg, k)!r}"
        if cfg.kv_heads != cfg.n_heads or cfg.dh * cfg.n_heads != cfg.d_model or cfg.d_ff != 4 * cfg.d_model:
            return "bloom needs multi-head attention, head_dim = d_model / n_heads and d_ff = 4 d_model"
        return None

    def rules(self, cfg):
        fused = per_head_to_blocks(cfg.n_heads)
        layer, h = "decoder.layers.{layer}.", "h.{layer}."
        rules = [rule("embed.tokens.weight", "word_embeddings.weight"),
                 rule("embed.norm.weight", "word_embeddings_layernorm.weight"),
                 rule("embed.norm.bias", "word_embeddings_layernorm.bias"),
                 rule(f"{layer}attn.qkv.weight", f"{h}self_attention.query_key_value.weight", **fused),
                 rule(f"{layer}attn.qkv.bias", f"{h}self_attention.query_key_value.bias", **fused),
                 rule("decoder.final_norm.weight", "ln_f.weight"), rule("decoder.final_norm.bias", "ln_f.bias")]
        for ours, theirs in (("attn_norm", "input_layernorm"), ("ffn_norm", "post_attention_layernorm"),
                             ("attn.out", "self_attention.dense"), ("ffn.up", "mlp.dense_h_to_4h"),
                             ("ffn.down", "mlp.dense_4h_to_h")):
            rules += [rule(f"{layer}{ours}.{p}", f"{h}{theirs}.{p}") for p in ("weight", "bias")]
        if not cfg.tie_embeddings:
            rules.append(rule("lm_head.weight", "lm_head.weight"))
        return rules


