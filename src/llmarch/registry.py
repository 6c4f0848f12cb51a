"""Tiny named registries: config string -> component class or function.

Every architectural axis of :class:`llmarch.ModelConfig` that has a closed set of values is backed by one
registry, so the allowed values in validation errors are always the registry's keys.
"""
from __future__ import annotations

from typing import Callable, Generic, Iterator, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """A name -> item mapping with a decorator for registration and errors that list the choices."""

    def __init__(self, axis: str):
        self.axis = axis
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def deco(item: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.axis}: {name!r} is registered twice")
            self._items[name] = item
            return item

        return deco

    def add(self, name: str, item: T) -> T:
        return self.register(name)(item)

    def __getitem__(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise ValueError(f"unknown {self.axis} {name!r}; choose one of {sorted(self._items)}") from None

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def names(self) -> list[str]:
        return sorted(self._items)

    def __repr__(self) -> str:
        return f"Registry({self.axis!r}, {self.names()})"
