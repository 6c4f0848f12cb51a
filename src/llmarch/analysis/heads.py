"""What each output head (the ``head`` config value, ``llmarch.nn.heads.HEADS``) costs: parameters by component
and matmul MACs per token and per sequence. A head added there without an entry in :data:`HEAD_COSTS` raises a
ValueError naming this file. A tied vocabulary projection (``tie_embeddings``) is the token embedding's tensor and
is counted there, once; its bias is the head's own."""
from __future__ import annotations

from llmarch.analysis.layers import norm_params


def _vocab_projection(cfg, bias: bool) -> int:
    return (0 if cfg.tie_embeddings else cfg.vocab_size * cfg.d_model) + (cfg.vocab_size if bias else 0)


class LMCost:
    """D -> V (+ bias)."""

    @staticmethod
    def params(cfg) -> dict[str, int]:
        return {"head": _vocab_projection(cfg, cfg.head_bias)}

    @staticmethod
    def macs(cfg) -> tuple[int, int]:
        """(per token, per sequence)."""
        return cfg.d_model * cfg.vocab_size, 0


class MLMCost:
    """BERT/RoBERTa masked-LM head: dense D -> D (+bias), activation, norm, then D -> V with its own bias."""

    @staticmethod
    def params(cfg) -> dict[str, int]:
        from llmarch.analysis.ffn import activation_params

        D = cfg.d_model
        return {"head_transform": D * D + D + norm_params(cfg) + activation_params(cfg.activation),
                "head": _vocab_projection(cfg, True)}

    @staticmethod
    def macs(cfg) -> tuple[int, int]:
        return cfg.d_model * cfg.d_model + cfg.d_model * cfg.vocab_size, 0


class PretrainingCost(MLMCost):
    """The MLM head plus the pooler (dense D -> D + tanh on the first position) and next-sentence D -> 2."""

    @staticmethod
    def params(cfg) -> dict[str, int]:
        D = cfg.d_model
        return {**MLMCost.params(cfg), "pooler": D * D + D, "nsp": 2 * D + 2}

    @staticmethod
    def macs(cfg) -> tuple[int, int]:
        D = cfg.d_model
        return MLMCost.macs(cfg)[0], D * D + 2 * D


class ClassificationCost:
    """The pooler (dense D -> D + tanh) and D -> n_labels, once per sequence; nothing tied."""

    @staticmethod
    def params(cfg) -> dict[str, int]:
        D = cfg.d_model
        return {"pooler": D * D + D, "head": D * cfg.n_labels + cfg.n_labels}

    @staticmethod
    def macs(cfg) -> tuple[int, int]:
        D = cfg.d_model
        return 0, D * D + D * cfg.n_labels


class FirstTokenCost:
    """The first position's hidden state as the sequence embedding (DPR): no parameters, no matmuls."""

    @staticmethod
    def params(cfg) -> dict[str, int]:
        return {}

    @staticmethod
    def macs(cfg) -> tuple[int, int]:
        return 0, 0


class LastTokenCost:
    """The reward / sequence-classification score of a decoder: bias-free D -> n_labels, applied at every position
    (as transformers does) and read at the last real token. Nothing tied: an untied LM head is not built."""

    @staticmethod
    def params(cfg) -> dict[str, int]:
        return {"head": cfg.d_model * cfg.n_labels}

    @staticmethod
    def macs(cfg) -> tuple[int, int]:
        return cfg.d_model * cfg.n_labels, 0


HEAD_COSTS = {"lm": LMCost, "mlm": MLMCost, "pretraining": PretrainingCost, "classification": ClassificationCost,
              "first_token": FirstTokenCost, "last_token": LastTokenCost}


def head_cost(cfg):
    if cfg.head not in HEAD_COSTS:
        raise ValueError(f"head: the analysis does not know the cost of {cfg.head!r}; add a class to "
                         "llmarch/analysis/heads.py HEAD_COSTS")
    return HEAD_COSTS[cfg.head]
