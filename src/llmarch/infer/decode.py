"""Decode steps: prefill the prompt in one pass, then one token per call. Two engines share one interface
(``prefill(ids, mask) -> logits [B, V]``, ``step(tokens [B]) -> logits [B, V]``):

- :class:`DynamicEngine`: the model's own forward with a growing :class:`~llmarch.nn.cache.KVCache`;
- :class:`StaticEngine`: a :class:`~llmarch.infer.static_cache.StaticKVCache` and :func:`forward_static`, whose
  one-token step has fixed shapes, so ``torch.compile(fullgraph=True)`` captures it once (inductor on CPU; with
  ``mode="reduce-overhead"`` CUDA graphs on GPU). The pattern follows gpt-fast: static cache, prefill + step,
  compile at the call site.
"""
from __future__ import annotations

import weakref

import torch

from llmarch.infer.static_cache import StaticContext, StaticKVCache
from llmarch.nn.cache import EncoderDecoderCache


def forward_static(model, input_ids: torch.Tensor, new_mask: torch.Tensor, cache: StaticKVCache,
                   last_only: bool = False) -> torch.Tensor:
    """The decoder stack over a static cache. input_ids [B, T], new_mask [B, T] (1 = real token) -> logits
    [B, T, V] ([B, 1, V] with ``last_only``: a prefill needs only the last position's head)."""
    positions = model.decoder.positions
    position_ids = cache.begin(new_mask)
    x = model.embed(input_ids, positions, position_ids)
    ctx = StaticContext(cache, positions, position_ids, causal=model.decoder.causal)
    h = model.decoder(x, ctx, cache)
    cache.advance(input_ids.shape[1])
    if last_only:
        h = h[:, -1:]
    return model.lm_head(h)


def _step(model, tokens: torch.Tensor, cache: StaticKVCache) -> torch.Tensor:
    """One token per row: tokens [B] -> logits [B, V] (fp32)."""
    ids = tokens[:, None]
    return forward_static(model, ids, torch.ones_like(ids), cache)[:, -1].float()


def last_logits(model) -> int:
    """``logits_to_keep`` for a prefill: 1 (the head on the last position only), or 0 for a head that reads other
    positions (the last-token score)."""
    return 1 if getattr(model.lm_head, "per_position", True) else 0


def prompt_prefix(input_ids: torch.Tensor, attention_mask: torch.Tensor):
    """What a decoder's output starts with: the prompt itself (ids, mask, no new tokens yet)."""
    return input_ids, attention_mask, []


class DynamicEngine:
    """Prefill and step through ``model.forward`` with a growing KV cache."""

    def __init__(self, model, prefill_inputs: dict | None = None, max_len: int | None = None):
        self.model = model
        self.cache = model.new_cache()
        self.cache.expected = max_len  # the prompt and every new token: a native step reserves that much
        self.mask: torch.Tensor | None = None
        self.prefill_inputs = prefill_inputs or {}  # inputs only the prompt has (pixel_values)

    prefix = staticmethod(prompt_prefix)

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        self.mask = attention_mask
        # no padding (read once per generate: one sync on an accelerator): the steps pass no mask, so the model
        # derives positions from the cache length instead of a cumulative sum over a mask grown each step (same
        # positions, fewer ops), and attention needs no mask (on a GPU: flash attention, which takes none)
        if (not self.prefill_inputs and not getattr(self.model.lm_head, "reads_tokens", False)
                and not torch.compiler.is_compiling() and bool(attention_mask.bool().all())):
            self.mask = None
        return self.model(input_ids, attention_mask=attention_mask, cache=self.cache, **self.prefill_inputs,
                          logits_to_keep=last_logits(self.model)).logits[:, -1].float()

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.mask is not None:
            self.mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], 1)], dim=1)
        return self.model(tokens[:, None], attention_mask=self.mask, cache=self.cache).logits[:, -1].float()


_COMPILED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def compiled_step(model, mode: str | None = None):
    """``_step`` compiled per model and mode with static shapes (``dynamic=False``: symbolic head counts would
    reach SDPA's ``enable_gqa`` as a SymBool); a new batch size or cache length re-specialises it, which is why
    :func:`~llmarch.infer.generate.generate` rounds cache lengths up to a multiple of 64. Dynamo counts
    specialisations per code object (default limit 8), across models."""
    per_model = _COMPILED.setdefault(model, {})
    if mode not in per_model:
        per_model[mode] = torch.compile(_step, fullgraph=True, dynamic=False, mode=mode)
    return per_model[mode]


class StaticEngine:
    """Prefill (eager, one pass) and step (eager or compiled) over a pre-allocated cache of ``max_len`` slots."""

    prefix = staticmethod(prompt_prefix)

    def __init__(self, model, batch: int, max_len: int, compile: bool = False, compile_mode: str | None = None):
        self.model = model
        self.cache = StaticKVCache.for_model(model, batch, max_len)
        self._step = compiled_step(model, compile_mode) if compile else _step
        # CUDA graphs (reduce-overhead, max-autotune) hand back their own output buffer, overwritten by the next
        # replay: a step's logits are copied out, so a caller may keep them (found on an H200)
        self._copy_out = compile and compile_mode is not None and "no-cudagraphs" not in compile_mode

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return forward_static(self.model, input_ids, attention_mask, self.cache, last_only=True)[:, -1].float()

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        logits = self._step(self.model, tokens, self.cache)
        return logits.clone() if self._copy_out else logits

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """All-real tokens [B, T] -> fp32 logits [B, T, V] for every position (speculative verification)."""
        return forward_static(self.model, input_ids, torch.ones_like(input_ids), self.cache).float()


class Seq2SeqEngine:
    """Encoder-decoders: ``prefill`` encodes the source once and feeds the decoder start token; ``step`` runs the
    decoder on one token with an :class:`~llmarch.nn.cache.EncoderDecoderCache` (cross-attention k/v projected
    once). The generated sequence starts with the start token, not the source."""

    def __init__(self, model, start: int | None, encode=None):
        start = model.config.decoder_start_token_id if start is None else start
        if start is None:
            raise ValueError("decoder_start_token_id: the config has none; pass decoder_start_token_id=")
        self.model, self.start = model, start
        self.encode = model.encode if encode is None else encode  # (input_ids, attention_mask) -> CrossMemory

    def prefix(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        ids = torch.full((input_ids.shape[0], 1), self.start, dtype=torch.long, device=input_ids.device)
        return ids, torch.ones_like(ids), []

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        self.memory = self.encode(input_ids, attention_mask)
        self.cache = EncoderDecoderCache(self.memory)
        ids, _, _ = self.prefix(input_ids, attention_mask)
        return self.model.decode(ids, self.memory, cache=self.cache).logits[:, -1].float()

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.decode(tokens[:, None], self.memory, cache=self.cache).logits[:, -1].float()


def make_engine(model, kind: str, batch: int, max_len: int, compile: bool = False,
                compile_mode: str | None = None, decoder_start_token_id: int | None = None,
                prefill_inputs: dict | None = None):
    """``kind``: "dynamic" (growing cache, model.forward) or "static" (pre-allocated, compilable); encoder-decoders
    always use the growing cache of :class:`Seq2SeqEngine`; ``prefill_inputs`` (pixel_values for images, style
    for a conditioned model) the dynamic engine, which hands them to the prefill."""
    if prefill_inputs:
        for name in prefill_inputs:
            field = "condition" if name in ("style", "instruction") else "vision"
            if getattr(model.config, field, None) is None:
                raise ValueError(f"{name}: this model takes none (config.{field} is None)")
        if kind != "dynamic" or compile:
            raise ValueError(f"cache: {sorted(prefill_inputs)} decode with cache='dynamic' (the static engine reads "
                             "text only)")
        return DynamicEngine(model, prefill_inputs, max_len)
    if model.config.kind == "encoder_decoder":
        if kind != "dynamic" or compile:
            raise ValueError("cache: encoder-decoders decode with cache='dynamic' (no static cache or compile yet)")
        return Seq2SeqEngine(model, decoder_start_token_id)
    if kind == "dynamic":
        if compile:
            raise ValueError("compile=True needs cache='static' (a growing cache changes shape every step)")
        return DynamicEngine(model, max_len=max_len)
    if kind == "static":
        return StaticEngine(model, batch, max_len, compile, compile_mode)
    raise ValueError(f"cache must be 'dynamic' or 'static', got {kind!r}")
