"""A tiny name -> object registry shared by methods, models and (later) data sets.

Registries give names to things, and the command line takes its choices from them, so an
unknown name is always an error that lists the valid ones.

Example:
    >>> reg = Registry("model")
    >>> @reg.register("tiny")
    ... def tiny(num_classes: int = 10): ...
    >>> reg.names()
    ['tiny']
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to objects; `get` of an unknown name raises a KeyError naming the choices."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            key = name.lower()
            if key in self._items:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._items[key] = obj
            return obj

        return deco

    def get(self, name: str) -> T:
        if not isinstance(name, str):
            raise TypeError(f"{self.kind} name must be a string, got {type(name).__name__}")
        try:
            return self._items[name.lower()]
        except KeyError:
            raise UnknownNameError(
                f"unknown {self.kind} {name!r}; valid choices: {', '.join(self.names())}"
            ) from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


class UnknownNameError(KeyError, ValueError):
    """An unknown registry name. Both a KeyError and a ValueError, so either catch works."""

    def __str__(self) -> str:  # KeyError would repr() the message and add quotes
        return str(self.args[0]) if self.args else ""
