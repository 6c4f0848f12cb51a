"""Assembly: embeddings, one or two stacks of blocks (decoder-only, encoder-only or encoder-decoder, the ``kind``
config value), final norms and the output head, all chosen from the config."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from llmarch.config import ModelConfig
from llmarch.model_inputs import (_global_mask, _key_padding, check_documents, check_input_ids,  # noqa: F401
                                  check_logits_to_keep, check_token_types, document_positions,
                                  position_ids_from_mask)
from llmarch.nn.attention import AttnContext
from llmarch.nn.block import BLOCKS, CROSS_BLOCKS
from llmarch.nn.cache import CrossMemory, EncoderDecoderCache, KVCache
from llmarch.nn.cross_attention import CrossAttention
from llmarch.nn.embedding import Embeddings
from llmarch.nn import fused_decode
from llmarch.nn.ffn import FFNS
from llmarch.nn.heads import build_head
from llmarch.nn.mixers import MIXERS
from llmarch.nn.moe import MoE, aux_loss
from llmarch.nn.norm import make_norm
from llmarch.nn.patterns import build_pattern
from llmarch.nn.position import build_positions


@dataclass
class ModelOutput:
    logits: torch.Tensor  # [B, T, V] from the default head ([B, n_labels] for the classification head)
    hidden_states: torch.Tensor  # [B, T, D] after the final norm (decoder side for encoder-decoders)
    aux_loss: torch.Tensor  # scalar; MoE balance losses, 0 when dense
    cache: KVCache | None = None
    pooled: torch.Tensor | None = None  # [B, D] pooled first position (pretraining / classification heads)
    nsp_logits: torch.Tensor | None = None  # [B, 2] next-sentence prediction (pretraining head)
    encoder_hidden_states: torch.Tensor | None = None  # [B, S, D] encoder output (encoder-decoders)
    attentions: dict[str, torch.Tensor] | None = None  # output_attentions: attention module name -> [B, H, T, S]
    exit_logits: list[torch.Tensor] | None = None  # output_exits: [B, T, V] after each decoder layer but the last
    exit_confidence: list[torch.Tensor] | None = None  # output_exits: the learned exit gates' [B, T] per exit layer


def norm_for(cfg: ModelConfig, dim: int | None = None) -> nn.Module:
    return make_norm(cfg.norm, dim or cfg.d_model, cfg.norm_eps, cfg.norm_bias)


def ffn_for(cfg: ModelConfig, layer: int) -> nn.Module:
    """The FFN of layer ``layer``; with ``cfg.moe``, MoE on the schedule's layers and ``moe.expert_ffn`` elsewhere."""
    if cfg.moe is not None:
        if cfg.moe.is_moe_layer(layer):
            return MoE(cfg.d_model, cfg.moe.expert_d_ff(cfg.d_ff), cfg.activation, dropout=cfg.dropout, moe=cfg.moe)
        return FFNS[cfg.moe.expert_ffn](cfg.d_model, cfg.d_ff, cfg.activation, dropout=cfg.dropout)
    return FFNS[cfg.ffn](cfg.d_model, cfg.d_ff, cfg.activation, bias=cfg.ffn_bias, dropout=cfg.dropout)


def cross_attention_for(cfg: ModelConfig, layer: int, cls: type[CrossAttention] = CrossAttention, **extra):
    """The cross-attention of decoder layer ``layer`` (``cls`` may be a variant taking ``extra`` arguments)."""
    return cls(cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.dh, layer_idx=layer, qkv_bias=cfg.qkv_bias,
               out_bias=cfg.out_bias, scale=cfg.attn_scale, kernel=cfg.attn_kernel, dropout=cfg.attn_dropout, **extra)


class Stack(nn.Module):
    """L blocks and the final norm, sharing one position scheme. x [B, T, D] -> [B, T, D].

    ``causal``: queries see only earlier keys (decoders) or every key (encoders). ``cross``: each block also
    attends to the encoder output (the decoder of an encoder-decoder). ``cross_for(i)``, when given, builds the
    cross module of layer i instead (None: a plain block there), for per-layer schedules such as RETRO's;
    ``block_for(i)``, when given, may return a whole block that replaces layer i (None: built as above)."""

    def __init__(self, cfg: ModelConfig, causal: bool, cross: bool = False, n_layers: int | None = None,
                 cross_for: Callable[[int], nn.Module | None] | None = None,
                 block_for: Callable[[int], nn.Module | None] | None = None):
        super().__init__()
        self.causal, self.cross = causal, cross
        if cross_for is None:
            cross_for = (lambda i: cross_attention_for(cfg, i)) if cross else (lambda i: None)
        n_layers = n_layers or cfg.n_layers
        patterns = {name: build_pattern(name, window=cfg.window, sparse=cfg.sparse, causal=causal)
                    for name in set(cfg.pattern)}
        self.positions = build_positions(cfg.position, d_model=cfg.d_model, n_heads=cfg.n_heads,
                                         head_dim=cfg.rope_head_dim, max_seq_len=cfg.max_seq_len, rope=cfg.rope,
                                         causal=causal,
                                         rel_buckets=cfg.rel_buckets, rel_max_distance=cfg.rel_max_distance)
        block_for = block_for or (lambda i: None)
        self.layers = nn.ModuleList(block_for(i) or self._block(cfg, i, patterns[cfg.layer_pattern(i)], cross_for(i))
                                    for i in range(n_layers))
        self.final_norm = norm_for(cfg) if cfg.final_norm else nn.Identity()

    def _block(self, cfg: ModelConfig, i: int, pattern, cross: nn.Module | None) -> nn.Module:
        attn = MIXERS[cfg.layer_mixer(i)].build(cfg, i, pattern)
        ffn = ffn_for(cfg, i)
        ffn_norm = norm_for(cfg) if getattr(ffn, "has_norm", True) else nn.Identity()  # FFN "none" has none
        if cross is None:
            return BLOCKS[cfg.norm_placement](attn, ffn, norm_for(cfg), ffn_norm, dropout=cfg.dropout,
                                                 clamp=cfg.fp16_clamp)
        return CROSS_BLOCKS[cfg.norm_placement](attn, cross, ffn, norm_for(cfg), norm_for(cfg), ffn_norm,
                                                dropout=cfg.dropout, clamp=cfg.fp16_clamp)

    def forward(self, x: torch.Tensor, ctx: AttnContext, cache: KVCache | None) -> torch.Tensor:
        fused = fused_decode.run(self, x, ctx, cache) if cache is not None and ctx.T == 1 else None
        if fused is not None:  # a decode step with every layer in one native call (llmarch.nn.fused_decode)
            return self.final_norm(fused)
        for layer in self.layers:
            x = layer(x, ctx, cache)
        return self.final_norm(x)


def cache_class_for(classes) -> type[KVCache]:
    """The most derived of the mixers' cache classes; they must lie on one line of subclasses."""
    classes = list(dict.fromkeys(classes))
    best = classes[0]
    for c in classes[1:]:
        if issubclass(c, best):
            best = c
        elif not issubclass(best, c):
            raise ValueError(f"layer_mixers: no cache serves both {best.__name__} and {c.__name__} layers; "
                             "schedule mixers whose caches are compatible")
    return best


class Model(nn.Module):
    """A model built from a :class:`ModelConfig`: decoder-only (``decoder`` stack), encoder-only (``encoder``)
    or encoder-decoder (both; the token embedding is shared), with the head named by ``cfg.head`` as ``lm_head``."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embed = Embeddings(cfg.vocab_size, cfg.d_model, norm_for(cfg) if cfg.embed_norm else nn.Identity(),
                                cfg.dropout, cfg.type_vocab_size, math.sqrt(cfg.d_model) if cfg.scale_embeddings
                                else 1.0)
        if cfg.kind != "decoder":
            self.encoder = Stack(cfg, causal=False)
        if cfg.kind != "encoder":
            self.decoder = Stack(cfg, causal=True, cross=cfg.kind == "encoder_decoder",
                                 n_layers=cfg.n_decoder_layers or cfg.n_layers, cross_for=self.decoder_cross(cfg),
                                 block_for=self.decoder_blocks(cfg))
        self.lm_head = build_head(cfg)
        if cfg.exit_heads:
            from llmarch.nn.exits import ExitGates

            self.exit_gates = ExitGates(cfg.d_model, cfg.n_layers - 1)
        if cfg.tie_embeddings and self.lm_head.tied_name:
            self.lm_head.tie(self.embed.tokens)

    def new_cache(self) -> KVCache:
        """An empty cache of the kind this model fills: EncoderDecoderCache for encoder-decoders, else the one
        cache class that serves every scheduled mixer (KVCache, LatentCache for latent attention, StateCache for
        recurrent mixers, which also holds k/v for the attention layers of a hybrid)."""
        if self.config.kind == "encoder_decoder":
            return EncoderDecoderCache()
        return cache_class_for(MIXERS[m].cache for m in self.config.mixers)()

    def decoder_cross(self, cfg: ModelConfig) -> Callable[[int], nn.Module | None] | None:
        """Builder of the decoder's per-layer cross modules; None: the stack's default (variants override it)."""
        return None

    def decoder_blocks(self, cfg: ModelConfig) -> Callable[[int], nn.Module | None] | None:
        """Builder of decoder blocks that replace the plain ones on a schedule; None: none (variants override it)."""
        return None

    def tied_names(self) -> dict[str, str]:
        """Parameters that alias another one: {alias: source} (the tied head weight and the token embedding)."""
        if self.config.tie_embeddings and self.lm_head.tied_name:
            return {f"lm_head.{self.lm_head.tied_name}": "embed.tokens.weight"}
        return {}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache: KVCache | None = None,
                use_cache: bool = False, *, token_type_ids: torch.Tensor | None = None,
                decoder_input_ids: torch.Tensor | None = None,
                decoder_attention_mask: torch.Tensor | None = None,
                global_attention_mask: torch.Tensor | None = None, output_attentions: bool = False,
                output_exits: bool = False, pixel_values: torch.Tensor | None = None,
                document_ids: torch.Tensor | None = None, logits_to_keep: int = 0) -> ModelOutput:
        """input_ids [B, T] (long); attention_mask [B, S_total] over cached + new tokens (1 = real, 0 = padding);
        position_ids [B, T] (default: from the mask, skipping padding, plus ``position_offset``); token_type_ids
        [B, T] (segments). Encoder-decoders also take decoder_input_ids [B, T'] (+ decoder_attention_mask) and
        return the decoder's logits; a cache that already holds the encoded memory skips the encoder.
        global_attention_mask [B, S_total] (1 = global token) feeds patterns with global attention (Longformer).
        document_ids [B, T] packs several documents per row (no cache): a token attends only to tokens with its id
        and positions restart at each new id (see :func:`document_positions`).
        output_attentions: also return every attention module's weights (computed by the reference kernel).
        output_exits (exit_heads models): also the intermediate predictions and learned exit confidences.
        pixel_values [n_images, C, H, W] only for models with ``config.vision`` (VisionLanguageModel).
        logits_to_keep: n > 0 runs the head on the last n positions only (logits [B, n, V]; a prefill needs just
        the last); 0: on every position. ``hidden_states`` keep every position."""
        if pixel_values is not None:  # vision configs build a VisionLanguageModel, which reads them
            raise ValueError("pixel_values: this model reads text only (config.vision is None); use a vision "
                             "preset such as llava-tiny")
        check_logits_to_keep(logits_to_keep, self.lm_head)
        if output_exits:
            return self._with_exits(input_ids, attention_mask, position_ids, cache, use_cache)
        if output_attentions:
            from llmarch.nn.attention_maps import record_attentions

            with record_attentions(self) as maps:
                out = self(input_ids, attention_mask, position_ids, cache, use_cache, token_type_ids=token_type_ids,
                           decoder_input_ids=decoder_input_ids, decoder_attention_mask=decoder_attention_mask,
                           global_attention_mask=global_attention_mask,
                           document_ids=document_ids, logits_to_keep=logits_to_keep)
            out.attentions = {name: w[-1] for name, w in maps.items() if w}  # the last call (recomputation repeats it)
            return out
        kind = self.config.kind
        if kind == "encoder_decoder":
            return self._seq2seq(input_ids, attention_mask, position_ids, cache, use_cache, token_type_ids,
                                 decoder_input_ids, decoder_attention_mask, logits_to_keep)
        if decoder_input_ids is not None or decoder_attention_mask is not None:
            raise ValueError(f"decoder_input_ids: only encoder-decoder models take them (kind is {kind!r})")
        if kind == "encoder":
            if cache is not None or use_cache:
                raise ValueError("cache: an encoder attends in both directions and has no incremental cache; "
                                 "call it on the whole sequence")
            h = self._run(self.encoder, input_ids, attention_mask, position_ids, token_type_ids, None, None,
                          global_attention_mask, document_ids)
            return self._output(h, None, logits_to_keep=logits_to_keep)
        if cache is None and use_cache:
            cache = self.new_cache()
        h = self._run(self.decoder, input_ids, attention_mask, position_ids, token_type_ids, cache, None,
                      global_attention_mask, document_ids)
        return self._output(h, cache, input_ids, attention_mask, logits_to_keep)

    def _with_exits(self, input_ids, attention_mask, position_ids, cache, use_cache) -> ModelOutput:
        from llmarch.nn.exits import record_layer_outputs

        if not self.config.exit_heads:
            raise ValueError("output_exits: the model has no exit heads; build it with exit_heads=True")
        with record_layer_outputs(self.decoder) as states:
            out = self(input_ids, attention_mask, position_ids, cache, use_cache)
        exits = states[:-1]
        out.exit_logits = [self.lm_head(self.decoder.final_norm(h)) for h in exits]
        out.exit_confidence = [self.exit_gates(i, h) for i, h in enumerate(exits)]
        return out

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
               token_type_ids: torch.Tensor | None = None, position_ids: torch.Tensor | None = None) -> CrossMemory:
        """Run the encoder stack once: the memory a decoder attends to (states [B, S, D] + padding)."""
        h = self._run(self.encoder, input_ids, attention_mask, position_ids, token_type_ids, None, None)
        return CrossMemory(h, _key_padding(attention_mask))

    def decode(self, decoder_input_ids: torch.Tensor, memory: CrossMemory,
               decoder_attention_mask: torch.Tensor | None = None,
               cache: EncoderDecoderCache | None = None, logits_to_keep: int = 0) -> ModelOutput:
        """Run the decoder stack over decoder_input_ids [B, T] against ``memory``; with a cache, only the new tokens.
        ``logits_to_keep`` as in :meth:`forward`."""
        check_logits_to_keep(logits_to_keep, self.lm_head)
        h = self._run(self.decoder, decoder_input_ids, decoder_attention_mask, None, None, cache, memory)
        out = self._output(h, cache, logits_to_keep=logits_to_keep)
        out.encoder_hidden_states = memory.states
        return out

    def _seq2seq(self, input_ids, attention_mask, position_ids, cache, use_cache, token_type_ids,
                 decoder_input_ids, decoder_attention_mask, logits_to_keep=0) -> ModelOutput:
        if decoder_input_ids is None:
            raise ValueError("decoder_input_ids: an encoder-decoder needs decoder inputs (e.g. the decoder start "
                             "token followed by the target shifted right)")
        if cache is None and use_cache:
            cache = EncoderDecoderCache()
        if cache is not None and not isinstance(cache, EncoderDecoderCache):
            raise ValueError(f"cache: encoder-decoder models take an EncoderDecoderCache, got {type(cache).__name__}")
        memory = cache.memory if cache is not None else None
        if memory is None:
            memory = self.encode(input_ids, attention_mask, token_type_ids, position_ids)
            if cache is not None:
                cache.memory = memory
        return self.decode(decoder_input_ids, memory, decoder_attention_mask, cache, logits_to_keep)

    def _run(self, stack: Stack, input_ids, attention_mask, position_ids, token_type_ids, cache,
             memory, global_attention_mask=None, document_ids=None) -> torch.Tensor:
        """Embed and run one stack. Returns [B, T, D]; advances ``cache`` by T."""
        cfg = self.config
        B, T = check_input_ids(input_ids, cfg.input_vocab_size)
        past = cache.length if cache is not None else 0
        if attention_mask is not None and attention_mask.shape != (B, past + T):
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}; expected "
                             f"{(B, past + T)} = (batch, cached {past} + new {T} tokens)")
        if token_type_ids is not None:
            check_token_types(token_type_ids, (B, T), cfg.type_vocab_size)
        if document_ids is not None:
            document_ids = check_documents(document_ids, (B, T), cache)
        start = None  # every row's position ids are start, ..., start + T - 1 (known without reading them)
        if position_ids is None:
            if document_ids is not None:
                position_ids = document_positions(document_ids)
            elif attention_mask is not None:
                position_ids = position_ids_from_mask(attention_mask, T)
            else:
                start = past + cfg.position_offset
                position_ids = torch.arange(start, start + T, device=input_ids.device).expand(B, T)
            if cfg.position_offset and start is None:
                position_ids = position_ids + cfg.position_offset
        x = self.embed_inputs(input_ids, stack.positions, position_ids, token_type_ids, memory)
        ctx = AttnContext(past, T, stack.positions, position_ids, _key_padding(attention_mask), causal=stack.causal,
                          device=input_ids.device, memory=memory,
                          global_mask=_global_mask(global_attention_mask, (B, past + T)), document_ids=document_ids,
                          position_start=start)
        h = stack(x, ctx, cache)
        if cache is not None:
            cache.advance(T)
        return h

    def embed_inputs(self, input_ids, positions, position_ids, token_type_ids, memory) -> torch.Tensor:
        """The stack's input [B, T, D]: the embeddings of input_ids (variants place other inputs, e.g. image
        features from ``memory``)."""
        return self.embed(input_ids, positions, position_ids, token_type_ids)

    def _output(self, h: torch.Tensor, cache: KVCache | None, input_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, logits_to_keep: int = 0) -> ModelOutput:
        # a head that reads the tokens (the last-token score of a reward model) gets them
        tokens = dict(input_ids=input_ids, attention_mask=attention_mask) if getattr(
            self.lm_head, "reads_tokens", False) else {}
        outs = self.lm_head.outputs(h[:, -logits_to_keep:] if logits_to_keep else h, **tokens)
        # MoE layers exist only with ffn="moe" (build): a dense model skips the walk over its modules (~0.4 ms
        # of a 12 ms decode step on a slow host)
        aux = aux_loss(self, h) if self.config.moe is not None else h.new_zeros((), dtype=torch.float32)
        return ModelOutput(outs.pop("logits"), h, aux, cache, **outs)


def init_weights(model: nn.Module, std: float, n_layers: int) -> None:
    """Normal(0, std) for matrices and embeddings, zeros for biases, ones for norm gains; output projections of
    residual branches get std / sqrt(2L) (GPT-2's scaled init)."""
    residual_std = std / math.sqrt(2 * n_layers)
    for name, p in model.named_parameters():
        if p.dim() >= 2:
            is_residual_out = name.endswith(("attn.out.weight", "cross.out.weight", "ffn.down.weight", "experts.down"))
            nn.init.normal_(p, 0.0, residual_std if is_residual_out else std)
        elif name.endswith("bias"):
            nn.init.zeros_(p)
        else:
            nn.init.ones_(p)


def model_class(cfg) -> type[nn.Module]:
    """The module class a config builds: Model, or a variant for retrieval, images, or a vision tower alone."""
    from llmarch.vision_config import VisionConfig

    if isinstance(cfg, VisionConfig):
        from llmarch.nn.vision.tower import VisionTower

        return VisionTower
    if cfg.retrieval is not None:
        from llmarch.retrieval.retro import RetroModel  # a decoder with chunked cross-attention

        return RetroModel
    if cfg.vision is not None:
        from llmarch.nn.vision.vlm import VisionLanguageModel  # a decoder that reads images

        return VisionLanguageModel
    if cfg.condition is not None:
        from llmarch.nn.condition import ConditionedModel  # a decoder conditioned on a style id or instruction

        return ConditionedModel
    return Model


def build(cfg: ModelConfig, dtype: torch.dtype | None = None, device: str | torch.device | None = None) -> Model:
    """Build and initialise a model. ``device="meta"`` allocates nothing (for counting and analysis)."""
    from llmarch.vision_config import VisionConfig

    if not isinstance(cfg, (ModelConfig, VisionConfig)):
        raise TypeError(f"build() takes a ModelConfig (or a VisionConfig), got {type(cfg).__name__}; use "
                        "llmarch.preset(name)")
    cls = model_class(cfg)
    with torch.device(device or "cpu"):
        model = cls(cfg)
    if str(device) != "meta":
        with torch.no_grad():
            init_weights(model, cfg.init_std, cfg.n_layers)
            for module in model.modules():  # components that start from a particular point (e.g. a zero output)
                if hasattr(module, "after_init"):
                    module.after_init()
    if dtype is not None:
        model = model.to(dtype)
    return model
