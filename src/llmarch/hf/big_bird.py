"""model_type "big_bird": BERT's encoder and heads (the rules of :mod:`llmarch.hf.bert`, same ``bert.`` prefix)
with optional q/k/v biases (``use_bias``), optional sqrt(D) embedding scale (``rescale_embeddings``) and either
full attention (``attention_type="original_full"`` -> pattern dense) or block-sparse ITC attention
(``"block_sparse"`` -> pattern bigbird: ``block_size``, ``num_random_blocks`` r, first and last block global).
Heads: BigBirdForPreTraining (its pooler is a bare Linear), BigBirdForMaskedLM.

transformers attends densely whenever a sequence has at most 5 + 2r blocks; ``sparse.dense_up_to_blocks`` holds
that. Its random blocks differ per layer and head and, in eval mode, are all block 0 (so eval-mode block-sparse
transformers is not a mask pattern); ours come from ``sparse.seed``. See docs/sparse_attention.md.
"""
from __future__ import annotations

import dataclasses

from llmarch.attention_config import SparseConfig
from llmarch.hf.base import FAMILIES
from llmarch.hf.bert import Bert

GLOBAL_BLOCKS = (0, -1)  # ITC: the first and the last block


def dense_up_to(r: int) -> int:
    """transformers switches block_sparse to original_full when T <= (5 + 2r) * block, i.e. <= 5 + 2r blocks."""
    return 5 + 2 * r


@FAMILIES.register("big_bird")
class BigBird(Bert):
    model_type, architecture = "big_bird", "BigBirdForPreTraining"
    heads = {"pretraining": "BigBirdForPreTraining", "mlm": "BigBirdForMaskedLM"}

    def to_config(self, hf):
        hf = {"hidden_act": "gelu_new", **hf}  # BigBirdConfig's default
        kind = hf.get("attention_type", "block_sparse")
        fields = dict(qkv_bias=bool(hf.get("use_bias", True)), scale_embeddings=bool(hf.get("rescale_embeddings")))
        if kind == "block_sparse":
            r = int(hf.get("num_random_blocks", 3))
            fields.update(pattern=("bigbird",), sparse=dict(block=int(hf.get("block_size", 64)), random_blocks=r,
                                                            global_blocks=GLOBAL_BLOCKS,
                                                            dense_up_to_blocks=dense_up_to(r)))
        elif kind != "original_full":
            raise ValueError(f"config.json attention_type={kind!r}: expected 'block_sparse' or 'original_full'")
        return super().to_config(hf).replace(**fields)

    def from_config(self, cfg):
        s = cfg.sparse
        sparse = cfg.pattern == ("bigbird",)
        return dict(super().from_config(cfg), use_bias=cfg.qkv_bias, rescale_embeddings=cfg.scale_embeddings,
                    attention_type="block_sparse" if sparse else "original_full",
                    block_size=s.block if sparse else 64, num_random_blocks=s.random_blocks if sparse else 3)

    def accepts(self, cfg):
        s = cfg.sparse
        if cfg.pattern not in (("dense",), ("bigbird",)):
            return f"big_bird needs pattern=('bigbird',) or ('dense',), config has {cfg.pattern}"
        if cfg.pattern == ("bigbird",):
            if tuple(s.global_blocks) != GLOBAL_BLOCKS:
                return f"big_bird's global blocks are the first and last: sparse.global_blocks={GLOBAL_BLOCKS}"
            if s.dense_up_to_blocks != dense_up_to(s.random_blocks):
                return (f"big_bird attends densely up to 5 + 2r blocks: set sparse.dense_up_to_blocks="
                        f"{dense_up_to(s.random_blocks)}")
        return super().accepts(cfg.replace(pattern=("dense",), qkv_bias=True, scale_embeddings=False,
                                           sparse=SparseConfig()))

    def head_rules(self, cfg):
        """BERT's head rules; BigBird's pooler is ``pooler`` itself, not ``pooler.dense``."""
        return [dataclasses.replace(r, theirs=tuple(t.replace("pooler.dense.", "pooler.") for t in r.theirs))
                for r in super().head_rules(cfg)]
