"""model_type "mllama": Llama 3.2 Vision as transformers' MllamaForConditionalGeneration — a tiled ViT (aspect-ratio
tile embeddings, gated positions, a local and a gated global transformer, intermediate states concatenated), one
linear projector, and a llama text model whose ``cross_attention_layers`` are gated cross-attention blocks. The
token table has 8 rows past the vocabulary (the image token among them). Files use ``language_model.model.*`` /
``language_model.lm_head`` / ``vision_model.*`` / ``multi_modal_projector.*`` (what transformers 5 writes); the
in-memory layout (``model.language_model.*``, ``lm_head``, ``model.vision_model.*``) is renamed on load."""
from __future__ import annotations

from llmarch.config import ModelConfig
from llmarch.hf.base import FAMILIES, Family, activation_from_hf, activation_to_hf
from llmarch.hf.clip import linear
from llmarch.hf.convert import cat_rows, rule, split_rows
from llmarch.hf.llama import LlamaLike
from llmarch.hf.llava import renamed
from llmarch.nn.vision.tiles import aspect_ratios
from llmarch.vision_config import VisionConfig

# transformers' MllamaTextConfig / MllamaVisionConfig defaults (the 11B's sizes)
TEXT_DEFAULTS = dict(vocab_size=128256, hidden_size=4096, hidden_act="silu", num_hidden_layers=40,
                     num_attention_heads=32, num_key_value_heads=8, intermediate_size=14336, rms_norm_eps=1e-5,
                     max_position_embeddings=131072, tie_word_embeddings=False, bos_token_id=128000,
                     eos_token_id=128001, pad_token_id=128004, cross_attention_layers=[3, 8, 13, 18, 23, 28, 33, 38])
VISION_DEFAULTS = dict(hidden_size=1280, hidden_act="gelu", num_hidden_layers=32, num_global_layers=8,
                       attention_heads=16, num_channels=3, intermediate_size=5120, image_size=448, patch_size=14,
                       norm_eps=1e-5, max_num_tiles=4, intermediate_layers_indices=[3, 7, 15, 23, 30])
# the tower layout the model type fixes (the rest comes from config.json)
MLLAMA_FIXED = dict(class_token=True, pre_norm=True, post_norm="local", pool="none", patch_bias=False,
                    positions="gated_tiles", pad_to=8, attn_bias=False, feature_layer=-1, feature_select="full",
                    fusion="cross_blocks", projector="linear", projector_bias=True, extra_token_rows=8)
RENAMES = ((r"^model\.language_model\.", "language_model.model."), (r"^lm_head\.", "language_model.lm_head."),
           (r"^model\.vision_model\.", "vision_model."), (r"^model\.multi_modal_projector\.", "multi_modal_projector."))


class MllamaText(LlamaLike):
    """The text half's config keys (llama's, with MllamaTextConfig's defaults)."""

    model_type, default_theta, default_eps, default_kv_heads = "mllama_text_model", 500000.0, 1e-5, 8


def vision_from_hf(hf: dict) -> dict:
    get = lambda k: hf.get(k, VISION_DEFAULTS[k])  # noqa: E731
    tiles, sizes = get("max_num_tiles"), (get("image_size"), get("patch_size"))
    if not all(isinstance(s, int) for s in sizes):
        raise ValueError(f"config.json vision_config image_size / patch_size must be integers, got {sizes}")
    ratios = hf.get("supported_aspect_ratios")
    if ratios is not None and [tuple(r) for r in ratios] != aspect_ratios(tiles):
        raise ValueError(f"config.json vision_config.supported_aspect_ratios={ratios}: only the processor's own "
                         f"list for max_num_tiles={tiles} is supported ({[list(r) for r in aspect_ratios(tiles)]})")
    if get("norm_eps") != 1e-5:  # layernorm_pre / layernorm_post keep torch's default 1e-5 whatever norm_eps says
        raise ValueError(f"config.json vision_config.norm_eps={get('norm_eps')}: only 1e-5 is supported")
    layers = get("intermediate_layers_indices")
    width = get("hidden_size") * (1 + len(layers))
    if hf.get("vision_output_dim", width) != width:
        raise ValueError(f"config.json vision_config.vision_output_dim={hf['vision_output_dim']} must be "
                         f"hidden_size x (1 + len(intermediate_layers_indices)) = {width}")
    return dict(image_size=sizes[0], patch_size=sizes[1], channels=get("num_channels"), d_model=get("hidden_size"),
                n_layers=get("num_hidden_layers"), n_heads=get("attention_heads"), d_ff=get("intermediate_size"),
                activation=activation_from_hf(get("hidden_act")), norm_eps=get("norm_eps"), max_num_tiles=tiles,
                global_layers=get("num_global_layers"), intermediate_layers=tuple(i + 1 for i in layers))


def block_rules(ours: str, theirs: str, n: int, D: int, gated: bool) -> list:
    """A tower block: fused q/k/v without biases, o, two LayerNorms, the MLP (+ tanh gates)."""
    o, t = f"{ours}.{{layer}}.", f"{theirs}.{{layer}}."
    rules = [rule(f"{o}attn.qkv.weight", *[f"{t}self_attn.{p}_proj.weight" for p in "qkv"], to_ours=cat_rows,
                  to_theirs=split_rows([D, D, D]), layers=n),
             rule(f"{o}attn.out.weight", f"{t}self_attn.o_proj.weight", layers=n)]
    for p in ("weight", "bias"):
        for a, b in (("attn_norm", "input_layernorm"), ("ffn_norm", "post_attention_layernorm"), ("ffn.up", "mlp.fc1"),
                     ("ffn.down", "mlp.fc2")):
            rules.append(rule(f"{o}{a}.{p}", f"{t}{b}.{p}", layers=n))
    if gated:
        rules += [rule(f"{o}{g}", f"{t}{g}", layers=n) for g in ("gate_attn", "gate_ffn")]
    return rules


def tower_rules(v: VisionConfig) -> list:
    p, t = "vision.patches.", "vision_model."
    rules = [rule(f"{p}proj.weight", f"{t}patch_embedding.weight"), rule(f"{p}class_token", f"{t}class_embedding"),
             rule(f"{p}positions", f"{t}gated_positional_embedding.embedding"),
             rule(f"{p}position_gate", f"{t}gated_positional_embedding.gate"),
             rule(f"{p}tile_positions.weight", f"{t}gated_positional_embedding.tile_embedding.weight")]
    for a in ("pre", "post"):
        rules += [rule(f"{p}{a}_tile.embedding.weight", f"{t}{a}_tile_positional_embedding.embedding.weight"),
                  rule(f"{p}{a}_tile.gate", f"{t}{a}_tile_positional_embedding.gate")]
    rules += linear("vision.pre_norm", f"{t}layernorm_pre") + linear("vision.post_norm", f"{t}layernorm_post")
    rules += block_rules("vision.encoder.layers", f"{t}transformer.layers", v.n_layers, v.d_model, False)
    return rules + block_rules("vision.global_layers", f"{t}global_transformer.layers", v.global_layers, v.d_model,
                               True)


def text_rules(cfg: ModelConfig) -> list:
    """Self-attention layers as llama maps them; ``cross_layers`` as gated cross-attention blocks."""
    G, Dh = cfg.kv_heads, cfg.dh
    m = "language_model.model."
    rules = []
    for r in MllamaText().rules(cfg.replace(vision=None, tie_embeddings=True)):
        theirs = tuple(m + n for n in r.theirs)
        if "{layer}" not in r.ours:
            rules.append(rule(r.ours, *theirs, to_ours=r.to_ours, to_theirs=r.to_theirs))
            continue
        for i in range(cfg.n_layers):
            if i not in cfg.vision.cross_layers or "attn." not in r.ours:
                rules.append(rule(r.ours.format(layer=i), *(n.format(layer=i) for n in theirs), to_ours=r.to_ours,
                                  to_theirs=r.to_theirs))
    for i in cfg.vision.cross_layers:
        o, t = f"decoder.layers.{i}.", f"{m}layers.{i}."
        rules += [rule(f"{o}cross.q.weight", f"{t}cross_attn.q_proj.weight"),
                  rule(f"{o}cross.kv.weight", f"{t}cross_attn.k_proj.weight", f"{t}cross_attn.v_proj.weight",
                       to_ours=cat_rows, to_theirs=split_rows([G * Dh, G * Dh])),
                  rule(f"{o}cross.out.weight", f"{t}cross_attn.o_proj.weight"),
                  rule(f"{o}cross.q_norm.weight", f"{t}cross_attn.q_norm.weight"),
                  rule(f"{o}cross.k_norm.weight", f"{t}cross_attn.k_norm.weight"),
                  rule(f"{o}attn_gate", f"{t}cross_attn_attn_gate"), rule(f"{o}ffn_gate", f"{t}cross_attn_mlp_gate")]
    return rules + [rule("lm_head.weight", "language_model.lm_head.weight")]


@FAMILIES.register("mllama")
class Mllama(Family):
    model_type, architecture = "mllama", "MllamaForConditionalGeneration"
    takes_images = True

    def to_config(self, hf):
        text_hf = {**TEXT_DEFAULTS, **(hf.get("text_config") or {})}
        text_hf.pop("head_dim", None)  # mllama's heads are always hidden_size / num_attention_heads
        text = MllamaText().to_config(text_hf)
        vision = VisionConfig(**MLLAMA_FIXED, **vision_from_hf(hf.get("vision_config") or {}),
                              image_token_id=hf.get("image_token_index", hf.get("image_token_id", 128256)),
                              cross_layers=tuple(text_hf["cross_attention_layers"]))
        return text.replace(vision=vision)

    def from_config(self, cfg):
        v = cfg.vision
        text = MllamaText().from_config(cfg.replace(vision=None))
        for k in ("architectures", "head_dim", "attention_bias", "mlp_bias", "attention_dropout"):
            text.pop(k, None)
        if text["bos_token_id"] is None:  # MllamaTextConfig needs an int: its default (outside a small vocab)
            text.pop("bos_token_id")
        text.update(model_type="mllama_text_model", cross_attention_layers=list(v.cross_layers), dropout=0.0)
        vision = dict(model_type="mllama_vision_model", hidden_size=v.d_model,
                      hidden_act=activation_to_hf(v.activation),
                      num_hidden_layers=v.n_layers, num_global_layers=v.global_layers, attention_heads=v.n_heads,
                      num_channels=v.channels, intermediate_size=v.d_ff, vision_output_dim=v.feature_dim,
                      image_size=v.image_size, patch_size=v.patch_size, norm_eps=v.norm_eps,
                      max_num_tiles=v.max_num_tiles, intermediate_layers_indices=[i - 1 for i in v.intermediate_layers],
                      supported_aspect_ratios=[list(r) for r in aspect_ratios(v.max_num_tiles)])
        return dict(model_type=self.model_type, architectures=[self.architecture], text_config=text,
                    vision_config=vision, image_token_index=v.image_token_id)

    def accepts(self, cfg):
        v = cfg.vision
        for k, val in MLLAMA_FIXED.items():
            if getattr(v, k) != val:
                return f"mllama needs vision {k}={val!r}, config has {getattr(v, k)!r}"
        if v.norm_eps != 1e-5 or 0 in v.intermediate_layers:
            return "mllama's tower has norm_eps 1e-5 and intermediate states of blocks (not the embeddings)"
        if cfg.dh * cfg.n_heads != cfg.d_model:
            return "mllama's text heads are d_model / n_heads wide"
        if cfg.qkv_bias or cfg.out_bias or cfg.ffn_bias or cfg.tie_embeddings:
            return "mllama's text model has no biases and an untied LM head"
        return MllamaText().accepts(cfg.replace(vision=None))

    def rename(self, tensors):
        return renamed(tensors, RENAMES)

    def rules(self, cfg):
        proj = linear("projector.proj_in", "multi_modal_projector")
        return text_rules(cfg) + tower_rules(cfg.vision) + proj

    def model_prefix(self) -> str:
        return ""
