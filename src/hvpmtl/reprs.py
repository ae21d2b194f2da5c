"""Bounded reprs for error messages.

A value echoed from a config or data file is cut to about :data:`LIMIT` characters, and its
repr is never built in full first: lists shared by YAML aliases can stand for billions of
values, and a long string or list would otherwise fill the one-line error.
"""

from __future__ import annotations

import reprlib
from typing import Any

__all__ = ["LIMIT", "short_repr", "short_text"]

LIMIT = 200

_repr = reprlib.Repr()
_repr.maxlevel = 3  # nested containers below this depth show as [...]
_repr.maxlist = _repr.maxtuple = _repr.maxdict = _repr.maxset = _repr.maxfrozenset = _repr.maxdeque = 10
_repr.maxstring = _repr.maxother = _repr.maxlong = LIMIT


def short_repr(value: Any, limit: int = LIMIT) -> str:
    """``repr(value)`` of at most about ``limit`` characters (``...`` marks what was left out)."""
    return short_text(_repr.repr(value), limit)


def short_text(text: str, limit: int = LIMIT) -> str:
    """``text`` cut to ``limit`` characters, ending in ``...`` when cut."""
    return text if len(text) <= limit else text[: limit - 3] + "..."
