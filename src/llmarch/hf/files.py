"""Reading a Hugging Face checkpoint directory defensively: ``config.json`` (valid JSON, a mapping, the common
size fields of the right type) and the safetensors weights (one file or shards listed by
``model.safetensors.index.json``), every file inside the directory (a name or a symlink that leads out of it is
refused) and readable as safetensors. Each problem is a :class:`ConversionError` naming the file and the field
or tensor; nothing is unpickled."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import torch

from llmarch.hf.convert import ConversionError

# config.json fields every reader treats as sizes (> 0 when given), counts (>= 0), numbers and switches; the
# configuration classes of transformers declare them int / float / bool, and its @strict check refuses text
POSITIVE_INTS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                 "intermediate_size", "max_position_embeddings", "head_dim", "d_model", "d_kv", "d_ff",
                 "num_layers", "num_decoder_layers", "num_heads", "n_embd", "n_embed", "n_layer", "n_head",
                 "n_positions", "seq_length",
                 "n_inner", "encoder_layers", "decoder_layers", "encoder_attention_heads", "decoder_attention_heads",
                 "encoder_ffn_dim", "decoder_ffn_dim", "num_experts", "num_local_experts", "num_experts_per_tok",
                 "n_routed_experts", "moe_intermediate_size", "shared_expert_intermediate_size", "kv_lora_rank",
                 "q_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim",
                 "relative_attention_num_buckets", "relative_attention_max_distance", "attention_window",
                 "block_size", "moe_layer_freq",
                 "n_group", "topk_group", "expert_capacity")
REQUIRED = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "n_embd", "n_layer", "n_head",
            "d_model", "num_layers", "num_heads", "intermediate_size", "d_ff", "d_kv", "max_position_embeddings",
            "n_positions", "moe_intermediate_size", "expert_capacity", "decoder_sparse_step", "router_jitter_noise",
            "router_aux_loss_coef", "router_z_loss_coef", "aux_loss_alpha", "tie_word_embeddings", "attention_bias",
            "mlp_bias", "use_sliding_window", "num_experts", "num_local_experts",
            "routed_scaling_factor")  # declared without None by the config classes that have them
# (num_experts_per_tok is not: DeepseekV2Config declares it `int | None`, None for an all-dense model)
COUNTS = ("type_vocab_size", "n_shared_experts", "first_k_dense_replace", "max_window_layers", "sliding_window",
          "num_sparse_encoder_layers", "num_sparse_decoder_layers", "num_random_blocks", "decoder_sparse_step",
          "encoder_sparse_step")
NUMBERS = ("rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon", "rope_theta", "partial_rotary_factor",
           "routed_scaling_factor", "router_aux_loss_coef", "router_z_loss_coef", "initializer_range",
           "dropout_rate", "hidden_dropout_prob", "attention_probs_dropout_prob", "attention_dropout", "dropout",
           "aux_loss_alpha", "router_jitter_noise")
SWITCHES = ("tie_word_embeddings", "attention_bias", "mlp_bias", "use_sliding_window", "scale_decoder_outputs",
            "is_encoder_decoder", "norm_topk_prob", "router_bias", "add_cross_attention")


def check_config_types(hf: dict[str, Any], where: Path) -> None:
    """The common fields of ``hf`` have the types transformers declares (a ConversionError names the first)."""
    def bad(key: str, what: str) -> None:
        raise ConversionError(f"{where}: {key} must be {what}, got {hf[key]!r}")

    for key in REQUIRED:
        if key in hf and hf[key] is None:
            bad(key, "given (not null)")
    for key in POSITIVE_INTS + COUNTS:
        v = hf.get(key)
        if v is None or (key == "attention_window" and isinstance(v, list)):  # longformer: one per layer
            continue
        if isinstance(v, bool) or not isinstance(v, int) or v < (1 if key in POSITIVE_INTS else 0):
            bad(key, "a positive integer" if key in POSITIVE_INTS else "an integer >= 0")
    for key in NUMBERS:
        v = hf.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)):
            bad(key, "a finite number")
    for key in SWITCHES:
        if hf.get(key) is not None and not isinstance(hf[key], bool):
            bad(key, "true or false")


# our field -> the config.json keys it is read from (any family), to name the key when our check refuses a value
KEYS_OF_FIELD = {"vocab_size": ("vocab_size",), "d_model": ("hidden_size", "n_embd", "n_embed", "d_model"),
                 "n_layers": ("num_hidden_layers", "n_layer", "num_layers", "encoder_layers"),
                 "n_decoder_layers": ("num_decoder_layers", "decoder_layers"),
                 "n_heads": ("num_attention_heads", "n_head", "num_heads", "encoder_attention_heads"),
                 "n_kv_heads": ("num_key_value_heads",), "head_dim": ("head_dim", "d_kv"),
                 "d_ff": ("intermediate_size", "n_inner", "d_ff", "encoder_ffn_dim"),
                 "max_seq_len": ("max_position_embeddings", "n_positions", "seq_length"),
                 "norm_eps": ("rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon"),
                 "dropout": ("hidden_dropout_prob", "dropout_rate", "dropout"),
                 "attn_dropout": ("attention_probs_dropout_prob", "attention_dropout"),
                 "window": ("sliding_window", "attention_window"), "rope": ("rope_parameters", "rope_scaling"),
                 "type_vocab_size": ("type_vocab_size",), "rel_buckets": ("relative_attention_num_buckets",),
                 "rel_max_distance": ("relative_attention_max_distance",),
                 "pad_token_id": ("pad_token_id",), "bos_token_id": ("bos_token_id",),
                 "eos_token_id": ("eos_token_id",), "decoder_start_token_id": ("decoder_start_token_id",),
                 "moe.n_experts": ("num_experts", "num_local_experts", "n_routed_experts"),
                 "moe.top_k": ("num_experts_per_tok",), "moe.d_ff": ("moe_intermediate_size",),
                 "moe.expert_capacity": ("expert_capacity",), "moe.n_shared": ("n_shared_experts",),
                 "moe.jitter": ("router_jitter_noise",), "moe.z_coef": ("router_z_loss_coef",),
                 "moe.balance_coef": ("router_aux_loss_coef", "aux_loss_alpha"),
                 "moe.every": ("decoder_sparse_step", "encoder_sparse_step", "num_sparse_encoder_layers",
                               "num_sparse_decoder_layers", "moe_layer_freq"),
                 "moe.first_dense": ("first_k_dense_replace", "mlp_only_layers"),
                 "moe.routed_scale": ("routed_scaling_factor",), "moe.n_groups": ("n_group",),
                 "moe.topk_groups": ("topk_group",), "mla.kv_lora_rank": ("kv_lora_rank",),
                 "mla.q_lora_rank": ("q_lora_rank",), "mla.qk_rope_head_dim": ("qk_rope_head_dim",),
                 "mla.qk_nope_head_dim": ("qk_nope_head_dim",), "mla.v_head_dim": ("v_head_dim",)}


def keys_behind(message: str, hf: dict[str, Any]) -> str:
    """" (config.json hidden_size=2, num_attention_heads=4)": the keys of ``hf`` that the fields of ours named in
    ``message`` ("n_heads: must divide d_model", "moe.top_k: ...") are read from, with their values."""
    fields = re.findall(r"\b[a-z_]+(?:\.[a-z_]+)?\b", message)
    def keys_of(f: str) -> tuple[str, ...]:  # a sub-config field may be named without its prefix
        return KEYS_OF_FIELD.get(f) or KEYS_OF_FIELD.get(f"moe.{f}") or KEYS_OF_FIELD.get(f"mla.{f}") or ()

    keys = list(dict.fromkeys(k for f in fields for k in keys_of(f) if k in hf))
    return f" (config.json {', '.join(f'{k}={hf[k]!r}' for k in keys)})" if keys else ""


def read_json(file: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(file.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConversionError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ConversionError(f"{file}: expected a mapping of {what}, got {type(data).__name__}")
    return data


def read_config(path: Path) -> dict[str, Any]:
    """``path/config.json``: a mapping with a ``model_type`` and well-typed size fields."""
    if not path.is_dir():
        raise ConversionError(f"{path}: not a directory; expected a Hugging Face model directory")
    file = path / "config.json"
    if not file.is_file():
        raise ConversionError(f"{file}: missing; a Hugging Face model directory holds config.json beside its "
                              "*.safetensors")
    hf = read_json(file, "config fields")
    if not isinstance(hf.get("model_type"), str):
        raise ConversionError(f"{file}: model_type is missing or not text")
    check_config_types(hf, file)
    return hf


def inside(path: Path, name: str, where: Path) -> Path:
    """``path/name``, refused unless it resolves (symlinks followed) inside ``path``."""
    if not isinstance(name, str) or not name:
        raise ConversionError(f"{where}: {name!r} is not a file name")
    file = path / name
    if not file.resolve().is_relative_to(path.resolve()):
        raise ConversionError(f"{where}: {name!r} resolves outside the model directory {path}; refused")
    return file


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint: the shards of the index, else every ``*.safetensors``."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index, "index fields").get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ConversionError(f"{index}: weight_map is missing or empty; it maps each tensor to its shard file")
        for tensor, shard in weight_map.items():
            if not isinstance(shard, str):
                raise ConversionError(f"{index}: weight_map[{tensor!r}] must be a shard file name, got {shard!r}")
        files = [inside(path, s, index) for s in sorted(set(weight_map.values()))]
        absent = [f.name for f in files if not f.is_file()]
        if absent:
            raise ConversionError(f"{index}: shard(s) {absent} listed in weight_map are not in {path}")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        bins = sorted(p.name for p in path.glob("*.bin"))
        extra = f" (found {bins}: convert them to safetensors first; pickled weights are never loaded)" if bins else ""
        raise FileNotFoundError(f"{path} has no *.safetensors weights{extra}")
    return [inside(path, f.name, path) for f in files]


def read_weights(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(every tensor of the checkpoint, the file each came from)."""
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    for f in weight_files(path):
        try:
            part = load_file(str(f))
        except Exception as e:  # SafetensorError, OSError: truncated, not safetensors, unreadable
            raise ConversionError(f"{f}: not a readable safetensors file ({' '.join(str(e).split())})") from None
        tensors.update(part)
        origin.update(dict.fromkeys(part, f.name))
    return tensors, origin
