"""Checks of the caller's arguments: each wrong type or value is one :class:`InvalidInputError` line.

Integers must be integers (Python or numpy, never ``bool``, never a float that happens to be whole);
numbers must be real and finite; text must be a ``str`` that is valid Unicode (a command line whose
bytes were not UTF-8 arrives with lone surrogates, which no tokenizer can read).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .errors import InvalidInputError

# Seeds are the 64-bit keys of ``mx.random.key``: every integer in [0, 2**64 - 1] is a distinct key, and
# anything outside would have to wrap.
SEED_MAX = 2**64 - 1


def integer(name: str, value: Any, *, minimum: int | None = None, maximum: int | None = None) -> int:
    """``value`` as an int within [minimum, maximum]."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise InvalidInputError(f"{name} must be an integer, got {_show(value)}")
    value = int(value)
    if minimum is not None and value < minimum:
        raise InvalidInputError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise InvalidInputError(f"{name} must be <= {maximum}, got {value}")
    return value


def number(name: str, value: Any, *, minimum: float = 0.0, inclusive: bool = True) -> float:
    """``value`` as a finite float >= ``minimum`` (> when not ``inclusive``)."""
    bound = f"{'>=' if inclusive else '>'} {minimum:g}"
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise InvalidInputError(f"{name} must be a number {bound}, got {_show(value)}")
    value = float(value)
    if not math.isfinite(value) or value < minimum or (not inclusive and value == minimum):
        raise InvalidInputError(f"{name} must be a finite number {bound}, got {value}")
    return value


def seed(value: Any) -> int:
    """A seed: an integer in [0, :data:`SEED_MAX`]."""
    return integer("seed", value, minimum=0, maximum=SEED_MAX)


def text(name: str, value: Any) -> str:
    """``value`` as a string that can be encoded as UTF-8 (no lone surrogates)."""
    if not isinstance(value, str):
        raise InvalidInputError(f"{name} must be a string, got {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidInputError(
            f"{name} is not valid UTF-8 text (character {e.start + 1} is an undecodable byte, as from a "
            "terminal not set to UTF-8)"
        ) from None
    return value


def _show(value: Any) -> str:
    shown = repr(value)
    return f"{type(value).__name__} {shown if len(shown) <= 40 else shown[:37] + '...'}"
