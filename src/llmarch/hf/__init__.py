"""Hugging Face interop: per-family config translation and weight maps; ``load`` and ``save``."""
from llmarch.hf import bloom, deepseek, gpt2, llama  # noqa: F401  (registration)
from llmarch.hf import bert, marian, roberta, t5  # noqa: F401  (registration)
from llmarch.hf import big_bird, longformer  # noqa: F401  (registration)
from llmarch.hf import mixtral, qwen2_moe, switch_transformers  # noqa: F401  (registration)
from llmarch.hf import qwen3_next  # noqa: F401  (registration; after qwen2_moe, which it extends)
from llmarch.hf import dpr  # noqa: F401  (registration; after bert, which it extends)
from llmarch.hf import clip, llava, mllama, siglip  # noqa: F401  (registration: vision towers, LLaVA, mllama)
from llmarch.hf import mamba2  # noqa: F401  (registration)
from llmarch.hf.base import FAMILIES
from llmarch.hf.convert import ConversionError
from llmarch.hf.io import config_from_hf, load, read_safetensors, save
from llmarch.hf.adapters import load_adapter, save_adapter

__all__ = ["FAMILIES", "ConversionError", "config_from_hf", "load", "load_adapter", "read_safetensors", "save",
           "save_adapter"]
