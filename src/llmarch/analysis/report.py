"""``llmarch.analyze``: one report of what a config costs — parameters, FLOPs, memory, KV cache — with the seed
closed forms beside the exact numbers."""
from __future__ import annotations

import logging
from dataclasses import dataclass

from llmarch.analysis import flops as F
from llmarch.analysis import memory as M
from llmarch.analysis.vision import image_summary
from llmarch.analysis.params import (ParamCount, closed_form_comparison, count_params, gpt_closed_form_params,
                                     meta_param_count)

log = logging.getLogger(__name__)


@dataclass
class Report:
    """Everything :func:`analyze` computes; ``to_dict()`` is the ``--json`` form."""

    seq_len: int
    batch: int
    dtype: str
    params: ParamCount
    meta_params: int | None  # sum(numel) of the meta-device model, when verified
    params_closed_form: int
    params_comparison: list[dict]
    flops: F.Flops
    flops_closed_form: int
    flops_comparison: list[dict]
    decode_flops_per_token: int | None  # None for encoders (no generation)
    kv_bytes_per_token: float
    kv_cache_bytes: float
    cross_kv_bytes_per_source_token: float  # encoder-decoders: cross-attention k/v per encoded token (else 0)
    cross_kv_cache_bytes: float  # ... for batch × seq_len encoded tokens
    training_memory: dict[str, float]
    inference_memory: dict[str, float]
    state_bytes: float = 0.0  # recurrent layers' constant decoding state for ``batch`` sequences (0 without any)
    config: object = None  # the analysed ModelConfig
    images: dict | None = None  # vision-language models: analysis.vision.image_summary (tower, projector, ...)

    def to_dict(self) -> dict:
        f = self.flops
        return dict(
            seq_len=self.seq_len, batch=self.batch, dtype=self.dtype,
            params=dict(components=self.params.components, total=self.params.total, active=self.params.active,
                        non_embedding=self.params.non_embedding, meta_device_count=self.meta_params,
                        closed_form=self.params_closed_form, comparison=self.params_comparison,
                        notes=self.params.notes, stacks=self.params.stacks),
            flops=dict(step=dict(linear=f.linear, attention=f.attention, head=f.head, forward=f.forward,
                                 training=f.training, training_recompute=f.training_recompute,
                                 attention_useful=f.attention_useful, cross_attention=f.cross_attention,
                                 by_stack=f.by_stack),
                       per_token=f.per_token(), closed_form_forward=self.flops_closed_form,
                       comparison=self.flops_comparison, decode_per_token=self.decode_flops_per_token),
            kv_cache=dict(bytes_per_token=self.kv_bytes_per_token, bytes_for_context=self.kv_cache_bytes,
                          cross_bytes_per_source_token=self.cross_kv_bytes_per_source_token,
                          cross_bytes_for_source=self.cross_kv_cache_bytes, recurrent_state_bytes=self.state_bytes,
                          decode_bytes_for_context=self.kv_cache_bytes + self.state_bytes),
            memory=dict(training=self.training_memory, inference=self.inference_memory), images=self.images)


def analyze(cfg, seq_len: int = 2048, batch: int = 1, dtype: str = "bf16", verify: bool = True) -> Report:
    """Parameters by component, FLOPs per token and per step, KV cache and memory for ``batch`` sequences of
    ``seq_len`` tokens in ``dtype``. ``verify`` also builds the model on the meta device and adds any parameters
    the analytic count misses as an ``unaccounted`` component (logged as a warning)."""
    from llmarch.config import ModelConfig

    if not isinstance(cfg, ModelConfig):
        raise TypeError(f"analyze() takes a ModelConfig, got {type(cfg).__name__}; use llmarch.preset(name)")
    for name, v in (("seq_len", seq_len), ("batch", batch)):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(f"{name}: must be a positive integer, got {v!r}")
    M.dtype_bytes(dtype)
    params = count_params(cfg)
    meta = None
    if verify:
        meta = meta_param_count(cfg)
        if meta != params.total:
            log.warning("analysis: the analytic parameter count %d differs from the built model's %d; the "
                        "difference is reported as 'unaccounted'", params.total, meta)
            params.components["unaccounted"] = meta - params.total
            params.notes.append(f"{meta - params.total} parameters of the built model are not modelled")
            params.active += meta - params.total
            params.total = meta
    fl = F.forward_flops(cfg, seq_len, batch)
    return Report(
        seq_len=seq_len, batch=batch, dtype=dtype, params=params, meta_params=meta,
        params_closed_form=gpt_closed_form_params(cfg), params_comparison=closed_form_comparison(cfg),
        flops=fl, flops_closed_form=F.gpt_closed_form_flops(cfg, seq_len, batch),
        flops_comparison=F.closed_form_comparison(cfg, seq_len, batch),
        decode_flops_per_token=F.decode_flops_per_token(cfg, seq_len),
        kv_bytes_per_token=M.kv_bytes_per_token(cfg, dtype),
        kv_cache_bytes=M.kv_cache_bytes(cfg, seq_len, batch, dtype),
        cross_kv_bytes_per_source_token=M.cross_kv_bytes_per_source_token(cfg, dtype),
        cross_kv_cache_bytes=M.cross_kv_cache_bytes(cfg, seq_len, batch, dtype),
        training_memory=M.training_memory(cfg, seq_len, batch, dtype, n_params=params.total),
        inference_memory=M.inference_memory(cfg, seq_len, batch, dtype, n_params=params.total),
        state_bytes=M.state_bytes(cfg, batch, dtype), config=cfg,
        images=image_summary(cfg) if getattr(cfg, "vision", None) is not None else None)
