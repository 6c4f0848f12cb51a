"""Sub-configs of the attention variants: sparse patterns (:class:`SparseConfig`) and multi-head latent attention
(:class:`MLAConfig`). Fields of :class:`llmarch.ModelConfig` (``sparse``, ``mla``), each with its own validate()."""
from __future__ import annotations

from dataclasses import dataclass

from llmarch.validation import check_field_types


def _checks():
    from llmarch import validation

    return validation.fail, validation.check_positive, validation.check_choice


SPARSE_EXECUTIONS = ("mask", "blocks")
MLA_ABSORB = ("never", "decode", "always")


@dataclass(frozen=True)
class SparseConfig:
    """Parameters of the sparse attention patterns and how they run.

    ``block``: block size of BigBird and of blockwise (chunked) attention, and the tile of the block-sparse
    execution. ``stride``: l of the Sparse Transformer patterns (Child et al. 2019); ``summary``: c, the summary
    columns per stride of the fixed pattern. ``global_tokens``: positions that attend and are attended everywhere
    (Longformer; more come per batch from ``global_attention_mask``). ``random_blocks``: r random key blocks per
    query block (BigBird), drawn from ``seed``; ``global_blocks``: BigBird's global block indices (negative
    counts from the end); ``dense_up_to_blocks``: a sequence of at most this many blocks attends densely under
    the BigBird pattern (transformers switches to full attention at <= 5 + 2r blocks; 0 = never). ``execution``: mask (a dense [T, S] mask, the reference) | blocks (block-sparse, time
    and memory ~linear in T for banded patterns).
    """

    block: int = 64
    stride: int = 128
    summary: int = 8
    global_tokens: tuple[int, ...] = ()
    random_blocks: int = 3
    random_keys: int = 3  # r random keys per query of the "random" pattern, drawn from ``seed``
    global_blocks: tuple[int, ...] = (0, -1)
    seed: int = 0
    execution: str = "mask"
    dense_up_to_blocks: int = 0

    def __post_init__(self) -> None:
        check_field_types(self, "sparse.")  # JSON lists become tuples; "0,5" from a command line too

    def validate(self) -> None:
        _fail, _check_positive, _check_choice = _checks()
        for name in ("block", "stride", "summary"):
            _check_positive(f"sparse.{name}", getattr(self, name))
        if self.summary > self.stride:
            _fail("sparse.summary", f"c={self.summary} must be <= sparse.stride={self.stride}")
        for name in ("random_blocks", "dense_up_to_blocks", "random_keys"):
            if getattr(self, name) < 0:
                _fail(f"sparse.{name}", f"must be >= 0, got {getattr(self, name)}")
        if any(not isinstance(t, int) or t < 0 for t in self.global_tokens):
            _fail("sparse.global_tokens", f"must be non-negative positions, got {self.global_tokens}")
        if any(not isinstance(b, int) for b in self.global_blocks):
            _fail("sparse.global_blocks", f"must be block indices, got {self.global_blocks}")
        _check_choice("sparse.execution", self.execution, SPARSE_EXECUTIONS)


@dataclass(frozen=True)
class MLAConfig:
    """Multi-head latent attention (DeepSeek-AI 2024, DeepSeek-V2): keys and values come from one compressed
    latent of ``kv_lora_rank`` (R) numbers per token; queries optionally from a ``q_lora_rank`` latent. Each head's
    query/key is a no-position part (``qk_nope_head_dim``) beside a RoPE part (``qk_rope_head_dim``, one key
    shared by all heads); values have ``v_head_dim``. The cache keeps R + qk_rope_head_dim numbers per token.
    ``mscale_all_dim``: with yarn rope, scores are scaled by (0.1 mscale_all_dim ln(rope.factor) + 1)^2 more.
    ``absorb``: fold the key/value up-projections into the query and output (never | decode | always).
    """

    kv_lora_rank: int = 512
    q_lora_rank: int | None = None
    qk_rope_head_dim: int = 64
    qk_nope_head_dim: int = 128
    v_head_dim: int = 128
    mscale_all_dim: float = 0.0
    absorb: str = "decode"
    latent_norm_eps: float = 1e-6  # the RMSNorms on the kv (and q) latents

    def __post_init__(self) -> None:
        check_field_types(self, "mla.")

    def validate(self) -> None:
        _fail, _check_positive, _check_choice = _checks()
        for name in ("kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim"):
            _check_positive(f"mla.{name}", getattr(self, name))
        _check_positive("mla.q_lora_rank", self.q_lora_rank, allow_none=True)
        if self.qk_rope_head_dim % 2:
            _fail("mla.qk_rope_head_dim", f"must be even (rotary pairs), got {self.qk_rope_head_dim}")
        if self.mscale_all_dim < 0:
            _fail("mla.mscale_all_dim", f"must be >= 0, got {self.mscale_all_dim}")
        _check_choice("mla.absorb", self.absorb, MLA_ABSORB)
        if self.latent_norm_eps <= 0:
            _fail("mla.latent_norm_eps", f"must be > 0, got {self.latent_norm_eps}")

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim
