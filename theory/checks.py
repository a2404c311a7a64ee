"""Argument checks shared by every layer: one place for the validation idiom.

Each check returns the value in its canonical type or raises ``ValueError`` naming the
argument and the allowed range (never ``OverflowError``, ``TypeError`` from a comparison, or
a silent NaN). Booleans are not numbers here, huge integers are compared exactly, and NaN
or infinity is out of every range. It lives in :mod:`theory`, the lowest layer, because the
theory needs it too; it imports nothing beyond the standard library.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any


def _show(value: object) -> str:
    """The offending value for a message (at most 60 characters: a 400-digit integer is not printed)."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _describe(low: float, high: float | None, low_open: bool, high_open: bool) -> str:
    upper = "inf" if high is None else f"{high:g}" if isinstance(high, float) else str(high)
    lower = f"{low:g}" if isinstance(low, float) else str(low)
    return f"{'(' if low_open else '['}{lower}, {upper}{')' if high_open or high is None else ']'}"


def check_int(value: object, name: str, low: int, high: int | None = None) -> int:
    """An integer (not a bool) in [low, high]; ``high=None``: unbounded above."""
    allowed = _describe(low, high, False, False)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer in {allowed}, got {_show(value)}")
    if value < low or (high is not None and value > high):
        raise ValueError(f"{name} must be an integer in {allowed}, got {_show(value)}")
    return int(value)


def check_real(value: object, name: str, low: float, high: float | None, *, low_open: bool = False,
               high_open: bool = False) -> float:
    """A finite real number (not a bool) between low and high, ends open or closed as asked; ``high=None``: no bound."""
    allowed = _describe(low, high, low_open, high_open)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a real number in {allowed}, got {_show(value)}")
    try:
        number = float(value)
    except (OverflowError, ValueError):  # an integer beyond float's range
        raise ValueError(f"{name} must be a real number in {allowed}, got {_show(value)}") from None
    ok = math.isfinite(number)
    ok = ok and (number > low if low_open else number >= low)
    ok = ok and (high is None or (number < high if high_open else number <= high))
    if not ok:
        raise ValueError(f"{name} must be a real number in {allowed}, got {_show(value)}")
    return number


def check_drop_ratio(value: object, name: str = "drop_ratio", *, allow_zero: bool = True) -> float:
    """A drop ratio: in [0, 1), or (0, 1) with ``allow_zero=False``."""
    return check_real(value, name, 0.0, 1.0, low_open=not allow_zero, high_open=True)


def check_seed(value: object, name: str = "seed") -> int:
    """A seed: an integer in [0, 2^63 - 1] (what numpy's SeedSequence and torch's generators both take)."""
    return check_int(value, name, 0, 2**63 - 1)


def check_bool(value: object, name: str) -> bool:
    """A bool (not a truthy string or number)."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {_show(value)}")
    return value


def check_choice(value: object, name: str, allowed: Sequence[str]) -> str:
    """One of the allowed option names."""
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{name} must be one of {tuple(allowed)}, got {_show(value)}")
    return value


def check_tuple(values: object, name: str, check: Callable[[object, str], Any], *, unique: bool = True) -> tuple:
    """A non-empty tuple whose items each pass ``check(item, f"{name}[i]")`` (no repeats if ``unique``)."""
    if not isinstance(values, tuple) or len(values) == 0:
        raise ValueError(f"{name} must be a non-empty tuple, got {_show(values)}")
    checked = tuple(check(item, f"{name}[{i}]") for i, item in enumerate(values))
    if unique and len(set(checked)) != len(checked):
        raise ValueError(f"{name} must not repeat values, got {_show(values)}")
    return checked
