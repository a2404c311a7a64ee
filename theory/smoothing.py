"""Expected attention under DropKey and post-softmax dropout: the public numeric API.

DropKey (THEORY-NOTES section 1): every key of a row is kept independently with
probability 1 - r, dropped logits go to -inf before the softmax, and there is no
rescaling, so a kept mask b gives w_j = b_j p_j / sum_k b_k p_k. Then

    E[w_j] = c_j p_j,   c_j = (1 - r) E[1 / (p_j + S_-j)],   S_-j = sum_{k != j} b_k p_k.

All-dropped rows (probability r^N') follow one of three conventions:
``"zero"`` (weights 0), ``"uniform"`` (1/N' on every present key) or
``"undropped"`` (p itself), which add 0, r^N'/N' and r^N' p_j to E[w_j].

Absent keys. A weight p_j = 0 is read as an absent key (a logit at -inf, as with
padding or a causal mask): it never receives weight, so E[w_j] = 0, and N' counts
the present keys only. Its coefficient is defined as the *marginal* coefficient
c_j = (1 - r) E[1/S_-j ; S_-j > 0] (the slope of E[w_j] as p_j grows from 0,
1 at r = 0). The literal limit of c_j as p_j -> 0+ is +inf for r > 0, because
a vanishing key still takes the whole row when it alone is kept; that limit is
not used. With the "uniform" or "undropped" convention, c_j of an absent key is
still that marginal coefficient (the convention adds nothing to a zero weight).

Methods: ``"enumerate"`` sums over all 2^N keep masks (N <= ENUMERATE_MAX_KEYS);
``"integral"`` uses the exact integral representation (any N; its quadrature
stops once successive estimates agree to INTEGRAL_RTOL = 1e-13 relative, and the
error it reaches is below 1e-14 relative: at most 9.5e-15 over every coefficient
of ViT-like rows with N <= 577 against 30-digit mpmath, see
benchmarks/results/theory_cpu.md); ``"auto"`` enumerates for
N <= AUTO_ENUMERATE_MAX_KEYS and integrates otherwise. Every function accepts one row (N,) or a batch (R, N) and returns the
same shape, as float64. ``drop_ratio == 0`` returns p (or 1, or 0) exactly.
"""

from __future__ import annotations

import math

import numpy as np

from theory.enumeration import ENUMERATE_MAX_KEYS, enumerated_weight_moment
from theory.integral import regular_part
from theory.validation import (
    ALL_DROPPED_CONVENTIONS,
    check_attention_rows,
    check_drop_ratio,
    check_option,
)

METHODS = ("auto", "enumerate", "integral")

#: "auto" enumerates up to this many keys (2^10 masks: exact and instant).
AUTO_ENUMERATE_MAX_KEYS = 10


def _resolve_method(method: object, n_keys: int) -> str:
    method = check_option(method, METHODS, name="method")
    if method == "auto":
        return "enumerate" if n_keys <= AUTO_ENUMERATE_MAX_KEYS else "integral"
    if method == "enumerate" and n_keys > ENUMERATE_MAX_KEYS:
        raise ValueError(
            f"method='enumerate' supports rows of at most {ENUMERATE_MAX_KEYS} keys, "
            f"got N = {n_keys}; use method='integral' or 'auto'"
        )
    return method


def _all_dropped_probability(rows: np.ndarray, drop_ratio: float) -> np.ndarray:
    """r^N' per row, N' = number of present keys; shape (R, 1)."""
    n_present = (rows > 0).sum(axis=1, keepdims=True)
    return np.exp(n_present * math.log(drop_ratio))


def _all_dropped_weight(rows: np.ndarray, all_dropped: str, order: int) -> np.ndarray:
    """w_j^order of an all-dropped row under each convention, shape (R, N)."""
    if all_dropped == "zero":
        return np.zeros_like(rows)
    if all_dropped == "uniform":
        present = rows > 0
        return present / present.sum(axis=1, keepdims=True) ** order
    return rows**order  # "undropped"


def _weight_moment_parts(
    rows: np.ndarray, drop_ratio: float, order: int, method: str
) -> np.ndarray:
    """E[w_j^order] under the zero convention, (R, N), for 0 < r < 1."""
    if method == "enumerate":
        return enumerated_weight_moment(rows, drop_ratio, order)
    regular = regular_part(rows, drop_ratio, order)
    present = rows > 0
    n_others = present.sum(axis=1, keepdims=True) - present
    alone = np.exp(n_others * math.log(drop_ratio))  # P(all other present keys dropped)
    moment = (1.0 - drop_ratio) * (alone + rows**order * regular)
    return np.where(present, moment, 0.0)


def _weight_moment(
    p: object, drop_ratio: object, all_dropped: object, method: object, order: int
) -> tuple[np.ndarray, np.ndarray, float, bool]:
    """Validate, then E[w_j^order] under the chosen convention; also the checked rows."""
    rows, was_1d = check_attention_rows(p)
    r = check_drop_ratio(drop_ratio)
    convention = check_option(all_dropped, ALL_DROPPED_CONVENTIONS, name="all_dropped")
    resolved = _resolve_method(method, rows.shape[1])
    if r == 0.0:
        return rows**order, rows, r, was_1d
    moment = _weight_moment_parts(rows, r, order, resolved)
    moment += _all_dropped_probability(rows, r) * _all_dropped_weight(rows, convention, order)
    return moment, rows, r, was_1d


def _shape_like_input(values: np.ndarray, was_1d: bool) -> np.ndarray:
    return values[0] if was_1d else values


def expected_attention(
    p: object, drop_ratio: object, *, all_dropped: str = "zero", method: str = "auto"
) -> np.ndarray:
    """E[w] for attention row(s) p under DropKey with drop ratio r in [0, 1).

    p: (N,) or (R, N) non-negative weights, each row summing to 1 (within 1e-6).
    Returns an array of p's shape. ``drop_ratio == 0`` returns p exactly.

    >>> expected_attention([0.5, 0.5], 0.5).tolist()  # each key alone w.p. 1/4, both w.p. 1/4
    [0.375, 0.375]
    """
    moment, _, _, was_1d = _weight_moment(p, drop_ratio, all_dropped, method, order=1)
    return _shape_like_input(moment, was_1d)


def smoothing_coefficients(
    p: object, drop_ratio: object, *, all_dropped: str = "zero", method: str = "auto"
) -> np.ndarray:
    """Smoothing coefficients c with E[w] = c * p (see the module doc for p_j = 0).

    ``drop_ratio == 0`` returns ones exactly.
    """
    moment, rows, r, was_1d = _weight_moment(p, drop_ratio, all_dropped, method, order=1)
    if r == 0.0:
        return _shape_like_input(np.ones_like(rows), was_1d)
    present = rows > 0
    coefficients = np.divide(moment, rows, out=np.zeros_like(rows), where=present)
    if not np.all(present):
        # Absent keys: the marginal coefficient (1 - r) E[1/S ; S > 0], integral only.
        marginal = (1.0 - r) * regular_part(rows, r, order=1)
        coefficients = np.where(present, coefficients, marginal)
    return _shape_like_input(coefficients, was_1d)


def attention_variance(
    p: object, drop_ratio: object, *, all_dropped: str = "zero", method: str = "auto"
) -> np.ndarray:
    """Var[w_j] under DropKey, from the exact second moment E[w_j^2] minus E[w_j]^2."""
    first, _, _, was_1d = _weight_moment(p, drop_ratio, all_dropped, method, order=1)
    second, _, _, _ = _weight_moment(p, drop_ratio, all_dropped, method, order=2)
    return _shape_like_input(np.maximum(second - first**2, 0.0), was_1d)


def dropout_expected_attention(p: object, drop_ratio: object) -> np.ndarray:
    """E[w] under post-softmax inverted dropout, w_j = b_j p_j / (1 - r): exactly p (c = 1)."""
    rows, was_1d = check_attention_rows(p)
    check_drop_ratio(drop_ratio)
    return _shape_like_input(rows, was_1d)


def dropout_attention_variance(p: object, drop_ratio: object) -> np.ndarray:
    """Var[w_j] under post-softmax inverted dropout: r / (1 - r) * p_j^2."""
    rows, was_1d = check_attention_rows(p)
    r = check_drop_ratio(drop_ratio)
    return _shape_like_input(r / (1.0 - r) * rows**2, was_1d)
