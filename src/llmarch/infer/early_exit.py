"""Early exit (CALM, Schuster et al. 2022; the learned exit classifiers of seed 002's AdaptiveLLM): after each
layer a confidence measure decides whether the current hidden state is good enough to predict the next token
through the final norm and LM head; if it exceeds the threshold the remaining layers are skipped. Their KV entries for this token are filled from the exited state
(CALM's state propagation), so later tokens can still attend to every layer. Confidence is at most 1 and exit
needs confidence > threshold, so threshold 1.0 is the full model. Batch 1."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from llmarch.infer.generate import check_prompt
from llmarch.infer.sampling import Sampling
from llmarch.nn.attention import AttnContext
from llmarch.nn.cache import KVCache
from llmarch.registry import Registry

EXIT_CRITERIA: Registry = Registry("exit criterion")


def head(model, h: torch.Tensor) -> torch.Tensor:
    """Hidden states [B, T, D] -> fp32 logits [B, T, V] through the final norm and LM head."""
    return model.lm_head(model.decoder.final_norm(h)).float()


@EXIT_CRITERIA.register("softmax")
def softmax_confidence(model, h: torch.Tensor, h_prev: torch.Tensor,
                       layer: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Softmax response: the top probability of the intermediate prediction (costs one LM head per layer).
    h [B, 1, D] -> (confidence [B], logits [B, V])."""
    logits = head(model, h)[:, -1]
    return logits.softmax(-1).amax(-1), logits


@EXIT_CRITERIA.register("state")
def state_confidence(model, h: torch.Tensor, h_prev: torch.Tensor, layer: int = 0) -> tuple[torch.Tensor, None]:
    """Hidden-state saturation: cosine similarity of this layer's output and its input (cheap, no head)."""
    return F.cosine_similarity(h[:, -1].float(), h_prev[:, -1].float(), dim=-1).clamp(max=1.0), None


@EXIT_CRITERIA.register("learned")
def learned_confidence(model, h: torch.Tensor, h_prev: torch.Tensor, layer: int = 0) -> tuple[torch.Tensor, None]:
    """The model's own exit classifier for this layer (exit_heads models, trained with causal_lm_exits)."""
    if not hasattr(model, "exit_gates"):
        raise ValueError("criterion 'learned' needs a model with exit_heads=True, trained with causal_lm_exits")
    return model.exit_gates(layer, h[:, -1:])[:, -1], None


@dataclass
class ExitStats:
    layers: list[int] = field(default_factory=list)  # layers run per decoded token

    @property
    def mean_layers(self) -> float:
        return sum(self.layers) / len(self.layers) if self.layers else 0.0


class EarlyExitDecoder:
    """Token-by-token decoding over a KV cache with per-token exits."""

    def __init__(self, model, threshold: float, criterion: str = "softmax", min_layers: int = 1):
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1] (1.0 = never exit early), got {threshold}")
        n_layers = len(model.decoder.layers)
        if not 1 <= min_layers <= n_layers:
            raise ValueError(f"min_layers must be in [1, {n_layers}], got {min_layers}")
        self.model, self.threshold, self.min_layers = model.eval(), threshold, min_layers
        self.confidence = EXIT_CRITERIA[criterion]
        self.cache = KVCache()
        self.stats = ExitStats()

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The prompt [1, T] through the full model; returns the last position's logits [1, V]."""
        return self.model(input_ids, cache=self.cache, logits_to_keep=1).logits[:, -1].float()

    @torch.no_grad()
    def step(self, token: torch.Tensor) -> torch.Tensor:
        """token [1] -> logits [1, V] for the next position, exiting as early as the criterion allows."""
        model, past = self.model, self.cache.length
        positions = model.decoder.positions
        position_ids = torch.full((1, 1), past, dtype=torch.long, device=token.device)
        ctx = AttnContext(past, 1, positions, position_ids, None, causal=True, device=token.device)
        h = model.embed(token[:, None], positions, position_ids)
        layers, logits = model.decoder.layers, None
        for i, layer in enumerate(layers):
            h_prev, h = h, layer(h, ctx, self.cache)
            if i + 1 == len(layers) or i + 1 < self.min_layers:
                continue
            conf, logits = self.confidence(model, h, h_prev, layer=i)
            if float(conf) > self.threshold:
                for later in layers[i + 1:]:  # state propagation: later layers cache k/v of the exited state
                    later.attn(later.attn_input(h), ctx, self.cache)
                self.stats.layers.append(i + 1)
                break
            logits = None
        else:
            self.stats.layers.append(len(layers))
        self.cache.advance(1)
        return head(model, h)[:, -1] if logits is None else logits


@torch.no_grad()
def early_exit_generate(model, input_ids: torch.Tensor, max_new_tokens: int = 32, threshold: float = 0.9,
                        criterion: str = "softmax", min_layers: int = 1, temperature: float = 0.0,
                        top_k: int | None = None, top_p: float | None = None, eos_token_id: int | None = None,
                        seed: int | None = None) -> tuple[torch.Tensor, ExitStats]:
    """Generate with early exits. input_ids [1, T] -> ([1, T + n], per-token layer counts)."""
    input_ids, _ = check_prompt(model, input_ids, None, max_new_tokens)
    if input_ids.shape[0] != 1:
        raise ValueError(f"early exit decodes one prompt (batch 1), got batch {input_ids.shape[0]}")
    gen = torch.Generator(device=input_ids.device).manual_seed(seed) if seed is not None else None
    sampling, dec = Sampling(temperature, top_k, top_p), EarlyExitDecoder(model, threshold, criterion, min_layers)
    logits, out = dec.prefill(input_ids), [input_ids]
    for i in range(max_new_tokens):
        nxt = sampling.sample(logits, generator=gen)
        out.append(nxt[:, None])
        if eos_token_id is not None and int(nxt) == eos_token_id:
            break
        if i + 1 < max_new_tokens:
            logits = dec.step(nxt)
    return torch.cat(out, 1), dec.stats


@torch.no_grad()
def early_exit_nll(model, ids: torch.Tensor, threshold: float, criterion: str = "softmax",
                   min_layers: int = 1) -> tuple[float, ExitStats]:
    """Teacher-forced mean next-token NLL of ids [1, T] (T >= 2) decoding token by token with early exits."""
    dec = EarlyExitDecoder(model, threshold, criterion, min_layers)
    logits, nll = dec.prefill(ids[:, :1]), []
    for t in range(1, ids.shape[1]):
        nll.append(F.cross_entropy(logits, ids[:, t]))
        if t + 1 < ids.shape[1]:
            logits = dec.step(ids[:, t])
    return float(torch.stack(nll).mean()), dec.stats
