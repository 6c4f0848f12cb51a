"""Where LoRA can attach: a registry from component class to the projections it owns and the target names of
their output slices. Fused projections list one slice per projection, in their row order, so an adapter is per
projection whatever the layout (our ``qkv`` is [q | k | v], ``gate_up`` is [gate | up]).

Target names: ``q k v o`` (self- and cross-attention), ``gate up down`` (dense FFNs, shared experts), ``head``
(the output projection: LM head, reward ``score``, classifier), ``experts.gate experts.up experts.down`` (every
routed expert of an MoE bank), and for latent attention ``q`` (a full-rank query), ``q_a q_b`` (the low-rank
query's down and up projections), ``kv_a`` (the joint kv down projection) and ``kv_b`` (its up projection).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn

from llmarch.nn.attention import Attention
from llmarch.nn.cross_attention import CrossAttention
from llmarch.nn.experts import GLUExperts, MLPExperts
from llmarch.nn.ffn import GLU, MLP
from llmarch.nn.global_attention import GlobalProjectionAttention
from llmarch.nn.heads import ClassificationHead, LastTokenHead, LMHead, SwappedLMHead
from llmarch.nn.latent_attention import LatentAttention, LowRankQuery

TARGETS = ("q", "k", "v", "o", "gate", "up", "down", "head", "experts.gate", "experts.up", "experts.down",
           "q_a", "q_b", "kv_a", "kv_b")
EXPERT_PREFIX = "experts."


@dataclass(frozen=True)
class Site:
    """One adaptable projection of a component: ``attr`` names it on the owner ("" = the owner itself);
    ``slots`` are (target, width) of its output in order; ``bank``: an expert weight [E, in, out] (output on the
    last dim) rather than a Linear-like module [*, in] -> [*, out]."""

    attr: str
    slots: tuple[tuple[str, int], ...]
    bank: bool = False


SITES: dict[type, Callable[[nn.Module], list[Site]]] = {}


def sites_for(*classes: type):
    def deco(fn):
        for cls in classes:
            SITES[cls] = fn
        return fn

    return deco


def _whole(attr: str, target: str, module: nn.Module) -> Site:
    return Site(attr, ((target, _out_features(getattr(module, attr) if attr else module)),))


def _out_features(proj: nn.Module) -> int:
    return proj.out_features


@sites_for(Attention)
def _attention(m: Attention) -> list[Site]:
    H, G, Dh = m.n_heads, m.n_kv_heads, m.head_dim
    return [Site("qkv", (("q", H * Dh), ("k", G * Dh), ("v", G * Dh))), _whole("out", "o", m)]


@sites_for(GlobalProjectionAttention)
def _global_attention(m: GlobalProjectionAttention) -> list[Site]:
    H, G, Dh = m.n_heads, m.n_kv_heads, m.head_dim
    return _attention(m) + [Site("qkv_global", (("q", H * Dh), ("k", G * Dh), ("v", G * Dh)))]


@sites_for(CrossAttention)
def _cross_attention(m: CrossAttention) -> list[Site]:
    GDh = m.n_kv_heads * m.head_dim
    return [_whole("q", "q", m), Site("kv", (("k", GDh), ("v", GDh))), _whole("out", "o", m)]


@sites_for(LatentAttention)
def _latent_attention(m: LatentAttention) -> list[Site]:
    sites = [_whole("kv_down", "kv_a", m), _whole("kv_up", "kv_b", m), _whole("out", "o", m)]
    return sites if isinstance(m.q, LowRankQuery) else [_whole("q", "q", m)] + sites


@sites_for(LowRankQuery)
def _low_rank_query(m: LowRankQuery) -> list[Site]:
    return [_whole("down", "q_a", m), _whole("up", "q_b", m)]


@sites_for(GLU)
def _glu(m: GLU) -> list[Site]:
    return [Site("gate_up", (("gate", m.d_ff), ("up", m.d_ff))), _whole("down", "down", m)]


@sites_for(MLP)
def _mlp(m: MLP) -> list[Site]:
    return [_whole("up", "up", m), _whole("down", "down", m)]


@sites_for(GLUExperts)
def _glu_experts(m: GLUExperts) -> list[Site]:
    F = m.d_ff
    return [Site("gate_up", (("experts.gate", F), ("experts.up", F)), bank=True),
            Site("down", (("experts.down", m.d_model),), bank=True)]


@sites_for(MLPExperts)
def _mlp_experts(m: MLPExperts) -> list[Site]:
    return [Site("up", (("experts.up", m.d_ff),), bank=True), Site("down", (("experts.down", m.d_model),), bank=True)]


@sites_for(LMHead)
def _lm_head(m: LMHead) -> list[Site]:
    return [_whole("", "head", m)]


@sites_for(SwappedLMHead)
def _swapped_head(m: SwappedLMHead) -> list[Site]:
    return [_whole("proj", "head", m)]


@sites_for(LastTokenHead)
def _last_token_head(m: LastTokenHead) -> list[Site]:
    return [_whole("score", "head", m)]


@sites_for(ClassificationHead)
def _classification_head(m: ClassificationHead) -> list[Site]:
    return [_whole("out", "head", m)]


def sites(module: nn.Module) -> list[Site]:
    """The adaptable projections of ``module`` itself (not of its children); [] for other components."""
    for cls in type(module).__mro__:
        if cls in SITES:
            return SITES[cls](module)
    return []
