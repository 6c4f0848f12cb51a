"""llmarch: every classic and modern LLM architecture from one validated config."""
from llmarch.attention_config import MLAConfig, SparseConfig
from llmarch.config import ModelConfig, MoEConfig, RopeConfig
from llmarch.infer.generate import generate
from llmarch.model import Model, ModelOutput, build
from llmarch import presets
from llmarch.upcycle import upcycle

__version__ = "0.1.0"


def preset(name: str, **overrides) -> ModelConfig:
    """The named config (``llmarch.presets.names()`` lists them), with optional field overrides."""
    return presets.get(name, **overrides)


def __getattr__(name: str):
    # heavier subpackages load on first use
    if name in ("hf", "analysis", "train", "retrieval", "lora"):
        import importlib

        return importlib.import_module(f"llmarch.{name}")
    if name == "analyze":
        from llmarch.analysis import analyze

        return analyze
    raise AttributeError(f"module 'llmarch' has no attribute {name!r}")


__all__ = ["ModelConfig", "MoEConfig", "RopeConfig", "SparseConfig", "MLAConfig", "Model", "ModelOutput", "build",
           "generate", "preset", "presets", "upcycle"]
