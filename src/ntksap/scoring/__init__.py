"""Pruning scores, one file per method family, each registered by name.

Example:
    >>> from ntksap.scoring import list_methods
    >>> list_methods()
    ['grasp', 'itersnip', 'magnitude', 'ntksap', 'px', 'random', 'snip', 'synflow']
"""

from ntksap.scoring import grasp, ntksap, px, simple, snip, synflow  # noqa: F401  (registration)
from ntksap.scoring.base import (
    METHODS,
    Method,
    Option,
    ScoreContext,
    Scores,
    get_method,
    list_methods,
    register_method,
)

__all__ = [
    "METHODS",
    "Method",
    "Option",
    "ScoreContext",
    "Scores",
    "get_method",
    "list_methods",
    "register_method",
]
