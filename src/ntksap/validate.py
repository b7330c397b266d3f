"""The one set of argument validators: every check raises a ValueError naming the argument,
what is valid, and what it got, before any work is done.

Each returns the (normalised) value, so a check and an assignment are one line.

Example:
    >>> positive_int("epochs", 3)
    3
    >>> finite_float("lr", float("nan"))
    Traceback (most recent call last):
    ...
    ValueError: lr must be a finite number, got nan
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

#: Seeds are accepted in [0, 2**32 - 1] (numpy's range; torch's is wider).
SEED_MAX = 2**32 - 1


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def positive_int(name: str, value: Any, *, allow_none: bool = False) -> Any:
    """An int >= 1 (or None when `allow_none`)."""
    if allow_none and value is None:
        return None
    if not _is_int(value) or value < 1:
        extra = " or None" if allow_none else ""
        raise ValueError(f"{name} must be an integer >= 1{extra}, got {value!r}")
    return value


def int_in_range(name: str, value: Any, low: int, high: int) -> int:
    """An int in [low, high]."""
    if not _is_int(value) or not low <= value <= high:
        raise ValueError(f"{name} must be an integer in [{low}, {high}], got {value!r}")
    return value


def seed(value: Any, name: str = "seed") -> int:
    """A random seed: an int in [0, 2**32 - 1]."""
    return int_in_range(name, value, 0, SEED_MAX)


def finite_float(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    allow_none: bool = False,
) -> Any:
    """A finite number, optionally within [low, high] (an end is excluded when `*_open`).

    NaN and +-inf are always refused: they make results meaningless and JSON invalid.
    """
    if allow_none and value is None:
        return None
    if not _is_number(value) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    lo_ok = low is None or (value > low if low_open else value >= low)
    hi_ok = high is None or (value < high if high_open else value <= high)
    if not (lo_ok and hi_ok):
        left = "-inf" if low is None else f"{low:g}"
        right = "inf" if high is None else f"{high:g}"
        interval = f"{'(' if low_open or low is None else '['}{left}, {right}"
        interval += ")" if high_open or high is None else "]"
        raise ValueError(f"{name} must be in {interval}, got {value!r}")
    return float(value) if isinstance(value, float) else value


def positive_float(name: str, value: Any, *, allow_none: bool = False) -> Any:
    """A finite number > 0."""
    if allow_none and value is None:
        return None
    if not _is_number(value) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return value


def choice(name: str, value: Any, choices: Iterable[Any]) -> Any:
    """One of `choices`."""
    choices = tuple(choices)
    if value not in choices:
        shown = ", ".join(str(c) for c in choices)
        raise ValueError(f"unknown {name} {value!r}; valid choices: {shown}")
    return value


def boolean(name: str, value: Any) -> bool:
    """A real bool (not 0/1, not a string)."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value


def all_finite(name: str, obj: Any) -> Any:
    """Raise ValueError if a float anywhere inside `obj` (dicts, lists) is NaN or inf.

    Used before writing JSON: `json.dumps` would write `NaN`, which is not JSON.
    """
    if isinstance(obj, float) and not math.isfinite(obj):
        raise ValueError(f"{name} holds a non-finite number ({obj!r})")
    if isinstance(obj, dict):
        for k, v in obj.items():
            all_finite(f"{name}.{k}", v)
    elif isinstance(obj, list | tuple):
        for i, v in enumerate(obj):
            all_finite(f"{name}[{i}]", v)
    return obj
