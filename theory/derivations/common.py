"""Symbols, keep masks and small helpers shared by the derivation modules.

Conventions used everywhere: keys are numbered 1..N, ``p_j > 0`` are the softmax
weights, ``r`` is the drop ratio (0 < r < 1 in every statement; sympy only knows
r > 0, so signs that need r < 1 are argued with the positive symbol ``keep = 1 - r``).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import sympy as sp

from theory.conventions import ALL_DROPPED_CONVENTIONS, AllDropped
from theory.seeding import generator, keyed_sequence

#: The drop ratio r (each key is dropped independently with probability r).
DROP_RATIO = sp.Symbol("r", positive=True)
#: The variable of the integral representation 1/x = integral_0^oo exp(-t x) dt.
INTEGRATION_VARIABLE = sp.Symbol("t", positive=True)


def key_weights(n_keys: int) -> tuple[sp.Symbol, ...]:
    """Positive symbols p1..pN for the attention weights of one row."""
    return tuple(sp.symbols(f"p1:{n_keys + 1}", positive=True))


def value_vectors(n_keys: int) -> tuple[sp.Symbol, ...]:
    """Symbols v1..vN standing for the value vectors (only their coefficients matter)."""
    return tuple(sp.symbols(f"v1:{n_keys + 1}"))


def keep_masks(n_keys: int) -> Iterator[tuple[int, ...]]:
    """All 2^n keep masks as 0/1 tuples (1 = kept)."""
    return itertools.product((0, 1), repeat=n_keys)


def mask_probability(mask: Sequence[int], drop_ratio: sp.Expr = DROP_RATIO) -> sp.Expr:
    """P(mask) = (1 - r)^kept * r^dropped for independent Bernoulli(1 - r) keeps."""
    kept = sum(mask)
    return (1 - drop_ratio) ** kept * drop_ratio ** (len(mask) - kept)


def kept_sum(mask: Sequence[int], weights: Sequence[sp.Expr]) -> sp.Expr:
    """S(mask) = sum of the weights of the kept keys."""
    return sp.Add(*[w for b, w in zip(mask, weights, strict=True) if b])


def all_dropped_term(n_keys: int, weight: sp.Expr, all_dropped: str) -> sp.Expr:
    """What an all-dropped row (probability r^N) adds to E[w_j] under each convention: r^N times the
    symbolic counterpart of :func:`theory.conventions.all_dropped_weights` (docs/theory.md section 1)."""
    if all_dropped == AllDropped.ZERO:
        return sp.Integer(0)
    if all_dropped == AllDropped.UNIFORM:
        return DROP_RATIO**n_keys / n_keys
    if all_dropped == AllDropped.UNDROPPED:
        return DROP_RATIO**n_keys * weight
    raise ValueError(f"all_dropped must be one of {ALL_DROPPED_CONVENTIONS}, got {all_dropped!r}")


#: keep = 1 - r as a positive symbol, so sympy can decide signs that need r < 1.
KEEP_PROBABILITY = sp.Symbol("keep", positive=True)


def with_keep_symbol(expression: sp.Expr) -> sp.Expr:
    """Rewrite the factors (r - 1) and (1 - r) of ``expression`` as -keep and keep (keep = 1 - r > 0)."""
    factored = sp.factor(expression)
    return factored.replace(
        lambda e: isinstance(e, sp.Add) and sp.expand(e - (DROP_RATIO - 1)) == 0, lambda e: -KEEP_PROBABILITY
    ).replace(lambda e: isinstance(e, sp.Add) and sp.expand(e - (1 - DROP_RATIO)) == 0, lambda e: KEEP_PROBABILITY)


def is_zero_rational(expression: sp.Expr) -> bool:
    """True iff a rational function of the symbols is identically zero (canonical form)."""
    return sp.cancel(sp.together(sp.expand(expression))) == 0


def cancel_by_denominator(expression: sp.Expr) -> sp.Expr:
    """Canonical form of a sum of fractions, fast when many terms share denominators.

    Terms are grouped by their denominator and each group is cancelled on its own
    before the (now few, often polynomial) group results are combined. Equivalent to
    ``cancel(together(expression))``, which is far slower on mask sums: it multiplies
    all 2^N subset-sum denominators together first.
    """
    groups: dict[sp.Expr, list[sp.Expr]] = {}
    for term in sp.Add.make_args(sp.expand(expression)):
        numerator, denominator = sp.fraction(term)
        groups.setdefault(denominator, []).append(numerator)
    partial = [sp.cancel(sp.Add(*numerators) / denominator) for denominator, numerators in groups.items()]
    return sp.cancel(sp.together(sp.Add(*partial)))


def rng_for(seed: int, key: str) -> np.random.Generator:
    """A generator for one derivation: independent of the order in which checks run."""
    return generator(keyed_sequence(seed, key))


#: Unit roundoff of float64 (2^-53): one rounded operation errs by at most this, relatively.
UNIT_ROUNDOFF = 2.0**-53
#: Step of the central differences. Any step is exact for a quadratic; a power of two keeps x +- h
#: close to exact, and a step of order 1 keeps the rounding error (which grows like 1/h) small.
DIFFERENCE_STEP = 0.5


def central_differences(function: Callable[[np.ndarray], float], point: np.ndarray,
                        step: float = DIFFERENCE_STEP) -> np.ndarray:
    """(f(x + h e_i) - f(x - h e_i)) / 2h for every coordinate i of ``point`` (any shape; same shape back).

    For an f that is quadratic in each coordinate (the other coordinates fixed) this is f's partial
    derivative exactly, for any h: f(x + h) - f(x - h) = 2 h f'(x) when f'' is constant. What remains
    is rounding, bounded by :func:`difference_tolerance`.
    """
    point = np.asarray(point, dtype=np.float64)
    gradient = np.empty_like(point)
    for index in np.ndindex(point.shape):
        up, down = point.copy(), point.copy()
        up[index] += step
        down[index] -= step
        gradient[index] = (function(up) - function(down)) / (up[index] - down[index])
    return gradient


def difference_tolerance(magnitude: float, n_operations: int, step: float = DIFFERENCE_STEP) -> float:
    """Rounding bound of :func:`central_differences` for a function evaluated with ``n_operations`` float64
    roundings on any path, whose terms' absolute values sum to at most ``magnitude`` (on both points).

    Each evaluation errs by at most n u magnitude (the standard bound for sums and products,
    u the unit roundoff, to first order); the difference of two such values, divided by 2h, by
    n u magnitude / h.
    """
    return n_operations * UNIT_ROUNDOFF * magnitude / step


def equation(lhs: sp.Expr, rhs: sp.Expr) -> sp.Eq:
    """An unevaluated sympy equation, for the ``expressions`` of a Derivation."""
    return sp.Eq(lhs, rhs, evaluate=False)
