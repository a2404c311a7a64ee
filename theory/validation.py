"""Input checks shared by every public function of :mod:`theory`.

Every check raises ``ValueError`` naming the offending argument and the allowed
range, so a caller never gets a silent NaN back.
"""

from __future__ import annotations

import numbers

import numpy as np

#: Conventions for a row whose keys are all dropped (THEORY-NOTES section 1).
ALL_DROPPED_CONVENTIONS = ("zero", "uniform", "undropped")

#: A row of attention weights must sum to 1 within this absolute tolerance.
#: It admits float32 softmax outputs of ViT rows (N <= a few thousand keys).
ROW_SUM_TOLERANCE = 1e-6


def check_drop_ratio(drop_ratio: object, *, name: str = "drop_ratio") -> float:
    """Return ``drop_ratio`` as a float in [0, 1), or raise ValueError."""
    if isinstance(drop_ratio, bool) or not isinstance(drop_ratio, numbers.Real):
        raise ValueError(f"{name} must be a real number in [0, 1), got {drop_ratio!r}")
    value = float(drop_ratio)
    if not (0.0 <= value < 1.0):  # also rejects NaN
        raise ValueError(f"{name} must be in [0, 1), got {value!r}")
    return value


def check_option(value: object, allowed: tuple[str, ...], *, name: str) -> str:
    """Return ``value`` if it is one of ``allowed``, else raise ValueError."""
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    return value


def check_attention_rows(p: object, *, name: str = "p") -> tuple[np.ndarray, bool]:
    """Validate attention weights and return them as a 2-D float64 array.

    Accepts one row (1-D, shape (N,)) or a batch of rows (2-D, shape (R, N)),
    N >= 1. Weights must be finite, non-negative and each row must sum to 1
    within :data:`ROW_SUM_TOLERANCE`. Returns ``(rows, was_1d)``.
    """
    try:
        array = np.asarray(p)
    except Exception as exc:  # ragged lists and the like
        raise ValueError(f"{name} must be a 1-D or 2-D array of attention weights: {exc}") from exc
    if array.dtype == object or not (
        np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)
    ):
        raise ValueError(f"{name} must hold real numbers, got dtype {array.dtype}")
    if array.ndim not in (1, 2):
        raise ValueError(
            f"{name} must be 1-D (one row) or 2-D (one row per query), got {array.ndim}-D "
            f"with shape {array.shape}"
        )
    if array.shape[-1] < 1 or (array.ndim == 2 and array.shape[0] < 1):
        raise ValueError(f"{name} must have at least one row and one key, got shape {array.shape}")
    rows = np.array(array, dtype=np.float64, ndmin=2, copy=True)
    if not np.all(np.isfinite(rows)):
        raise ValueError(f"{name} must be finite (no NaN or inf)")
    if np.any(rows < 0):
        raise ValueError(f"{name} must be non-negative, minimum is {rows.min()!r}")
    sums = rows.sum(axis=1)
    worst = int(np.argmax(np.abs(sums - 1.0)))
    if abs(sums[worst] - 1.0) > ROW_SUM_TOLERANCE:
        raise ValueError(
            f"each row of {name} must sum to 1 within {ROW_SUM_TOLERANCE:g}; "
            f"row {worst} sums to {sums[worst]!r}"
        )
    return rows, array.ndim == 1
