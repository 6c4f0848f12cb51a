"""Components, each chosen from a registry keyed by a config value."""
from llmarch.nn.activation import ACTIVATIONS
from llmarch.nn.attention import Attention, AttnContext
from llmarch.nn.cache import CrossMemory, EncoderDecoderCache, KVCache, LatentCache
from llmarch.nn.cross_attention import CrossAttention
from llmarch.nn.execution import EXECUTIONS
from llmarch.nn.ffn import FFNS, GLU, MLP
from llmarch.nn.heads import HEADS
from llmarch.nn.kernels import KERNELS
from llmarch.nn.latent_attention import LatentAttention
from llmarch.nn.mixers import MIXERS
from llmarch.nn import linear  # noqa: F401  (gated_delta / gated_attention mixer registration)
from llmarch.nn.moe import MoE, router_stats
from llmarch.nn.norm import NORMS, LayerNorm, RMSNorm
from llmarch.nn import patterns_factorized, patterns_global, patterns_random  # noqa: F401  (pattern registration)
from llmarch.nn.patterns import PATTERNS
from llmarch.nn.position import POSITIONS

__all__ = ["ACTIVATIONS", "Attention", "AttnContext", "CrossAttention", "CrossMemory", "EXECUTIONS",
           "EncoderDecoderCache", "FFNS", "GLU", "HEADS", "KERNELS", "KVCache", "LatentAttention", "LatentCache",
           "LayerNorm", "MIXERS", "MLP", "MoE", "NORMS", "PATTERNS", "POSITIONS", "RMSNorm", "router_stats"]
