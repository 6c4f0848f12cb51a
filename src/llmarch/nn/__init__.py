"""Components, each chosen from a registry keyed by a config value."""
from llmarch.nn.activation import ACTIVATIONS
from llmarch.nn.attention import Attention, AttnContext
from llmarch.nn.cache import KVCache
from llmarch.nn.ffn import FFNS, GLU, MLP
from llmarch.nn.kernels import KERNELS
from llmarch.nn.moe import MoE, router_stats
from llmarch.nn.norm import NORMS, LayerNorm, RMSNorm
from llmarch.nn.patterns import PATTERNS
from llmarch.nn.position import POSITIONS

__all__ = ["ACTIVATIONS", "Attention", "AttnContext", "FFNS", "GLU", "KERNELS", "KVCache", "LayerNorm", "MLP",
           "MoE", "NORMS", "PATTERNS", "POSITIONS", "RMSNorm", "router_stats"]
