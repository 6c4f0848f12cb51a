"""Training: corpus -> tokenizer -> packed batches -> objective -> AdamW loop -> checkpoints (torchrun for many
processes). ``llmarch.train.train(model_config, TrainConfig(out=...))`` runs one process (or one rank)."""
from llmarch.train.loop import TrainResult, Trainer, train
from llmarch.train.objectives import OBJECTIVES, objective_for
from llmarch.train import retrieval_objective  # noqa: F401,E402  (registers the "ict" objective)
from llmarch.train.settings import TrainConfig

__all__ = ["train", "Trainer", "TrainResult", "TrainConfig", "OBJECTIVES", "objective_for"]
