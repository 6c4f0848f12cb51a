"""Field checks shared by every config dataclass: each raises ValueError naming the field and what is allowed."""
from __future__ import annotations

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


def check_known(what: str, cls, d: dict[str, Any]) -> None:
    """Refuse keys of ``d`` that are not fields of the dataclass ``cls``, listing the known ones."""
    import dataclasses

    known = {f.name for f in dataclasses.fields(cls)}
    bad = sorted(set(d) - known)
    if bad:
        raise ValueError(f"unknown {what} field(s) {bad}; known fields are {sorted(known)}")
