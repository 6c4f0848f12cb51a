"""llmarch: every classic and modern LLM architecture from one validated config.

The configs and presets import without torch; everything that needs torch (``build``, ``generate``, the
subpackages) loads on first use, so ``import llmarch`` and ``llmarch --help`` stay fast."""
from llmarch.attention_config import MLAConfig, SparseConfig
from llmarch.config import ModelConfig, MoEConfig, RopeConfig
from llmarch.linear_config import LinearMixerConfig
from llmarch import presets

__version__ = "0.1.0"

# public name -> the module that defines it (imported on first access; no module shares a name with its
# function, or importing that module would replace the function on this package)
_LAZY = {"build": "llmarch.model", "Model": "llmarch.model", "ModelOutput": "llmarch.model",
         "generate": "llmarch.infer.generate", "upcycle": "llmarch.upcycling", "analyze": "llmarch.analysis"}
_SUBPACKAGES = ("hf", "analysis", "train", "retrieval", "lora", "infer", "nn")


def preset(name: str, **overrides) -> ModelConfig:
    """The named config (``llmarch.presets.names()`` lists them), with optional field overrides."""
    return presets.get(name, **overrides)


def __getattr__(name: str):
    import importlib

    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later lookups skip this hook
        return value
    if name in _SUBPACKAGES:
        return importlib.import_module(f"llmarch.{name}")
    raise AttributeError(f"module 'llmarch' has no attribute {name!r}")


__all__ = ["ModelConfig", "MoEConfig", "RopeConfig", "SparseConfig", "MLAConfig", "LinearMixerConfig", "Model",
           "ModelOutput", "build", "generate", "preset", "presets", "upcycle"]
