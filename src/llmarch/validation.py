"""Field checks shared by every config dataclass: each raises ValueError naming the field and what is allowed.

:func:`check_field_types` is the one place field *types* are checked: every config dataclass calls it from
``__post_init__`` with its annotations, so a YAML string, a list, NaN or ``"false"`` where a number or a boolean
belongs is refused (or, for numeric text such as ``"1e-5"``, read as the number) the same way for every field.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from typing import Any


def fail(field_name: str, message: str) -> None:
    raise ValueError(f"{field_name}: {message}")


def check_choice(field_name: str, value: Any, choices) -> None:
    if value not in choices:
        fail(field_name, f"{value!r} is not allowed; choose one of {sorted(choices)}")


def check_positive(field_name: str, value: Any, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        fail(field_name, f"must be a positive integer, got {value!r}")


def check_probability(field_name: str, value: float) -> None:
    if not 0.0 <= value < 1.0:
        fail(field_name, f"must be in [0, 1), got {value!r}")


# --- types --------------------------------------------------------------------------------------------------
def _optional(hint: Any) -> tuple[Any, bool]:
    """(the non-None type, whether None is allowed) of ``X | None``; other hints unchanged."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return (args[0] if len(args) == 1 else typing.Any), type(None) in typing.get_args(hint)
    return hint, False


def _number(value: Any, name: str, kind: type) -> Any:
    """An int or a finite float from a number or numeric text ("1e-5" from YAML, "128" from a command line)."""
    what = "an integer" if kind is int else "a finite number"
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        fail(name, f"must be {what}, got {value!r} ({type(value).__name__})")
    if isinstance(value, str):
        try:
            value = int(value.strip()) if kind is int else float(value.strip())
        except ValueError:
            fail(name, f"cannot read {value!r} as {kind.__name__}; give {what}")
    if kind is int:
        if not isinstance(value, int):
            fail(name, f"must be {what}, got {value!r}")
        return value
    try:
        value = float(value)
    except OverflowError:
        fail(name, f"must be {what}, got {value!r} (too large)")
    if not math.isfinite(value):
        fail(name, f"must be {what}, got {value!r}")
    return value


def coerce_value(hint: Any, value: Any, name: str) -> Any:
    """``value`` checked against the annotation ``hint`` (bool, int, float, str, tuple[X, ...], X | None);
    numbers may come as numeric text. Anything else raises ValueError naming ``name``."""
    hint, nullable = _optional(hint)
    if value is None:
        if not nullable:
            fail(name, f"must not be None (null); give a {getattr(hint, '__name__', hint)}")
        return None
    if hint is bool:
        if not isinstance(value, bool):
            fail(name, f"must be true or false, got {value!r} ({type(value).__name__})")
        return value
    if hint in (int, float):
        return _number(value, name, hint)
    if hint is str:
        if not isinstance(value, str):
            fail(name, f"must be text, got {value!r} ({type(value).__name__})")
        return value
    if typing.get_origin(hint) is tuple:
        item = typing.get_args(hint)[0]
        if isinstance(value, str):
            value = [v.strip() for v in value.replace("+", ",").split(",") if v.strip()] if item is not str \
                else (value,)
        elif not isinstance(value, (list, tuple)):
            value = (value,)
        return tuple(coerce_value(item, v, f"{name}[{i}]") for i, v in enumerate(value))
    return value


@functools.lru_cache(maxsize=None)
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)  # evaluating string annotations is slow: once per class


def check_field_types(obj: Any, prefix: str = "") -> None:
    """Check every field of the frozen dataclass ``obj`` against its annotation, storing converted values.
    Fields whose annotation is itself a dataclass (sub-configs) are left to their owner."""
    hints = _hints(type(obj))
    for f in dataclasses.fields(obj):
        base, _ = _optional(hints[f.name])
        if dataclasses.is_dataclass(base):
            continue
        old = getattr(obj, f.name)
        new = coerce_value(hints[f.name], old, prefix + f.name)
        if new is not old:
            object.__setattr__(obj, f.name, new)


def sub_config(cls: type, value: Any, name: str, nullable: bool, hint: str = "") -> Any:
    """A sub-config field's value: an instance of ``cls``, a mapping of its fields, or None where allowed."""
    if value is None:
        if nullable:
            return None
        fail(name, f"must be a mapping of {name} settings, got None{hint}")
    if isinstance(value, cls):
        return value
    if not isinstance(value, dict):
        fail(name, f"must be a mapping of {name} settings (e.g. {{{dataclasses.fields(cls)[0].name}: ...}}), "
                   f"got {value!r}{hint}")
    known = {f.name for f in dataclasses.fields(cls)}
    bad = sorted(str(k) for k in set(value) - known)
    if bad:
        raise ValueError(f"unknown {name} field(s) {bad}; known fields are {sorted(known)}")
    return cls(**value)


def read_cli_value(hint: Any, value: Any, name: str) -> Any:
    """Read a command-line string for a config field: none/null, true/false and comma-separated tuples here;
    numbers are read by the field type check (:func:`llmarch.validation.coerce_value`), like numeric YAML text."""
    if not isinstance(value, str):
        return value
    base, nullable = _optional(hint)
    if value.strip().lower() in ("none", "null") and (nullable or dataclasses.is_dataclass(base)):
        return None
    if base is bool:
        word = value.strip().lower()
        if word not in ("true", "false", "1", "0", "yes", "no"):
            raise ValueError(f"{name}: expected true or false, got {value!r}")
        return word in ("true", "1", "yes")
    if typing.get_origin(base) is tuple:  # "dense,sliding" or "dense+sliding"
        return tuple(v.strip() for v in value.replace("+", ",").split(",") if v.strip())
    return value
