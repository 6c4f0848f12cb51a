"""Explaining a config without weights: parameters, FLOPs, memory, the training-compute planner, and pictures."""
from llmarch.analysis.flops import Flops, decode_flops_per_token, forward_flops, gpt_closed_form_flops
from llmarch.analysis.memory import (cross_kv_bytes_per_source_token, cross_kv_cache_bytes, inference_memory,
                                     kv_bytes_per_token, kv_cache_bytes, state_bytes, training_memory)
from llmarch.analysis.params import ParamCount, count_params, gpt_closed_form_params, meta_param_count
from llmarch.analysis.planner import chinchilla_tokens, gpu_hours, plan_flops, plan_tokens, published_checks
from llmarch.analysis.report import Report, analyze
from llmarch.analysis import ssm_costs  # noqa: F401  (mamba2 / linear / mixture entries of layers.MIXER_COSTS)

__all__ = ["Flops", "ParamCount", "Report", "analyze", "chinchilla_tokens", "count_params",
           "cross_kv_bytes_per_source_token", "cross_kv_cache_bytes", "decode_flops_per_token",
           "forward_flops", "gpt_closed_form_flops", "gpt_closed_form_params", "gpu_hours", "inference_memory",
           "kv_bytes_per_token", "kv_cache_bytes", "meta_param_count", "plan_flops", "plan_tokens",
           "published_checks", "state_bytes", "training_memory"]
