"""Named configs. Each family module registers its published sizes (with the source of the numbers) and a tiny
size for tests and the demo (``<family>-tiny``)."""
from __future__ import annotations

from typing import Any, Callable

from llmarch.config import ModelConfig

_PRESETS: dict[str, Callable[[], ModelConfig]] = {}
PUBLISHED_PARAMS: dict[str, int] = {}  # exact parameter counts from model cards, where given


def register(name: str, fields: dict[str, Any], params: int | None = None, cls: type = ModelConfig) -> None:
    """Register preset ``name`` built from config ``fields``; ``params`` is the model card's exact count.
    ``cls`` is the config class (a vision tower alone is a VisionConfig)."""
    if name in _PRESETS:
        raise ValueError(f"preset {name!r} is registered twice")
    _PRESETS[name] = lambda: cls.from_dict(fields)
    if params is not None:
        PUBLISHED_PARAMS[name] = params


def names() -> list[str]:
    _load_all()
    return sorted(_PRESETS)


def get(name: str, **overrides: Any) -> ModelConfig:
    """The config of preset ``name``, optionally with fields replaced."""
    _load_all()
    key = name.lower()
    if key not in _PRESETS:
        import difflib

        close = difflib.get_close_matches(key, _PRESETS, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown preset {name!r}{hint} (`llmarch presets` lists all {len(_PRESETS)})")
    cfg = _PRESETS[key]()
    return cfg.replace(**overrides) if overrides else cfg


_loaded = False


def _load_all() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        from llmarch.presets import bloom, deepseek, gpt, llama, moe, sparse  # noqa: F401  (registration side effects)
        from llmarch.presets import bert, t5, transformer  # noqa: F401
        from llmarch.presets import retrieval  # noqa: F401
        from llmarch.presets import condition, vision  # noqa: F401
        from llmarch.presets import hybrid  # noqa: F401
        from llmarch.presets import mamba2  # noqa: F401
