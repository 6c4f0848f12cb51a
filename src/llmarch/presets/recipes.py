"""The optimisation recipes the papers published for their pre-training runs, per preset, with sources:
``llmarch train --preset NAME --recipe paper`` takes the learning rate, AdamW betas and epsilon, weight decay,
gradient clipping, warmup and final learning-rate ratio from here (flags given explicitly still win). The papers'
global batch and token budget are recorded too, but not applied: on one machine ``--batch-size``, ``--seq-len`` and
``--steps`` decide those. Warmup is converted to steps of the paper's batch."""
from __future__ import annotations

from typing import NamedTuple


class Recipe(NamedTuple):
    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    clip: float
    warmup: int  # steps
    min_lr_ratio: float  # final / peak learning rate of the cosine schedule
    batch_tokens: float  # the paper's global batch, tokens (not applied)
    tokens: float  # the paper's training tokens (not applied)
    source: str

    def settings(self) -> dict:
        """The TrainConfig fields the recipe sets."""
        return dict(lr=self.lr, beta1=self.beta1, beta2=self.beta2, eps=self.eps, weight_decay=self.weight_decay,
                    clip=self.clip, warmup=self.warmup, min_lr_ratio=self.min_lr_ratio)


_LLAMA1 = ("Touvron et al. 2023a (LLaMA), §2.2 and Table 2: AdamW b1 0.9 b2 0.95, cosine to 10% of the peak, "
           "weight decay 0.1, clipping 1.0, 2,000 warmup steps, 4M-token batches (eps not stated; LLaMA 2's 1e-5)")
_LLAMA2 = ("Touvron et al. 2023b (Llama 2), §2.2 and Table 1: AdamW b1 0.9 b2 0.95 eps 1e-5, cosine to 10%, "
           "2,000 warmup steps, weight decay 0.1, clipping 1.0, 4M-token batches, 2T tokens")
_GPT3 = ("Brown et al. 2020 (GPT-3), App. B and Table 2.1: Adam b1 0.9 b2 0.95 eps 1e-8, clipping 1.0, cosine to "
         "10% over 260B tokens, linear warmup over the first 375M tokens, weight decay 0.1, 300B tokens")


def _llama(lr: float, tokens: float, source: str) -> Recipe:
    return Recipe(lr, 0.9, 0.95, 1e-5, 0.1, 1.0, 2000, 0.1, 4e6, tokens, source)


def _gpt3(lr: float, batch_tokens: float) -> Recipe:
    return Recipe(lr, 0.9, 0.95, 1e-8, 0.1, 1.0, round(375e6 / batch_tokens), 0.1, batch_tokens, 300e9, _GPT3)


RECIPES: dict[str, Recipe] = {
    "llama-7b": _llama(3.0e-4, 1.0e12, _LLAMA1), "llama-13b": _llama(3.0e-4, 1.0e12, _LLAMA1),
    "llama-33b": _llama(1.5e-4, 1.4e12, _LLAMA1), "llama-65b": _llama(1.5e-4, 1.4e12, _LLAMA1),
    "llama-2-7b": _llama(3.0e-4, 2e12, _LLAMA2), "llama-2-13b": _llama(3.0e-4, 2e12, _LLAMA2),
    "llama-2-34b": _llama(1.5e-4, 2e12, _LLAMA2), "llama-2-70b": _llama(1.5e-4, 2e12, _LLAMA2),
    # Dubey et al. 2024 (The Llama 3 Herd of Models), §3.4.1: peak 8e-5, 8,000 warmup steps, cosine to 8e-7;
    # batches grow from 4M to 16M tokens; 15.6T tokens (betas, eps and decay as Llama 2: the paper does not restate)
    "llama-3.1-405b": Recipe(8e-5, 0.9, 0.95, 1e-5, 0.1, 1.0, 8000, 0.01, 16e6, 15.6e12,
                             "Dubey et al. 2024 (Llama 3), §3.4.1: peak lr 8e-5, 8,000 warmup steps, cosine to "
                             "8e-7, batch 4M -> 16M tokens, 15.6T tokens"),
    "gpt3-125m": _gpt3(6.0e-4, 0.5e6), "gpt3-350m": _gpt3(3.0e-4, 0.5e6), "gpt3-760m": _gpt3(2.5e-4, 0.5e6),
    "gpt3-1.3b": _gpt3(2.0e-4, 1e6), "gpt3-2.7b": _gpt3(1.6e-4, 1e6), "gpt3-6.7b": _gpt3(1.2e-4, 2e6),
    "gpt3-13b": _gpt3(1.0e-4, 2e6), "gpt3-175b": _gpt3(0.6e-4, 3.2e6),
}


def recipe_for(name: str | None) -> Recipe:
    """The paper recipe of preset ``name``; a ValueError naming the presets that have one otherwise."""
    if name is None or name.lower() not in RECIPES:
        raise ValueError(f"--recipe paper: no published recipe for {name or 'a config file'}; presets with one: "
                         f"{', '.join(sorted(RECIPES))}")
    return RECIPES[name.lower()]
