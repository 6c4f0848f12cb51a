"""Inference: sampling, generation on dynamic or static (compilable) caches, speculative decoding, weight-only
quantization, early exit, pruning, distillation and chat."""
from llmarch.infer.chat import Chat
from llmarch.infer.distill import distillation_loss
from llmarch.infer.early_exit import early_exit_generate, early_exit_nll
from llmarch.infer.generate import generate
from llmarch.infer.prune import prune
from llmarch.infer.quantize import load_quantized, quantize, save_quantized
from llmarch.infer.sampling import Sampling, filter_logits, sample_next
from llmarch.infer.speculative import speculative_generate
from llmarch.infer.static_cache import StaticKVCache

__all__ = ["Chat", "Sampling", "StaticKVCache", "distillation_loss", "early_exit_generate", "early_exit_nll",
           "filter_logits", "generate", "load_quantized", "prune", "quantize", "sample_next", "save_quantized",
           "speculative_generate"]
