"""model_types "llama", "mistral" and "qwen2": RMSNorm, SwiGLU, RoPE, grouped kv heads. They differ in biases
(qwen2: q/k/v bias), sliding windows (mistral: every layer; qwen2: layers from ``max_window_layers`` on) and rope
defaults. q/k/v are fused into our ``qkv`` and gate/up into ``gate_up``."""
from __future__ import annotations

from llmarch.config import ModelConfig
from llmarch.hf.base import FAMILIES, Family, activation_from_hf, activation_to_hf, require, rope_from_hf, \
    rope_to_hf, tokens_from_hf, tokens_to_hf
from llmarch.hf.convert import cat_rows, rule, split_rows

LLAMA_FIXED = dict(kind="decoder", norm="rmsnorm", norm_bias=False, norm_placement="pre", ffn="glu",
                   position="rope", embed_norm=False, final_norm=True, head_bias=False, attn_scale=None)


def _unless(value, default):
    """None when ``value`` is absent or equals what the config derives by itself."""
    return None if value in (None, default) else value


class LlamaLike(Family):
    prefixes = ("model.",)
    # rotary_emb.inv_freq: a recomputed buffer stored by some older checkpoints
    ignore = (r"rotary_emb\.inv_freq$",)
    # what the transformers config class assumes for a key that config.json leaves out (its field defaults)
    default_eps, default_theta, default_kv_heads = 1e-6, 10000.0, None  # None: num_attention_heads

    def kv_heads(self, hf, H: int) -> int:
        """num_key_value_heads: the class default when absent; null means num_attention_heads."""
        kv = hf.get("num_key_value_heads", self.default_kv_heads)
        return H if kv is None else kv

    def biases(self, hf) -> dict:
        bias = bool(hf.get("attention_bias", False))
        return dict(qkv_bias=bias, out_bias=bias, ffn_bias=bool(hf.get("mlp_bias", False)))

    def windows(self, hf, L: int) -> dict:
        return dict(pattern=("dense",), window=None)

    def to_config(self, hf):
        vocab, d, L, H, F, n_pos = require(hf, "vocab_size", "hidden_size", "num_hidden_layers",
                                           "num_attention_heads", "intermediate_size", "max_position_embeddings")
        if hf.get("pretraining_tp", 1) != 1:
            raise ValueError("config.json pretraining_tp != 1 is not supported (it only changes rounding)")
        return ModelConfig(**LLAMA_FIXED, vocab_size=vocab, d_model=d, n_layers=L, n_heads=H, d_ff=F,
                           n_kv_heads=_unless(self.kv_heads(hf, H), H),
                           head_dim=_unless(hf.get("head_dim"), d // H if d % H == 0 else None),
                           max_seq_len=n_pos, norm_eps=hf.get("rms_norm_eps", self.default_eps),
                           activation=activation_from_hf(hf.get("hidden_act", "silu")),
                           rope=rope_from_hf(hf, self.default_theta),
                           tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
                           **self.biases(hf), **self.windows(hf, L), **tokens_from_hf(hf, vocab))

    def from_config(self, cfg):
        return dict(model_type=self.model_type, architectures=[self.architecture], vocab_size=cfg.vocab_size,
                    hidden_size=cfg.d_model, intermediate_size=cfg.d_ff, num_hidden_layers=cfg.n_layers,
                    num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.kv_heads, head_dim=cfg.dh,
                    max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps,
                    hidden_act=activation_to_hf(cfg.activation), rope_parameters=rope_to_hf(cfg),
                    tie_word_embeddings=cfg.tie_embeddings, attention_dropout=0.0, **self.extra(cfg),
                    **tokens_to_hf(cfg))

    def extra(self, cfg) -> dict:
        return dict(attention_bias=cfg.qkv_bias, mlp_bias=cfg.ffn_bias)

    def accepts(self, cfg):
        for k, v in LLAMA_FIXED.items():
            if getattr(cfg, k) != v:
                return f"{self.model_type} needs {k}={v!r}, config has {getattr(cfg, k)!r}"
        return self.accepts_variant(cfg)

    def accepts_variant(self, cfg) -> str | None:
        if cfg.qkv_bias != cfg.out_bias:
            return "llama has one attention_bias for q/k/v and o"
        if set(cfg.pattern) != {"dense"}:
            return "llama has no sliding window"
        return None

    def rules(self, cfg):
        H, G, Dh, F = cfg.n_heads, cfg.kv_heads, cfg.dh, cfg.d_ff
        qkv = dict(to_ours=cat_rows, to_theirs=split_rows([H * Dh, G * Dh, G * Dh]))
        layer, m = "decoder.layers.{layer}.", "layers.{layer}."
        proj = [f"{m}self_attn.{p}_proj" for p in "qkv"]
        rules = [rule("embed.tokens.weight", "embed_tokens.weight"),
                 rule(f"{layer}attn_norm.weight", f"{m}input_layernorm.weight"),
                 rule(f"{layer}ffn_norm.weight", f"{m}post_attention_layernorm.weight"),
                 rule(f"{layer}attn.qkv.weight", *[p + ".weight" for p in proj], **qkv),
                 rule(f"{layer}attn.out.weight", f"{m}self_attn.o_proj.weight"),
                 rule(f"{layer}ffn.gate_up.weight", f"{m}mlp.gate_proj.weight", f"{m}mlp.up_proj.weight",
                      to_ours=cat_rows, to_theirs=split_rows([F, F])),
                 rule(f"{layer}ffn.down.weight", f"{m}mlp.down_proj.weight"),
                 rule("decoder.final_norm.weight", "norm.weight")]
        if cfg.qkv_bias:
            rules.append(rule(f"{layer}attn.qkv.bias", *[p + ".bias" for p in proj], **qkv))
        if cfg.out_bias:
            rules.append(rule(f"{layer}attn.out.bias", f"{m}self_attn.o_proj.bias"))
        if cfg.ffn_bias:
            rules += [rule(f"{layer}ffn.gate_up.bias", f"{m}mlp.gate_proj.bias", f"{m}mlp.up_proj.bias",
                           to_ours=cat_rows, to_theirs=split_rows([F, F])),
                      rule(f"{layer}ffn.down.bias", f"{m}mlp.down_proj.bias")]
        return rules + self.decoder_head_rules(cfg)


@FAMILIES.register("llama")
class Llama(LlamaLike):
    model_type, architecture = "llama", "LlamaForCausalLM"
    sequence_classifier = "LlamaForSequenceClassification"


@FAMILIES.register("mistral")
class Mistral(LlamaLike):
    model_type, architecture = "mistral", "MistralForCausalLM"
    default_kv_heads, default_window = 8, 4096  # MistralConfig: an absent sliding_window is 4096, null is none
    sequence_classifier = "MistralForSequenceClassification"

    def biases(self, hf):
        return dict(qkv_bias=False, out_bias=False, ffn_bias=False)

    def windows(self, hf, L):
        w = hf.get("sliding_window", self.default_window)
        return dict(pattern=("sliding",), window=w) if w else dict(pattern=("dense",), window=None)

    def extra(self, cfg):
        return dict(sliding_window=cfg.window if "sliding" in cfg.pattern else None)

    def accepts_variant(self, cfg):
        if cfg.qkv_bias or cfg.out_bias or cfg.ffn_bias:
            return "mistral has no biases"
        if set(cfg.pattern) not in ({"dense"}, {"sliding"}):
            return "mistral is sliding on every layer or on none"
        return None


@FAMILIES.register("qwen2")
class Qwen2(LlamaLike):
    model_type, architecture = "qwen2", "Qwen2ForCausalLM"
    default_kv_heads = 32
    sequence_classifier = "Qwen2ForSequenceClassification"

    def biases(self, hf):
        return dict(qkv_bias=True, out_bias=False, ffn_bias=False)

    def windows(self, hf, L):
        """Qwen2Config: sliding_window (default 4096) counts only with use_sliding_window; explicit layer_types
        win over max_window_layers (default 28)."""
        window = hf.get("sliding_window", 4096) if hf.get("use_sliding_window", False) else None
        types = hf.get("layer_types")
        if types is None:
            first = hf.get("max_window_layers", 28)
            types = ["sliding_attention" if window is not None and i >= first else "full_attention"
                     for i in range(L)]
        if not isinstance(types, list) or len(types) != L:
            raise ValueError(f"config.json layer_types={types!r} must list one type per layer "
                             f"(num_hidden_layers={L})")
        pattern = tuple("sliding" if t == "sliding_attention" else "dense" for t in types)
        if "sliding" in pattern and window is None:
            raise ValueError("config.json layer_types has sliding layers but use_sliding_window is false, so they have "
                             "no sliding_window (transformers refuses to build their mask); set use_sliding_window")
        if "sliding" not in pattern:
            return dict(pattern=("dense",), window=None)
        return dict(pattern=pattern, window=window)

    def extra(self, cfg):
        sliding = [cfg.layer_pattern(i) == "sliding" for i in range(cfg.n_layers)]
        first = sliding.index(True) if any(sliding) else cfg.n_layers
        return dict(use_sliding_window=any(sliding), sliding_window=cfg.window, max_window_layers=first,
                    layer_types=["sliding_attention" if s else "full_attention" for s in sliding])

    def accepts_variant(self, cfg):
        if not cfg.qkv_bias or cfg.out_bias or cfg.ffn_bias:
            return "qwen2 has q/k/v biases and no others"
        sliding = [cfg.layer_pattern(i) == "sliding" for i in range(cfg.n_layers)]
        if any(sliding) and sliding != sorted(sliding):
            return "qwen2 slides only on the layers from max_window_layers on"
        if not set(cfg.pattern) <= {"dense", "sliding"}:
            return "qwen2 has only full and sliding attention"
        return None
