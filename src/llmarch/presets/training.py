"""The sequence length each preset's paper pre-trained at, with its source: `llmarch plan` costs training at this
length (not at ``max_seq_len``, which for long-context models is reached only by a short extension phase).
Presets not listed (the tiny test sizes, and models whose paper gives no single length) fall back to their
``max_seq_len``, and the planner says so."""
from __future__ import annotations

from typing import NamedTuple


class TrainingContext(NamedTuple):
    tokens: int
    source: str


_LLAMA1 = TrainingContext(2048, "Touvron et al. 2023a (LLaMA), §2.2: context length 2048")
_LLAMA2 = TrainingContext(4096, "Touvron et al. 2023b (Llama 2), §2.2: context length 4096")
_LLAMA3 = TrainingContext(8192, "Meta 2024 (Llama 3): pre-trained on sequences of 8,192 tokens")
_QWEN2 = TrainingContext(4096, "Yang et al. 2024 (Qwen2), §3.2: pre-trained at 4,096 tokens, extended to 32,768 "
                               "in the last phase")
_GPT3 = TrainingContext(2048, "Brown et al. 2020 (GPT-3), §2.1: context window n_ctx = 2048")
_GPT2 = TrainingContext(1024, "Radford et al. 2019 (GPT-2), §2.3: context size 1024")
_T5 = TrainingContext(512, "Raffel et al. 2020 (T5), §3.1.2: input sequence length 512")

TRAINING_CONTEXT: dict[str, TrainingContext] = {
    **{n: _LLAMA1 for n in ("llama-7b", "llama-13b", "llama-33b", "llama-65b")},
    **{n: _LLAMA2 for n in ("llama-2-7b", "llama-2-13b", "llama-2-70b")},
    **{n: _LLAMA3 for n in ("llama-3-8b", "llama-3-70b")},
    "llama-3.1-8b": TrainingContext(8192, "Dubey et al. 2024 (The Llama 3 Herd of Models), §3.4: pre-trained at "
                                          "8K tokens before the long-context extension to 128K"),
    "mistral-7b": TrainingContext(8192, "Jiang et al. 2023 (Mistral 7B), Table 1: context_len 8192, window 4096"),
    "mixtral-8x7b": TrainingContext(32768, "Jiang et al. 2024 (Mixtral of Experts), §2: trained with a context "
                                           "size of 32k tokens"),
    **{n: _QWEN2 for n in ("qwen2-0.5b", "qwen2-1.5b", "qwen2-7b", "qwen2-72b", "qwen2-57b-a14b")},
    **{n: _GPT2 for n in ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")},
    **{n: _GPT3 for n in ("gpt3-125m", "gpt3-350m", "gpt3-760m", "gpt3-1.3b", "gpt3-2.7b", "gpt3-6.7b",
                          "gpt3-13b", "gpt3-175b")},
    **{n: TrainingContext(2048, "BigScience 2022 (BLOOM), §3.5: sequence length 2048")
       for n in ("bloom-560m", "bloom-176b")},
    **{n: TrainingContext(128, "Devlin et al. 2019 (BERT), App. A.2: 90% of steps at 128 tokens, the rest at 512")
       for n in ("bert-base", "bert-large")},
    **{n: TrainingContext(512, "Liu et al. 2019 (RoBERTa), §4.1: full sequences of at most 512 tokens")
       for n in ("roberta-base", "roberta-large")},
    **{n: _T5 for n in ("t5-small", "t5-base", "t5-large", "t5-3b", "t5-11b", "t5-v1.1-base", "switch-base-8")},
    "deepseek-v2-lite": TrainingContext(4096, "DeepSeek-AI 2024 (DeepSeek-V2), §3.1: pre-trained at 4K, extended "
                                              "to 128K with YaRN"),
    "longformer-base": TrainingContext(4096, "Beltagy et al. 2020 (Longformer), §5: pre-trained on sequences of "
                                             "4,096 tokens"),
    "bigbird-roberta-base": TrainingContext(4096, "Zaheer et al. 2020 (BigBird), App. E.1: sequence length 4096"),
    "sparse-transformer-enwik8": TrainingContext(12288, "Child et al. 2019 (Sparse Transformers), §7.2: enwik8 "
                                                        "sequences of 12,288 bytes"),
    "retro-7.5b": TrainingContext(2048, "Borgeaud et al. 2022 (RETRO), §2: sequence length 2048"),
}


def training_context(name: str | None) -> TrainingContext | None:
    """The paper's pre-training sequence length of preset ``name`` (None when not recorded)."""
    return TRAINING_CONTEXT.get(name.lower()) if name else None
