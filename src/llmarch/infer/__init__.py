"""Inference: sampling and generation."""
from llmarch.infer.generate import generate
from llmarch.infer.sampling import filter_logits, sample_next

__all__ = ["generate", "filter_logits", "sample_next"]
