"""The one statistical assertion of the test suite: an estimate within a few standard errors of the truth.

Every statistical test compares an estimate (a sample mean, a proportion, ...) with an exact
expectation and passes when every entry lies within ``multiple`` (5 by default) standard errors,
plus ``atol`` for float rounding where the estimate itself is rounded (never to widen the band).
Tests draw from fixed seeds, so they are deterministic; for a correct implementation a 5-SE miss
has probability about 6e-7 per entry.

    from stat_assertions import assert_within_standard_errors, sample_mean_and_standard_error

    mean, se = sample_mean_and_standard_error(samples)          # over axis 0, SD with ddof=1
    assert_within_standard_errors(mean, expected, se, what="E[w]")
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["assert_within_standard_errors", "sample_mean_and_standard_error"]


def _as_array(value: Any) -> np.ndarray:
    """numpy float64 from a number, array or torch tensor (detached, on the CPU), without importing torch."""
    if hasattr(value, "detach"):  # a torch tensor
        value = value.detach().cpu().double().numpy()
    return np.asarray(value, dtype=np.float64)


def sample_mean_and_standard_error(samples: Any, axis: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The mean of ``samples`` over ``axis`` and its standard error, SD (ddof=1) / sqrt(count)."""
    data = _as_array(samples)
    count = data.shape[axis]
    if count < 2:
        raise ValueError(f"samples needs at least 2 draws along axis {axis}, got {count}")
    return data.mean(axis=axis), data.std(axis=axis, ddof=1) / np.sqrt(count)


def assert_within_standard_errors(
    estimate: Any, expected: Any, standard_error: Any, *, multiple: float = 5.0, atol: float = 0.0, what: str = ""
) -> None:
    """Assert ``|estimate - expected| <= multiple * standard_error + atol`` entrywise (arrays broadcast).

    The failure message names ``what``, the worst entry (by z = deviation / SE), its estimate,
    expectation, SE and z, and how many entries failed. NaN anywhere fails.
    """
    if not multiple > 0:
        raise ValueError(f"multiple must be > 0, got {multiple!r}")
    if not atol >= 0:
        raise ValueError(f"atol must be >= 0, got {atol!r}")
    got, want, se = np.broadcast_arrays(_as_array(estimate), _as_array(expected), _as_array(standard_error))
    if np.any(se < 0):
        raise ValueError("standard_error must be >= 0")
    deviation = np.abs(got - want)
    ok = deviation <= multiple * se + atol  # False for NaN
    if np.all(ok):
        return
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.where(se > 0, deviation / se, np.where(deviation > atol, np.inf, 0.0))
    z = np.where(np.isnan(deviation), np.inf, z)
    worst = np.unravel_index(int(np.argmax(np.where(ok, -np.inf, z))), z.shape) if z.ndim else ()
    label = f"{what}: " if what else ""
    raise AssertionError(
        f"{label}{int(np.size(ok) - np.count_nonzero(ok))} of {np.size(ok)} entries beyond {multiple:g} SE"
        f"{f' + {atol:g}' if atol else ''}; worst at {tuple(int(i) for i in worst)}: estimate {got[worst]:.6g}, "
        f"expected {want[worst]:.6g}, SE {se[worst]:.3g}, z = {z[worst]:.3g}"
    )
