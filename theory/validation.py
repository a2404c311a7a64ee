"""Checks of the theory's own arguments: attention rows and workspace budgets.

The generic checks (drop ratios, option names, integers, seeds) have one home, :mod:`theory.checks`,
and the all-dropped conventions theirs, :mod:`theory.conventions`; ``check_drop_ratio`` and
``ALL_DROPPED_CONVENTIONS`` are re-exported here for older imports. Every check raises
``ValueError`` naming the offending argument and the allowed range, so a caller never gets a
silent NaN back.
"""

from __future__ import annotations

import numbers

import numpy as np

from theory.checks import check_drop_ratio
from theory.conventions import ALL_DROPPED_CONVENTIONS

__all__ = [
    "ALL_DROPPED_CONVENTIONS",
    "ROW_SUM_TOLERANCE",
    "check_attention_rows",
    "check_drop_ratio",
    "check_workspace_bytes",
]

#: A row of attention weights must sum to 1 within this absolute tolerance.
#: It admits float32 softmax outputs of ViT rows (N <= a few thousand keys).
ROW_SUM_TOLERANCE = 1e-6


def check_attention_rows(p: object, *, name: str = "p") -> tuple[np.ndarray, tuple[int, ...]]:
    """Validate attention weights and return them as a 2-D float64 array of rows.

    Accepts one row (1-D, shape (N,)) or any batch of rows (shape (..., N), one row
    per leading index), N >= 1 and at least one row. Weights must be finite,
    non-negative and each row must sum to 1 within :data:`ROW_SUM_TOLERANCE`.
    Returns ``(rows, batch_shape)``: rows of shape (R, N), R = prod(batch_shape), a
    fresh copy; ``batch_shape`` is ``p.shape[:-1]`` (``()`` for one row).
    """
    try:
        array = np.asarray(p)
    except Exception as exc:  # ragged lists and the like
        raise ValueError(f"{name} must be an array of attention weights, shape (..., N): {exc}") from exc
    if array.dtype == object or not (
        np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)
    ):
        raise ValueError(f"{name} must hold real numbers, got dtype {array.dtype}")
    if array.ndim < 1:
        raise ValueError(
            f"{name} must be 1-D (one row) or more, shape (..., N) with one row per leading index, "
            f"got a 0-D value"
        )
    if array.size < 1:
        raise ValueError(f"{name} must have at least one row and one key, got shape {array.shape}")
    batch_shape = array.shape[:-1]
    rows = np.array(array, dtype=np.float64, copy=True).reshape(-1, array.shape[-1])
    if not np.all(np.isfinite(rows)):
        raise ValueError(f"{name} must be finite (no NaN or inf)")
    if np.any(rows < 0):
        raise ValueError(f"{name} must be non-negative, minimum is {rows.min()!r}")
    with np.errstate(over="ignore"):  # weights near 1e308 sum to inf: a ValueError below, not a warning
        sums = rows.sum(axis=1)
    worst = int(np.argmax(np.abs(sums - 1.0)))
    if abs(sums[worst] - 1.0) > ROW_SUM_TOLERANCE:
        where = worst if len(batch_shape) <= 1 else tuple(int(i) for i in np.unravel_index(worst, batch_shape))
        raise ValueError(
            f"each row of {name} must sum to 1 within {ROW_SUM_TOLERANCE:g}; "
            f"row {where} sums to {sums[worst]!r}"
        )
    return rows, batch_shape


def check_workspace_bytes(value: object, *, name: str = "workspace_bytes") -> int | None:
    """Return ``value`` (None, or an integer number of bytes >= 1), or raise ValueError."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be None or a positive integer number of bytes, got {value!r}")
    return int(value)
