"""model_type "mamba2" (Mamba2ForCausalLM): blocks of RMSNorm + the Mamba-2 mixer and no FFN, a final RMSNorm,
an LM head (tied or not). Our mixer keeps transformers' tensor layouts (in_proj rows z | xBC | dt, the depthwise
conv1d [C, 1, K]), so every tensor maps by name alone."""
from __future__ import annotations

from llmarch.config import ModelConfig
from llmarch.hf.base import FAMILIES, Family, require, tokens_from_hf, tokens_to_hf
from llmarch.hf.convert import rule

MAMBA2_FIXED = dict(kind="decoder", norm="rmsnorm", norm_bias=False, norm_placement="pre", ffn="none",
                    position="none", embed_norm=False, final_norm=True, head_bias=False, mixer="mamba2",
                    layer_mixers=())


def _number(v) -> float:
    """A float from config.json; transformers writes infinity as {"__float__": "Infinity"}."""
    return float(v["__float__"] if isinstance(v, dict) and "__float__" in v else v)


@FAMILIES.register("mamba2")
class Mamba2(Family):
    model_type, architecture = "mamba2", "Mamba2ForCausalLM"
    prefixes = ("backbone.",)

    def to_config(self, hf):
        vocab, d, L, H, Dh, N = require(hf, "vocab_size", "hidden_size", "num_hidden_layers", "num_heads",
                                        "head_dim", "state_size")
        if hf.get("hidden_act", "silu") not in ("silu", "swish"):
            raise ValueError(f"config.json hidden_act={hf['hidden_act']!r}: the Mamba-2 mixer supports silu only")
        expand = hf.get("expand", 2)
        if expand * d != H * Dh:
            raise ValueError(f"config.json: expand * hidden_size ({expand * d}) != num_heads * head_dim ({H * Dh})")
        lo, hi = (_number(v) for v in hf.get("time_step_limit", (0.0, float("inf"))))
        ssm = dict(d_state=N, n_groups=hf.get("n_groups", 8), expand=expand, head_dim=Dh,
                   conv_kernel=hf.get("conv_kernel", 4), chunk_size=hf.get("chunk_size", 256),
                   proj_bias=bool(hf.get("use_bias", False)), conv_bias=bool(hf.get("use_conv_bias", True)),
                   time_step_min=hf.get("time_step_min", 0.001), time_step_max=hf.get("time_step_max", 0.1),
                   time_step_floor=hf.get("time_step_floor", 1e-4), time_step_limit_low=lo,
                   time_step_limit_high=None if hi == float("inf") else hi)
        return ModelConfig(**MAMBA2_FIXED, vocab_size=vocab, d_model=d, n_layers=L, n_heads=H, head_dim=Dh,
                           d_ff=expand * d, norm_eps=hf.get("layer_norm_epsilon", 1e-5), ssm=ssm,
                           tie_embeddings=bool(hf.get("tie_word_embeddings", False)), **tokens_from_hf(hf, vocab))

    def from_config(self, cfg):
        s = cfg.ssm
        return dict(model_type=self.model_type, architectures=[self.architecture], vocab_size=cfg.vocab_size,
                    hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers, num_heads=s.heads(cfg.d_model),
                    head_dim=s.head_dim, state_size=s.d_state, n_groups=s.n_groups, expand=s.expand,
                    conv_kernel=s.conv_kernel, chunk_size=s.chunk_size, use_bias=s.proj_bias,
                    use_conv_bias=s.conv_bias, hidden_act="silu", layer_norm_epsilon=cfg.norm_eps,
                    time_step_min=s.time_step_min, time_step_max=s.time_step_max,
                    time_step_floor=s.time_step_floor, time_step_limit=list(s.time_step_limit),
                    residual_in_fp32=True, tie_word_embeddings=cfg.tie_embeddings, **tokens_to_hf(cfg))

    def accepts(self, cfg):
        for k, v in MAMBA2_FIXED.items():
            if getattr(cfg, k) != v:
                return f"mamba2 needs {k}={v!r}, config has {getattr(cfg, k)!r}"
        if cfg.n_heads != cfg.ssm.heads(cfg.d_model) or cfg.dh != cfg.ssm.head_dim:
            return "mamba2 records n_heads/head_dim as the SSM's heads (expand * d_model / ssm.head_dim, ssm.head_dim)"
        if cfg.d_ff != cfg.ssm.inner(cfg.d_model):
            return "mamba2 records d_ff as the SSM's inner width expand * d_model (there is no FFN)"
        return None

    def rules(self, cfg):
        layer, m = "decoder.layers.{layer}.", "layers.{layer}."
        rules = [rule("embed.tokens.weight", "embeddings.weight"),
                 rule(f"{layer}attn_norm.weight", f"{m}norm.weight"),
                 rule(f"{layer}attn.in_proj.weight", f"{m}mixer.in_proj.weight"),
                 rule(f"{layer}attn.conv.weight", f"{m}mixer.conv1d.weight"),
                 rule(f"{layer}attn.dt_bias", f"{m}mixer.dt_bias"),
                 rule(f"{layer}attn.A_log", f"{m}mixer.A_log"),
                 rule(f"{layer}attn.D", f"{m}mixer.D"),
                 rule(f"{layer}attn.norm.weight", f"{m}mixer.norm.weight"),
                 rule(f"{layer}attn.out.weight", f"{m}mixer.out_proj.weight"),
                 rule("decoder.final_norm.weight", "norm_f.weight")]
        if cfg.ssm.conv_bias:
            rules.append(rule(f"{layer}attn.conv.bias", f"{m}mixer.conv1d.bias"))
        if cfg.ssm.proj_bias:
            rules += [rule(f"{layer}attn.in_proj.bias", f"{m}mixer.in_proj.bias"),
                      rule(f"{layer}attn.out.bias", f"{m}mixer.out_proj.bias")]
        if not cfg.tie_embeddings:
            rules.append(rule("lm_head.weight", "lm_head.weight"))
        return rules

