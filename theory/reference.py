"""High-precision reference values of the smoothing coefficients: the check, not the method.

mpmath's tanh-sinh quadrature of the *original* integral

    c_j = (1 - r) int_0^oo e^(-t p_j) prod_{k != j} (r + (1 - r) e^(-t p_k)) dt      (p_j > 0)
    c_j = (1 - r) int_0^oo (prod_k (r + (1 - r) e^(-t p_k)) - r^m) dt               (p_j = 0)

(the absent-key case is the marginal coefficient of :mod:`theory.smoothing`; m counts the
present keys), at ``digits`` significant digits, with break points at every decade the
weights live on; the absent-key integral stops at a finite t where its tail is negligible.
It shares nothing with :mod:`theory.integral` but the integral itself: not the substitution
t = e^u, not the log-space factors, not the grid. The tests and benchmarks check the
integral method against it.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable
from dataclasses import dataclass

import mpmath
import numpy as np

#: Default working precision of the reference (significant decimal digits).
REFERENCE_DIGITS = 30


def mpmath_coefficients(
    p: np.ndarray, keys: Iterable[int], r: float, digits: int = REFERENCE_DIGITS
) -> tuple[dict[int, float], float]:
    """c_j (zero convention) for each j in ``keys`` of one row p, 0 < r < 1.

    The product over k != j is the full product over k divided by j's own factor,
    which is >= r, so the division loses nothing; the full product is cached per
    node (every key's quadrature visits the same nodes), which makes all N
    coefficients cost little more than one. Returns ({j: c_j}, the largest relative
    error mpmath estimates for its quadratures).
    """
    p = np.asarray(p, dtype=float)
    values: dict[int, float] = {}
    worst_estimate = 0.0
    with mpmath.workdps(digits):
        weights = [mpmath.mpf(float(x)) for x in p if x > 0]
        keep = 1 - mpmath.mpf(r)
        drop = mpmath.mpf(r)
        alone = drop ** len(weights)
        cache: dict[mpmath.mpf, mpmath.mpf] = {}

        def full_product(t: mpmath.mpf) -> mpmath.mpf:
            value = cache.get(t)
            if value is None:
                value = mpmath.fprod(drop + keep * mpmath.exp(-t * w) for w in weights)
                cache[t] = value
            return value

        smallest = float(p[p > 0].min())
        decades = sorted({mpmath.mpf(10) ** k for k in range(-1, int(np.ceil(-np.log10(smallest))) + 3)})
        # The absent-key integrand G - r^m is a difference whose rounding noise would be
        # integrated to infinity: it stops at t_end, beyond which it integrates to at most
        # m (1 - r) e^(-t_end p_min) / p_min = (1 - r) e^-50, against E[1/S ; S > 0] >= 1 - r^m.
        t_end = mpmath.mpf(50 + np.log(len(weights) / smallest)) / mpmath.mpf(smallest)
        for j in keys:
            own = mpmath.mpf(float(p[int(j)]))
            if own > 0:

                def integrand(t: mpmath.mpf, own: mpmath.mpf = own) -> mpmath.mpf:
                    decay = mpmath.exp(-t * own)
                    return decay * full_product(t) / (drop + keep * decay)

            else:

                def integrand(t: mpmath.mpf) -> mpmath.mpf:
                    return full_product(t) - alone

            ends = [mpmath.inf] if own > 0 else [t for t in (t_end,) if t > decades[-1]]
            integral, error = mpmath.quad(integrand, [0, *decades, *ends], error=True)
            values[int(j)] = float(keep * integral)
            worst_estimate = max(worst_estimate, float(error / integral))
    return values, worst_estimate


@dataclass(frozen=True)
class EnumeratedMoments:
    """What :func:`mpmath_enumerated_moments` returns for one row (floats rounded from mpmath).

    means: E[w_j]; variances: Var[w_j]; coefficients: c_j = E[w_j] / p_j for present keys,
    the marginal (1 - r) E[1/S ; S > 0] for absent ones (+inf where beyond float64's range;
    1 at r = 0).
    """

    means: list[float]
    variances: list[float]
    coefficients: list[float]


def mpmath_enumerated_moments(p: Iterable[float], r: float, all_dropped: str,
                              digits: int | None = None) -> EnumeratedMoments:
    """E[w_j], Var[w_j] and c_j of one row p under DropKey, by exact enumeration of its 2^N masks.

    The high-precision check for short rows (N <= 10 or so) at any drop ratio 0 <= r < 1,
    any convention: every mask's weights and probability in mpmath at ``digits`` significant
    digits (default 40 plus the decades of 1 / min(r, 1 - r), so that the variance, O(r)
    relative to E[w]^2 near r = 0, keeps about 40 digits), the variance as sum P (w - E[w])^2;
    mpmath's exponent range is unbounded, so subnormal weights and c_j ~ r^m / p_j lose nothing.
    It shares nothing with :mod:`theory.enumeration`, :mod:`theory.integral` or :mod:`theory.centred`.
    """
    p = [float(x) for x in p]
    n_keys = len(p)
    if digits is None:
        closest = min(r, 1.0 - r) if r > 0 else 1.0
        digits = 40 + int(np.ceil(-np.log10(closest)))
    with mpmath.workdps(digits):
        weights = [mpmath.mpf(x) for x in p]
        drop = mpmath.mpf(r)
        keep = 1 - drop
        present = [x > 0 for x in weights]
        if all_dropped == "zero":
            fallback = [mpmath.mpf(0)] * n_keys
        elif all_dropped == "uniform":
            fallback = [mpmath.mpf(1) / sum(present) if here else mpmath.mpf(0) for here in present]
        elif all_dropped == "undropped":
            fallback = list(weights)
        else:
            raise ValueError(f"all_dropped must be 'zero', 'uniform' or 'undropped', got {all_dropped!r}")
        masks = []
        marginal = mpmath.mpf(0)  # E[1/S ; S > 0], S the kept total
        for code in range(2**n_keys):
            kept = [(code >> i) & 1 == 1 for i in range(n_keys)]
            probability = mpmath.fprod(keep if b else drop for b in kept)
            total = mpmath.fsum(x for x, b in zip(weights, kept, strict=True) if b)
            if total > 0:
                row = [x / total if b else mpmath.mpf(0) for x, b in zip(weights, kept, strict=True)]
                marginal += probability / total
            else:
                row = fallback
            masks.append((probability, row))
        # Normalised by the rounded total probability: a weight that is the same under every mask then
        # has its mean exactly and variance exactly 0 (not the square of the total's rounding).
        total_probability = mpmath.fsum(prob for prob, _ in masks)
        means = [mpmath.fsum(prob * row[j] for prob, row in masks) / total_probability for j in range(n_keys)]
        variances = [mpmath.fsum(prob * (row[j] - means[j]) ** 2 for prob, row in masks) / total_probability
                     for j in range(n_keys)]
        coefficients = [mean / x if x > 0 else keep * marginal if r > 0 else mpmath.mpf(1)
                        for mean, x in zip(means, weights, strict=True)]
        return EnumeratedMoments([float(x) for x in means], [float(x) for x in variances],
                                 [_to_float(x) for x in coefficients])


def _to_float(value: mpmath.mpf) -> float:
    """float(value), +inf beyond float64's range (mpmath's float() rounds huge values to inf too, but say so)."""
    return math.inf if value > sys.float_info.max else float(value)
