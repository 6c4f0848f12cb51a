"""Evaluating a model: perplexity and bits per byte on text (``llmarch eval --data``), and an
lm-evaluation-harness model (``llmarch.eval.harness``, optional extra ``eval``) for its benchmark tasks."""
from llmarch.eval.perplexity import TextScore, rolling_windows, score_texts, score_windows

__all__ = ["TextScore", "rolling_windows", "score_texts", "score_windows"]
