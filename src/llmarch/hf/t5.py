"""model_type "t5" (T5ForConditionalGeneration): pre-norm RMSNorm without bias, relative position bias held by the
first block of each stack and shared by the others, unscaled scores, no biases, a ReLU FFN (v1.0) or a gated one
(v1.1, ``feed_forward_proj`` "gated-gelu" = tanh GELU), one embedding ``shared`` by both stacks. A tied head
rescales the decoder output by d_model**-0.5; an untied one (v1.1) does not."""
from __future__ import annotations

from llmarch.config import ModelConfig
from llmarch.hf.base import FAMILIES, Family, activation_from_hf, activation_to_hf, require, same_values, \
    tokens_from_hf, tokens_to_hf
from llmarch.hf.convert import cat_rows, rule, split_rows

T5_FIXED = dict(kind="encoder_decoder", norm="rmsnorm", norm_bias=False, norm_placement="pre", position="relative",
                attn_scale=1.0, qkv_bias=False, out_bias=False, ffn_bias=False, final_norm=True, embed_norm=False,
                scale_embeddings=False, head="lm", head_bias=False, type_vocab_size=0, position_offset=0,
                pattern=("dense",))


def ffn_from_hf(proj: str) -> dict:
    """``feed_forward_proj`` ("relu", "gated-gelu", "gated-silu", ...) -> our ffn + activation."""
    if not isinstance(proj, str):
        raise ValueError(f"config.json feed_forward_proj={proj!r} is not 'ACT' or 'gated-ACT'")
    parts = proj.split("-")
    if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
        raise ValueError(f"config.json feed_forward_proj={proj!r} is not 'ACT' or 'gated-ACT'")
    act = "gelu_new" if proj == "gated-gelu" else parts[-1]
    return dict(ffn="glu" if len(parts) == 2 else "mlp", activation=activation_from_hf(act, "feed_forward_proj"))


def ffn_to_hf(cfg: ModelConfig) -> str:
    if cfg.ffn == "mlp":
        return activation_to_hf(cfg.activation)
    if cfg.activation == "gelu_tanh":
        return "gated-gelu"
    if cfg.activation == "gelu":
        raise ValueError("t5 has no gated exact-GELU: its 'gated-gelu' is the tanh approximation (gelu_tanh)")
    return "gated-" + activation_to_hf(cfg.activation)


@FAMILIES.register("t5")
class T5(Family):
    model_type, architecture = "t5", "T5ForConditionalGeneration"
    # {encoder,decoder}.embed_tokens: copies of `shared`; the cross-attention bias table some old files carry is
    # never used (cross-attention has no position bias)
    ignore = (r"^(encoder|decoder)\.embed_tokens\.weight$",
              r"^decoder\.block\.0\.layer\.1\.EncDecAttention\.relative_attention_bias\.weight$")

    def to_config(self, hf):
        vocab, d, dkv, F, L, H = require(hf, "vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads")
        n_dec = hf.get("num_decoder_layers") or L
        # T5Config (transformers >= 5): scale_decoder_outputs when given, else tie_word_embeddings is not False;
        # tie_word_embeddings itself is forced true, so the head is tied unless the checkpoint holds its own
        # (decided in tie_from_weights; the old files' tie_word_embeddings=false is the hint without weights)
        tied = hf.get("tie_word_embeddings", True) is not False
        scale = bool(hf["scale_decoder_outputs"]) if "scale_decoder_outputs" in hf else tied
        tokens = tokens_from_hf(hf, vocab)
        start = hf.get("decoder_start_token_id")
        return ModelConfig(**T5_FIXED, fp16_clamp=True, **ffn_from_hf(hf.get("feed_forward_proj", "relu")), vocab_size=vocab,
                           d_model=d, head_dim=dkv, d_ff=F, n_layers=L, n_decoder_layers=None if n_dec == L else n_dec,
                           n_heads=H, max_seq_len=hf.get("n_positions", 512),
                           rel_buckets=hf.get("relative_attention_num_buckets", 32),
                           rel_max_distance=hf.get("relative_attention_max_distance", 128),
                           norm_eps=hf.get("layer_norm_epsilon", 1e-6), dropout=hf.get("dropout_rate", 0.1),
                           tie_embeddings=tied, scale_head=scale,
                           decoder_start_token_id=tokens["pad_token_id"] if start is None else start, **tokens)

    def from_config(self, cfg):
        return dict(model_type="t5", architectures=[self.architecture], is_encoder_decoder=True,
                    vocab_size=cfg.vocab_size, d_model=cfg.d_model, d_kv=cfg.dh, d_ff=cfg.d_ff,
                    num_layers=cfg.n_layers, num_decoder_layers=cfg.n_decoder_layers or cfg.n_layers,
                    num_heads=cfg.n_heads, relative_attention_num_buckets=cfg.rel_buckets,
                    relative_attention_max_distance=cfg.rel_max_distance, layer_norm_epsilon=cfg.norm_eps,
                    dropout_rate=cfg.dropout, feed_forward_proj=ffn_to_hf(cfg), n_positions=cfg.max_seq_len,
                    tie_word_embeddings=cfg.tie_embeddings, scale_decoder_outputs=cfg.scale_head,
                    decoder_start_token_id=cfg.decoder_start_token_id, **tokens_to_hf(cfg))

    def accepts(self, cfg):
        if cfg.ffn not in ("mlp", "glu"):
            return f"t5 has dense mlp or glu FFNs, config has ffn={cfg.ffn!r} (MoE: switch_transformers)"
        for k, v in T5_FIXED.items():
            if getattr(cfg, k) != v:
                return f"t5 needs {k}={v!r}, config has {getattr(cfg, k)!r}"
        if cfg.kv_heads != cfg.n_heads:
            return "t5 has multi-head attention only (n_kv_heads = n_heads)"
        try:
            ffn_to_hf(cfg)
        except ValueError as e:
            return str(e)
        return None

    def tie_from_weights(self, cfg, tensors):
        """T5 always ties the head to ``shared`` unless the checkpoint holds a different ``lm_head.weight``."""
        head, embed = self.head_and_embedding(cfg)
        own_head = head in tensors and not (embed in tensors and same_values(tensors[head], tensors[embed]))
        return cfg.replace(tie_embeddings=not own_head) if cfg.tie_embeddings == own_head else cfg

    def rules(self, cfg):
        H, Dh, F = cfg.n_heads, cfg.dh, cfg.d_ff
        qkv = dict(to_ours=cat_rows, to_theirs=split_rows([H * Dh] * 3))
        kv = dict(to_ours=cat_rows, to_theirs=split_rows([H * Dh] * 2))
        rules = [rule("embed.tokens.weight", "shared.weight")]
        for stack, n in (("encoder", cfg.n_layers), ("decoder", cfg.n_decoder_layers or cfg.n_layers)):
            ours, b = f"{stack}.layers.{{layer}}.", f"{stack}.block.{{layer}}.layer."
            ff = 2 if stack == "decoder" else 1  # the decoder's cross-attention sits at index 1
            rules += [rule(f"{ours}attn.qkv.weight", *[f"{b}0.SelfAttention.{p}.weight" for p in "qkv"], **qkv,
                           layers=n),
                      rule(f"{ours}attn.out.weight", f"{b}0.SelfAttention.o.weight", layers=n),
                      rule(f"{ours}attn_norm.weight", f"{b}0.layer_norm.weight", layers=n),
                      rule(f"{ours}ffn.down.weight", f"{b}{ff}.DenseReluDense.wo.weight", layers=n),
                      rule(f"{ours}ffn_norm.weight", f"{b}{ff}.layer_norm.weight", layers=n),
                      rule(f"{stack}.positions.weight",
                           f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"),
                      rule(f"{stack}.final_norm.weight", f"{stack}.final_layer_norm.weight")]
            if cfg.ffn == "glu":
                rules.append(rule(f"{ours}ffn.gate_up.weight", f"{b}{ff}.DenseReluDense.wi_0.weight",
                                  f"{b}{ff}.DenseReluDense.wi_1.weight", to_ours=cat_rows,
                                  to_theirs=split_rows([F, F]), layers=n))
            else:
                rules.append(rule(f"{ours}ffn.up.weight", f"{b}{ff}.DenseReluDense.wi.weight", layers=n))
            if stack == "decoder":
                rules += [rule(f"{ours}cross.q.weight", f"{b}1.EncDecAttention.q.weight", layers=n),
                          rule(f"{ours}cross.kv.weight", *[f"{b}1.EncDecAttention.{p}.weight" for p in "kv"], **kv,
                               layers=n),
                          rule(f"{ours}cross.out.weight", f"{b}1.EncDecAttention.o.weight", layers=n),
                          rule(f"{ours}cross_norm.weight", f"{b}1.layer_norm.weight", layers=n)]
        if not cfg.tie_embeddings:
            rules.append(rule("lm_head.weight", "lm_head.weight"))
        return rules
