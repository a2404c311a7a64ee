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

from collections.abc import Iterable

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
