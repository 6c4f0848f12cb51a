"""Linear-time token mixers and their pieces: the gated delta rule (three forms), the short causal convolution,
the gated delta mixer; :mod:`llmarch.nn.linear.mixers` registers them (and gated attention) as ``mixer`` values."""
from llmarch.nn.linear import mixers  # noqa: F401  (registration)
from llmarch.nn.linear.delta_rule import FORMS
from llmarch.nn.linear.gated_delta import GatedDeltaNet, GatedRMSNorm

__all__ = ["FORMS", "GatedDeltaNet", "GatedRMSNorm"]
