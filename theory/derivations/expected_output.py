"""Eq. (3): E[o] = sum_j c_j p_j v_j, in closed (mask-sum) form and in integral form.

Under DropKey a keep mask b gives w_j = b_j p_j / sum_k b_k p_k. When key j is kept
(probability 1 - r, independent of the others) the denominator is p_j + S_-j with
S_-j = sum_{k != j} b_k p_k, so under the zero convention

    E[w_j] = (1 - r) p_j E[1 / (p_j + S_-j)] = c_j p_j.

Closed form: average 1/(p_j + S) over the 2^(N-1) masks of the other keys.
Integral form: 1/x = integral_0^oo e^(-t x) dt and E[e^(-t S_-j)] = prod_{k != j}
(r + (1 - r) e^(-t p_k)) by independence, so

    c_j = (1 - r) integral_0^oo e^(-t p_j) prod_{k != j} (r + (1 - r) e^(-t p_k)) dt.

The all-dropped row (probability r^N) adds r^N / N (uniform) or r^N p_j (undropped)
to E[w_j], i.e. r^N / (N p_j) or r^N to c_j.

Proof plan (what is computed, what is argued):
1. sympy integrates the expanded integral form for symbolic p at N = 2, 3 and
   the result equals the closed form exactly.
2. General N, by induction on the number of other keys: sympy verifies (a) the
   lemma integral_0^oo e^(-t x) dt = 1/x for symbolic x > 0, and (b) the induction
   step on a generic term pi e^(-t S) of the expanded product: multiplying by one
   more factor (r + (1 - r) e^(-t p)) gives the two terms of the masks with that
   key dropped (pi r, S) and kept (pi (1 - r), S + p). The sum over masks is finite,
   so integrating term by term is exact (argument).
3. The conventions are checked numerically against theory.expected_attention.
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
    INTEGRATION_VARIABLE,
    all_dropped_term,
    equation,
    is_zero_rational,
    keep_masks,
    kept_sum,
    key_weights,
    mask_probability,
    rng_for,
    value_vectors,
)
from theory.derivations.result import Derivation
from theory.rows import softmax_gaussian_rows

log = logging.getLogger(__name__)

KEY = "expected-output"
SYMBOLIC_SIZES = (2, 3)  # N at which sympy integrates the integral form exactly (N=4 takes ~6 s)
EXPANSION_SIZES = (1, 2, 3, 4, 5)  # numbers of other keys at which the product is expanded
NUMERIC_SIZE = 5  # N of the random rows compared with the numeric API
NUMERIC_TOLERANCE = 1e-11


def smoothing_coefficient_closed_form(
    n_keys: int, key: int, *, all_dropped: str = "zero"
) -> sp.Expr:
    """c_j (0-based ``key``) as the sum over the 2^(N-1) masks of the other keys."""
    weights = key_weights(n_keys)
    others = [w for k, w in enumerate(weights) if k != key]
    mask_average = sp.Add(
        *[
            mask_probability(mask) / (weights[key] + kept_sum(mask, others))
            for mask in keep_masks(len(others))
        ]
    )
    regular = (1 - DROP_RATIO) * mask_average
    return regular + all_dropped_term(n_keys, weights[key], all_dropped) / weights[key]


def integral_form_integrand(n_keys: int, key: int) -> sp.Expr:
    """(1 - r) e^(-t p_j) prod_{k != j} (r + (1 - r) e^(-t p_k)), whose integral is c_j."""
    t = INTEGRATION_VARIABLE
    weights = key_weights(n_keys)
    generating = sp.Mul(
        *[DROP_RATIO + (1 - DROP_RATIO) * sp.exp(-t * w) for k, w in enumerate(weights) if k != key]
    )
    return (1 - DROP_RATIO) * sp.exp(-t * weights[key]) * generating


def smoothing_coefficient_integral_form(n_keys: int, key: int) -> sp.Integral:
    """c_j (zero convention) as the unevaluated integral over t in (0, oo)."""
    return sp.Integral(integral_form_integrand(n_keys, key), (INTEGRATION_VARIABLE, 0, sp.oo))


def integrate_integral_form(integral: sp.Integral) -> sp.Expr:
    """Evaluate an integral form: expand the product into exponentials, integrate term by term."""
    (variable, lower, upper), = integral.limits
    return sp.integrate(sp.expand(integral.function), (variable, lower, upper))


def expected_output_closed_form(n_keys: int, *, all_dropped: str = "zero") -> sp.Expr:
    """E[o] = sum_j c_j p_j v_j with every c_j in closed form (v_j stands for the value vector)."""
    weights, values = key_weights(n_keys), value_vectors(n_keys)
    return sp.Add(
        *[
            smoothing_coefficient_closed_form(n_keys, j, all_dropped=all_dropped) * weights[j] * values[j]
            for j in range(n_keys)
        ]
    )


def expected_output_integral_form(n_keys: int) -> sp.Expr:
    """E[o] = sum_j c_j p_j v_j with every c_j an unevaluated integral (zero convention)."""
    weights, values = key_weights(n_keys), value_vectors(n_keys)
    return sp.Add(
        *[smoothing_coefficient_integral_form(n_keys, j) * weights[j] * values[j] for j in range(n_keys)]
    )


def exponential_integral_lemma() -> tuple[sp.Expr, sp.Expr]:
    """(integral_0^oo e^(-t x) dt evaluated by sympy for symbolic x > 0, and 1/x)."""
    x = sp.Symbol("x", positive=True)
    return sp.integrate(sp.exp(-INTEGRATION_VARIABLE * x), (INTEGRATION_VARIABLE, 0, sp.oo)), 1 / x


def induction_step_residual() -> sp.Expr:
    """Generic term times one more factor, minus its two mask terms; 0 proves the step.

    pi e^(-t S) (r + (1 - r) e^(-t p))  =  (r pi) e^(-t S)  +  ((1 - r) pi) e^(-t (S + p)):
    the mask with the new key dropped, and the one with it kept.
    """
    t = INTEGRATION_VARIABLE
    probability, kept_weight, new_weight = sp.symbols("pi S p", positive=True)
    term = probability * sp.exp(-t * kept_weight)
    extended = term * (DROP_RATIO + (1 - DROP_RATIO) * sp.exp(-t * new_weight))
    split = DROP_RATIO * probability * sp.exp(-t * kept_weight) + (
        1 - DROP_RATIO
    ) * probability * sp.exp(-t * (kept_weight + new_weight))
    return sp.simplify(sp.expand(extended - split))


def product_expansion_residual(n_others: int) -> sp.Expr:
    """prod_k (r + (1 - r) x_k) minus sum over masks P(mask) prod_{kept} x_k, expanded (0 if equal).

    With x_k = e^(-t p_k) this is E[e^(-t S)] = sum_masks P(mask) e^(-t S(mask)).
    """
    factors = sp.symbols(f"x1:{n_others + 1}", positive=True)
    product = sp.Mul(*[DROP_RATIO + (1 - DROP_RATIO) * x for x in factors])
    mask_sum = sp.Add(
        *[
            mask_probability(mask) * sp.Mul(*[x for b, x in zip(mask, factors, strict=True) if b])
            for mask in keep_masks(n_others)
        ]
    )
    return sp.expand(product - mask_sum)


def _numeric_convention_errors(seed: int) -> dict[str, float]:
    """Largest |closed form - theory.expected_attention| per convention on random rows."""
    rng = rng_for(seed, KEY)
    rows = softmax_gaussian_rows(rng, n_rows=20, n_keys=NUMERIC_SIZE)
    weights = key_weights(NUMERIC_SIZE)
    errors = {}
    for convention in ALL_DROPPED_CONVENTIONS:
        expected = [
            smoothing_coefficient_closed_form(NUMERIC_SIZE, j, all_dropped=convention) * weights[j]
            for j in range(NUMERIC_SIZE)
        ]
        evaluate = sp.lambdify([weights, DROP_RATIO], expected, "numpy")
        worst = 0.0
        for drop_ratio in (0.1, 0.5, 0.9):
            closed = np.array([evaluate(row, drop_ratio) for row in rows])
            for method in ("enumerate", "integral"):
                numeric = theory.expected_attention(rows, drop_ratio, all_dropped=convention, method=method)
                worst = max(worst, float(np.max(np.abs(closed - numeric))))
        errors[convention] = worst
    return errors


def check_expected_output(
    *,
    seed: int = 0,
    integral_form: Callable[[int, int], sp.Integral] = smoothing_coefficient_integral_form,
    symbolic_sizes: tuple[int, ...] = SYMBOLIC_SIZES,
) -> Derivation:
    """Prove closed form == integral form (the Eq. 3 representation, docs/theory.md section 2).

    ``integral_form(n, j)`` is the claim being checked; pass a different one to see
    the check fail.
    """
    title = "Expected output: closed (mask-sum) form equals the integral form"
    statement = (
        "E[o] = sum_j c_j p_j v_j with c_j = (1-r) E[1/(p_j + S_-j)] = "
        "(1-r) int_0^oo e^(-t p_j) prod_{k!=j} (r + (1-r) e^(-t p_k)) dt (zero convention); "
        "uniform adds r^N/(N p_j) to c_j, undropped adds r^N"
    )
    mismatches = []
    for n_keys in symbolic_sizes:
        for j in range(n_keys):
            closed = smoothing_coefficient_closed_form(n_keys, j)
            integrated = integrate_integral_form(integral_form(n_keys, j))
            if not is_zero_rational(closed - integrated):
                mismatches.append(f"N={n_keys}, j={j + 1}")
    lemma_value, lemma_target = exponential_integral_lemma()
    lemma_holds = sp.simplify(lemma_value - lemma_target) == 0
    step_residual = induction_step_residual()
    expansion_ok = all(product_expansion_residual(m) == 0 for m in EXPANSION_SIZES)
    convention_errors = _numeric_convention_errors(seed)
    numeric_ok = all(error < NUMERIC_TOLERANCE for error in convention_errors.values())
    log.debug("expected-output: mismatches %s, convention errors %s", mismatches, convention_errors)

    n_show = 3
    expressions: dict[str, sp.Basic] = {
        "c_1 (N=3, closed form)": smoothing_coefficient_closed_form(n_show, 0),
        "c_1 (N=3, integral form)": integral_form(n_show, 0),
        "E[o] (N=2, closed form)": expected_output_closed_form(2),
        "lemma": equation(sp.Integral(sp.exp(-INTEGRATION_VARIABLE * sp.Symbol("x", positive=True)),
                                      (INTEGRATION_VARIABLE, 0, sp.oo)), lemma_target),
        "induction step residual": step_residual,
        "c_1 uniform - c_1 zero (N=3)": sp.simplify(
            smoothing_coefficient_closed_form(n_show, 0, all_dropped="uniform")
            - smoothing_coefficient_closed_form(n_show, 0)
        ),
    }
    numeric_note = ", ".join(f"{name} {error:.1e}" for name, error in convention_errors.items())
    if mismatches:
        return Derivation(
            KEY, title, statement, "refuted", False, expressions,
            f"integral form != closed form at {'; '.join(mismatches)} (sympy integrate, cancel)",
        )
    if not (lemma_holds and step_residual == 0 and expansion_ok and numeric_ok):
        return Derivation(
            KEY, title, statement, "failed", False, expressions,
            f"lemma {lemma_holds}, induction step residual {step_residual}, "
            f"expansion {expansion_ok}, numeric max error {numeric_note}",
        )
    details = (
        "sympy: integrate(expand(integral form)) - closed form cancels to 0 for symbolic p at "
        f"N={','.join(map(str, symbolic_sizes))} "
        "(every j); general N by induction on the other keys (sympy: int_0^oo e^(-tx)dt = 1/x for x>0 "
        "and the one-factor step pi e^(-tS)(r+(1-r)e^(-tp)) = r pi e^(-tS) + (1-r) pi e^(-t(S+p)); "
        "product = mask sum expanded for 1..5 other keys; finite sum, term-by-term integration by argument); "
        "conventions vs theory.expected_attention "
        f"(enumerate and integral, N={NUMERIC_SIZE}, 60 rows): max error {numeric_note}"
    )
    return Derivation(KEY, title, statement, "proved", True, expressions, details)
