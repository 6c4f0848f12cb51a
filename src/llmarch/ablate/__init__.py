"""Ablations: swap architectural choices, retrain each variant on the same data with the same settings, and
compare loss, perplexity (also at longer lengths), speed and cost. ``llmarch ablate`` is the command."""
from llmarch.ablate.report import table, write_report
from llmarch.ablate.runner import run_study, run_variant
from llmarch.ablate.spec import Study, Variant, apply_fields, axes_variants, load_study, parse_variant, parse_vary

__all__ = ["Study", "Variant", "run_study", "run_variant", "write_report", "table", "load_study", "apply_fields",
           "axes_variants", "parse_vary", "parse_variant"]
