"""Speculative decoding (Leviathan et al. 2023; Chen et al. 2023): a small draft model proposes k tokens, the
target scores all of them in one forward, and rejection sampling keeps each proposal with probability
min(1, p(x)/q(x)), resampling the first rejected one from norm(max(0, p - q)). The output follows the target's
distribution exactly; with greedy settings it is the target's greedy output. Batch 1 (rows would accept
different numbers of tokens). Both models decode on static caches, so rejecting tokens is a rollback."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from llmarch.infer.decode import StaticEngine
from llmarch.infer.generate import check_prompt
from llmarch.infer.sampling import Sampling


@dataclass
class SpeculativeStats:
    proposed: int = 0  # draft tokens offered to the target
    accepted: int = 0  # of which the target kept
    target_calls: int = 0  # target forwards after the prefill
    new_tokens: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def tokens_per_target_call(self) -> float:
        return self.new_tokens / self.target_calls if self.target_calls else 0.0


def verify(p: torch.Tensor, q: torch.Tensor, drafted: torch.Tensor,
           generator: torch.Generator | None = None) -> tuple[int, int]:
    """Rejection step. p [k+1, V] target probabilities after each prefix, q [k, V] the draft's, drafted [k] the
    proposals. Returns (n accepted, the next token: a resample at the first rejection, else a bonus token)."""
    k = drafted.shape[0]
    u = torch.rand(k, generator=generator, device=p.device)
    idx = torch.arange(k, device=p.device)
    ratio = p[idx, drafted] / q[idx, drafted]
    rejected = (u >= ratio).nonzero()
    if len(rejected) == 0:
        return k, int(torch.multinomial(p[k], 1, generator=generator))
    n = int(rejected[0])
    residual = (p[n] - q[n]).clamp(min=0)
    if float(residual.sum()) <= 0:  # p == q up to rounding: the rejection had probability ~0
        residual = p[n]
    return n, int(torch.multinomial(residual / residual.sum(), 1, generator=generator))


@torch.no_grad()
def speculative_generate(target, draft, input_ids: torch.Tensor, max_new_tokens: int = 32, k: int = 4,
                         temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                         min_p: float | None = None, eos_token_id: int | None = None, seed: int | None = None,
                         generator: torch.Generator | None = None) -> tuple[torch.Tensor, SpeculativeStats]:
    """Generate with ``target`` helped by ``draft`` (same vocabulary). input_ids [1, T] -> ([1, T + n], stats)."""
    if k < 1:
        raise ValueError(f"k (draft tokens per round) must be >= 1, got {k}")
    if draft.config.vocab_size != target.config.vocab_size:
        raise ValueError(f"draft vocab_size {draft.config.vocab_size} != target vocab_size "
                         f"{target.config.vocab_size}; the draft must share the target's tokenizer")
    input_ids, _ = check_prompt(target, input_ids, None, max_new_tokens)
    if input_ids.shape[0] != 1:
        raise ValueError(f"speculative decoding takes one prompt (batch 1), got batch {input_ids.shape[0]}")
    if generator is None and seed is not None:
        generator = torch.Generator(device=input_ids.device).manual_seed(seed)
    sampling = Sampling(temperature, top_k, top_p, min_p)
    T = input_ids.shape[1]
    room = T + max_new_tokens + k + 1
    tgt, dft = StaticEngine(target.eval(), 1, room), StaticEngine(draft.eval(), 1, room)
    if T > 1:  # both caches hold everything but the pending tokens
        tgt.forward(input_ids[:, :-1])
        dft.forward(input_ids[:, :-1])
    out, stats = input_ids[0].tolist(), SpeculativeStats()
    tgt_pending, dft_pending = [out[-1]], [out[-1]]
    while stats.new_tokens < max_new_tokens:
        k_now = min(k, max_new_tokens - stats.new_tokens - 1)
        drafted, q = [], []
        q_logits = dft.forward(torch.tensor([dft_pending], device=input_ids.device))[0, -1]
        for i in range(k_now):
            q.append(sampling.probs(q_logits[None])[0])
            drafted.append(int(torch.multinomial(q[-1], 1, generator=generator)))
            if i + 1 < k_now:
                q_logits = dft.forward(torch.tensor([[drafted[-1]]], device=input_ids.device))[0, -1]
        p = sampling.probs(tgt.forward(torch.tensor([tgt_pending + drafted], device=input_ids.device))[0])
        stats.target_calls += 1
        if k_now:
            n, nxt = verify(p, torch.stack(q), torch.tensor(drafted, device=p.device), generator)
        else:
            n, nxt = 0, int(torch.multinomial(p[0], 1, generator=generator))
        stats.proposed, stats.accepted = stats.proposed + k_now, stats.accepted + n
        tgt.cache.rollback(k_now - n)
        dft.cache.rollback(max(k_now - 1, 0) - min(n, max(k_now - 1, 0)))
        new = drafted[:n] + [nxt]
        tgt_pending = [nxt]
        dft_pending = ([drafted[-1]] if k_now and n == k_now else []) + [nxt]
        if eos_token_id is not None and eos_token_id in new:
            new = new[:new.index(eos_token_id) + 1]
            out += new
            stats.new_tokens += len(new)
            break
        out += new
        stats.new_tokens += len(new)
    return torch.tensor([out], device=input_ids.device), stats
