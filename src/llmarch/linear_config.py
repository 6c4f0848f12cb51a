"""LinearMixerConfig: the sizes of the gated delta rule mixer (the ``linear`` field of :class:`llmarch.ModelConfig`),
used by the layers that ``layer_mixers`` (or ``mixer``) sets to ``gated_delta``."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LinearMixerConfig:
    """Gated delta networks (Yang et al. 2024), as in Qwen3-Next's GatedDeltaNet.

    q and k have ``n_k_heads`` heads of ``k_head_dim`` (Dk); v, the output gate z and the recurrent state have
    ``n_v_heads`` heads of ``v_head_dim`` (Dv); each q/k head serves n_v_heads / n_k_heads consecutive v heads
    (like GQA). q, k and v pass a short causal depthwise convolution of ``conv_kernel`` taps (K) before the rule.
    ``chunk_size``: the chunk length of the chunked (training / prefill) form. The recurrent state of a layer is
    n_v_heads x Dk x Dv numbers, whatever the context length."""

    n_k_heads: int = 16
    n_v_heads: int = 32
    k_head_dim: int = 128
    v_head_dim: int = 128
    conv_kernel: int = 4
    chunk_size: int = 64

    def validate(self) -> None:
        from llmarch.validation import check_positive, fail

        for name in ("n_k_heads", "n_v_heads", "k_head_dim", "v_head_dim", "conv_kernel", "chunk_size"):
            check_positive(f"linear.{name}", getattr(self, name))
        if self.n_v_heads % self.n_k_heads:
            fail("linear.n_v_heads", f"must be a multiple of linear.n_k_heads ({self.n_v_heads} % {self.n_k_heads} "
                 "!= 0): each q/k head serves a whole group of v heads")

    @property
    def conv_channels(self) -> int:
        """C: the channels of the short convolution, q | k | v."""
        return 2 * self.n_k_heads * self.k_head_dim + self.n_v_heads * self.v_head_dim

    def state_numbers(self) -> int:
        """Numbers one layer keeps for decoding: the matrix state Hv·Dk·Dv plus the conv window C·(K-1)."""
        return self.n_v_heads * self.k_head_dim * self.v_head_dim + self.conv_channels * (self.conv_kernel - 1)
