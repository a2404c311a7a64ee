"""Order preservation and ratio compression of the expected attention (not in the paper).

Order: p_s > p_t  =>  E[w_s] > E[w_t]. Let R = sum_{k not in {s,t}} b_k p_k and
let b be the keep indicator of the *other* key of the pair (b_t for s, b_s for t;
both Bernoulli(1 - r), independent of R, so one b serves both). Then

    E[w_s] - E[w_t] = (1-r) E_{b,R}[ p_s/(p_s + b p_t + R) - p_t/(p_t + b p_s + R) ]
                    = (1-r) [ (1-r) E_R[(p_s - p_t)/(p_s + p_t + R)]                 (b = 1)
                              + r E_R[R (p_s - p_t)/((p_s + R)(p_t + R))] ]           (b = 0)

Both integrands are >= 0 for p_s > p_t and the b = 1 one is > 0, so the difference
is > 0. The all-dropped row adds 0 (zero), 0 (uniform: r^N/N to both) or
r^N (p_s - p_t) > 0 (undropped).

Ratios: E[w_s]/E[w_t] = c_s p_s / (c_t p_t) and c_s < c_t (smoothing gap), so
1 < E[w_s]/E[w_t] < p_s/p_t: expected attention compresses every ratio toward 1.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import sympy as sp

import theory
from theory.derivations.common import (
    ALL_DROPPED_CONVENTIONS,
    DROP_RATIO,
    KEEP_PROBABILITY,
    all_dropped_term,
    cancel_by_denominator,
    equation,
    keep_masks,
    kept_sum,
    key_weights,
    mask_probability,
    rng_for,
)
from theory.derivations.expected_output import smoothing_coefficient_closed_form
from theory.derivations.result import Derivation
from theory.rows import softmax_gaussian_rows

log = logging.getLogger(__name__)

ORDER_KEY = "order-preservation"
RATIO_KEY = "ratio-compression"
SYMBOLIC_SIZES = (3,)  # N of the exact decomposition check (4 takes ~5 s)

_LARGER, _SMALLER = sp.symbols("p_s p_t", positive=True)
_REST = sp.Symbol("R", nonnegative=True)
_GAP = sp.Symbol("delta", positive=True)


def pair_difference(other_kept: int, rest: sp.Expr = _REST) -> sp.Expr:
    """p_s/(p_s + b p_t + R) - p_t/(p_t + b p_s + R) for b = ``other_kept``, factored."""
    b = other_kept
    difference = _LARGER / (_LARGER + b * _SMALLER + rest) - _SMALLER / (_SMALLER + b * _LARGER + rest)
    return sp.factor(sp.cancel(difference))


def expected_weight_difference(n_keys: int, s: int = 0, t: int = 1, *, all_dropped: str = "zero") -> sp.Expr:
    """E[w_s] - E[w_t] = c_s p_s - c_t p_t from the closed forms (0-based keys)."""
    weights = key_weights(n_keys)
    return (
        smoothing_coefficient_closed_form(n_keys, s, all_dropped=all_dropped) * weights[s]
        - smoothing_coefficient_closed_form(n_keys, t, all_dropped=all_dropped) * weights[t]
    )


def conditioned_decomposition(n_keys: int, s: int = 0, t: int = 1, *, all_dropped: str = "zero") -> sp.Expr:
    """(1-r)[(1-r) E_R[d_1] + r E_R[d_0]] + convention term, as a sum over the masks of the other keys."""
    weights = key_weights(n_keys)
    p_s, p_t = weights[s], weights[t]
    others = [w for k, w in enumerate(weights) if k not in (s, t)]
    total = sp.Integer(0)
    for mask in keep_masks(len(others)):
        rest = kept_sum(mask, others)
        per_mask = (1 - DROP_RATIO) * pair_difference(1, rest) + DROP_RATIO * pair_difference(0, rest)
        total += mask_probability(mask) * per_mask.subs({_LARGER: p_s, _SMALLER: p_t}, simultaneous=True)
    convention = all_dropped_term(n_keys, p_s, all_dropped) - all_dropped_term(n_keys, p_t, all_dropped)
    return (1 - DROP_RATIO) * total + convention


def _numeric_rows(seed: int, key: str) -> list[tuple[np.ndarray, str]]:
    rng = rng_for(seed, key)
    return [(softmax_gaussian_rows(rng, 4, 8), "enumerate"), (softmax_gaussian_rows(rng, 4, 197), "integral")]


#: The numeric API the cross-checks evaluate: expected_attention(rows, r, all_dropped=..., method=...).
ExpectedAttention = Callable[..., np.ndarray]


def _numeric_order_violations(seed: int, expected_attention: ExpectedAttention) -> int:
    """Pairs adjacent in p whose expected weights are not in the same (strict) order."""
    violations = 0
    for rows, method in _numeric_rows(seed, ORDER_KEY):
        order = np.argsort(rows, axis=1)
        for convention in ALL_DROPPED_CONVENTIONS:
            for drop_ratio in (0.1, 0.5, 0.9):
                expected = expected_attention(rows, drop_ratio, all_dropped=convention, method=method)
                violations += int(np.sum(np.diff(np.take_along_axis(expected, order, axis=1), axis=1) <= 0))
    return violations


def check_order_preservation(
    *,
    seed: int = 0,
    symbolic_sizes: tuple[int, ...] = SYMBOLIC_SIZES,
    decomposition: Callable[..., sp.Expr] = conditioned_decomposition,
    expected_attention: ExpectedAttention = theory.expected_attention,
) -> Derivation:
    """Prove p_s > p_t => E[w_s] > E[w_t] by conditioning on the other key of the pair.

    ``decomposition(n_keys, all_dropped=...)`` is the claimed conditioned form of
    E[w_1] - E[w_2] and ``expected_attention`` the numeric API cross-checked on random
    rows; the defaults are the derivation's and :func:`theory.expected_attention`.
    Tests pass wrong ones to show the check can fail: a decomposition that differs
    from the closed form, or numeric counter-examples, give ``status="refuted"``; a
    sign sympy cannot prove gives ``"failed"`` (nothing settled).
    """
    title = "Order preservation: p_s > p_t implies E[w_s] > E[w_t]"
    statement = "for 0 < r < 1 and every all-dropped convention, DropKey's expected attention keeps the order of p"
    d_kept, d_dropped = pair_difference(1), pair_difference(0)
    d_kept_sign = d_kept.subs(_LARGER, _SMALLER + _GAP)
    d_dropped_sign = d_dropped.subs(_LARGER, _SMALLER + _GAP)
    # (1-r)^2 d_1 + r (1-r) d_0 with keep = 1 - r > 0: a positive plus a non-negative term.
    per_mask = KEEP_PROBABILITY**2 * d_kept_sign + DROP_RATIO * KEEP_PROBABILITY * d_dropped_sign
    signs_ok = bool(d_kept_sign.is_positive and d_dropped_sign.is_nonnegative and per_mask.is_positive)
    mismatches = [
        f"N={n_keys} {convention}"
        for n_keys in symbolic_sizes
        for convention in ALL_DROPPED_CONVENTIONS
        if cancel_by_denominator(
            expected_weight_difference(n_keys, all_dropped=convention)
            - decomposition(n_keys, all_dropped=convention)
        )
        != 0
    ]
    violations = _numeric_order_violations(seed, expected_attention)
    log.debug("order: signs %s, mismatches %s, violations %d", signs_ok, mismatches, violations)
    expressions: dict[str, sp.Basic] = {
        "d_1 (other key kept)": d_kept,
        "d_0 (other key dropped)": d_dropped,
        "per-mask integrand, p_s = p_t + delta, keep = 1 - r": per_mask,
        "E[w_1] - E[w_2] (N=3, zero)": equation(expected_weight_difference(3), decomposition(3, all_dropped="zero")),
        "undropped adds": all_dropped_term(3, _LARGER, "undropped") - all_dropped_term(3, _SMALLER, "undropped"),
    }
    if mismatches or violations:
        return Derivation(
            ORDER_KEY, title, statement, "refuted", False, expressions,
            "; ".join(
                ([f"claimed decomposition != closed-form E[w_s]-E[w_t] at {', '.join(mismatches)}"]
                 if mismatches else [])
                + ([f"{violations} numeric order violations (adjacent pairs with E[w_s] <= E[w_t])"]
                   if violations else [])
            ),
        )
    if not signs_ok:
        return Derivation(
            ORDER_KEY, title, statement, "failed", False, expressions,
            "sympy could not prove d_1 > 0, d_0 >= 0 and the per-mask integrand > 0",
        )
    details = (
        "sympy: d_1 = (p_s-p_t)/(p_s+p_t+R) > 0 and d_0 = R(p_s-p_t)/((p_s+R)(p_t+R)) >= 0 for p_s = p_t + delta "
        "(any N: generic R >= 0); decomposition == closed-form E[w_s]-E[w_t] "
        f"at N={','.join(map(str, symbolic_sizes))} for all conventions; "
        "coupling of b_t and b_s (same law, independent of R) by argument; numeric: order kept on random rows "
        "(N=8 enumerate, N=197 integral, r=0.1,0.5,0.9), 0 violations"
    )
    return Derivation(ORDER_KEY, title, statement, "proved", True, expressions, details)


def weight_ratio_bound(larger, smaller):
    """The claimed upper bound on E[w_s]/E[w_t]: p_s/p_t (for sympy symbols and numpy arrays alike)."""
    return larger / smaller


def ratio_compression_margin(bound: Callable = weight_ratio_bound) -> sp.Expr:
    """bound(p_s, p_t) - E[w_s]/E[w_t] with E[w_j] = c_j p_j and c_s = c_t - Delta (Delta > 0 by the smoothing gap)."""
    c_smaller = sp.Symbol("c_t", positive=True)
    coefficient_gap = sp.Symbol("Delta", positive=True)
    ratio = (c_smaller - coefficient_gap) * _LARGER / (c_smaller * _SMALLER)
    return sp.factor(bound(_LARGER, _SMALLER) - ratio)


def _numeric_ratio_violations(seed: int, bound: Callable, expected_attention: ExpectedAttention) -> int:
    """Pairs with p_s > p_t where E[w_s]/E[w_t] exceeds bound(p_s, p_t) (beyond rounding) or is <= 1."""
    violations = 0
    for rows, method in _numeric_rows(seed, RATIO_KEY):
        for convention in ALL_DROPPED_CONVENTIONS:
            for drop_ratio in (0.1, 0.5):
                expected = expected_attention(rows, drop_ratio, all_dropped=convention, method=method)
                for p, e in zip(rows, expected, strict=True):
                    larger = p[:, None] > p[None, :]
                    weight_ratio = e[:, None] / e[None, :]
                    violations += int(np.sum(larger & (weight_ratio > bound(p[:, None], p[None, :]) * (1 + 1e-12))))
                    violations += int(np.sum(larger & (weight_ratio <= 1)))
    return violations


def check_ratio_compression(
    *,
    seed: int = 0,
    bound: Callable = weight_ratio_bound,
    expected_attention: ExpectedAttention = theory.expected_attention,
) -> Derivation:
    """Prove 1 < E[w_s]/E[w_t] <= p_s/p_t from c_s < c_t and order preservation.

    ``bound(p_s, p_t)`` is the claimed upper bound (p_s/p_t; called with sympy
    symbols and with numpy arrays) and ``expected_attention`` the numeric API it is
    checked on. Numeric counter-examples give ``status="refuted"``; a bound sympy
    cannot derive from c_s < c_t gives ``"failed"`` (not settled).
    """
    title = "Ratio compression: 1 < E[w_s]/E[w_t] < p_s/p_t for p_s > p_t"
    statement = "E[w_s]/E[w_t] = c_s p_s/(c_t p_t) < p_s/p_t because c_s < c_t, and > 1 by order preservation"
    margin = ratio_compression_margin(bound)
    violations = _numeric_ratio_violations(seed, bound, expected_attention)
    expressions: dict[str, sp.Basic] = {
        "p_s/p_t - E[w_s]/E[w_t] (c_s = c_t - Delta)": margin,
    }
    if violations:
        return Derivation(
            RATIO_KEY, title, statement, "refuted", False, expressions,
            f"claimed bound {bound(_LARGER, _SMALLER)}: {violations} numeric counter-examples "
            "(E[w_s]/E[w_t] above the bound, or <= 1)",
        )
    if not margin.is_positive:
        return Derivation(
            RATIO_KEY, title, statement, "failed", False, expressions,
            f"sympy cannot show bound - E[w_s]/E[w_t] = {margin} > 0 from c_s < c_t",
        )
    details = (
        "sympy: p_s/p_t - c_s p_s/(c_t p_t) = Delta p_s/(c_t p_t) > 0 with Delta = c_t - c_s > 0 "
        "(smoothing-gap, proved); lower bound from order-preservation; numeric: every pair of random rows "
        "(N=8, N=197, all conventions), 0 violations"
    )
    return Derivation(RATIO_KEY, title, statement, "proved", True, expressions, details)
