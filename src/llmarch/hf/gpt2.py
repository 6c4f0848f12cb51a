"""model_type "gpt2": learned positions, pre-LayerNorm, GELU(tanh) MLP, fused c_attn, Conv1D weights ([in, out])."""
from __future__ import annotations

from llmarch.config import ModelConfig
from llmarch.hf.base import FAMILIES, Family, activation_from_hf, activation_to_hf, require, tokens_from_hf, \
    tokens_to_hf
from llmarch.hf.convert import rule, transpose, transpose_back

GPT2_FIXED = dict(kind="decoder", norm="layernorm", norm_placement="pre", ffn="mlp", ffn_bias=True, qkv_bias=True,
                  out_bias=True, position="learned", pattern=("dense",), embed_norm=False, final_norm=True,
                  head_bias=False)


@FAMILIES.register("gpt2")
class GPT2(Family):
    model_type, architecture = "gpt2", "GPT2LMHeadModel"
    sequence_classifier = "GPT2ForSequenceClassification"
    prefixes = ("transformer.",)
    # attn.bias / attn.masked_bias: causal-mask buffers stored by older checkpoints
    ignore = (r"attn\.(masked_)?bias$",)

    def to_config(self, hf):
        vocab, n_pos, d, L, H = require(hf, "vocab_size", "n_positions", "n_embd", "n_layer", "n_head")
        # reorder_and_upcast_attn computes scores and softmax in fp32 (transformers' eager path): our reference
        # kernel does exactly that; in fp32 every kernel gives the same numbers
        extra = dict(attn_kernel="naive") if hf.get("reorder_and_upcast_attn") else {}
        return ModelConfig(**GPT2_FIXED, vocab_size=vocab, max_seq_len=n_pos, d_model=d, n_layers=L, n_heads=H,
                           d_ff=hf.get("n_inner") or 4 * d,
                           activation=activation_from_hf(hf.get("activation_function", "gelu_new"),
                                                         "activation_function"),
                           norm_eps=hf.get("layer_norm_epsilon", 1e-5),
                           attn_scale=None if hf.get("scale_attn_weights", True) else 1.0,
                           attn_scale_by_layer=bool(hf.get("scale_attn_by_inverse_layer_idx", False)),
                           tie_embeddings=hf.get("tie_word_embeddings", True),
                           dropout=0.0, **extra, **tokens_from_hf(hf, vocab))

    def from_config(self, cfg):
        return dict(model_type="gpt2", architectures=[self.architecture], vocab_size=cfg.vocab_size,
                    n_positions=cfg.max_seq_len, n_embd=cfg.d_model, n_layer=cfg.n_layers, n_head=cfg.n_heads,
                    n_inner=cfg.d_ff, activation_function=activation_to_hf(cfg.activation),
                    layer_norm_epsilon=cfg.norm_eps, scale_attn_weights=cfg.attn_scale is None,
                    scale_attn_by_inverse_layer_idx=cfg.attn_scale_by_layer,
                    reorder_and_upcast_attn=cfg.attn_kernel == "naive",
                    tie_word_embeddings=cfg.tie_embeddings, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                    **tokens_to_hf(cfg))

    def accepts(self, cfg):
        for k, v in GPT2_FIXED.items():
            if getattr(cfg, k) != v:
                return f"gpt2 needs {k}={v!r}, config has {getattr(cfg, k)!r}"
        if cfg.kv_heads != cfg.n_heads or cfg.dh * cfg.n_heads != cfg.d_model:
            return "gpt2 needs plain multi-head attention with head_dim = d_model / n_heads"
        if cfg.attn_scale not in (None, 1.0):
            return "gpt2 only scales scores by 1/sqrt(head_dim) or not at all"
        return None

    def rules(self, cfg):
        conv = dict(to_ours=transpose, to_theirs=transpose_back)
        rules = [rule("embed.tokens.weight", "wte.weight"), rule("decoder.positions.weight", "wpe.weight")]
        layer = "decoder.layers.{layer}."
        h = "h.{layer}."
        for ours, theirs in (("attn_norm", "ln_1"), ("ffn_norm", "ln_2")):
            rules += [rule(f"{layer}{ours}.weight", f"{h}{theirs}.weight"),
                      rule(f"{layer}{ours}.bias", f"{h}{theirs}.bias")]
        for ours, theirs in (("attn.qkv", "attn.c_attn"), ("attn.out", "attn.c_proj"), ("ffn.up", "mlp.c_fc"),
                             ("ffn.down", "mlp.c_proj")):
            rules += [rule(f"{layer}{ours}.weight", f"{h}{theirs}.weight", **conv),
                      rule(f"{layer}{ours}.bias", f"{h}{theirs}.bias")]
        rules += [rule("decoder.final_norm.weight", "ln_f.weight"), rule("decoder.final_norm.bias", "ln_f.bias")]
        return rules + self.decoder_head_rules(cfg)
