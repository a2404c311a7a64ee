"""Post-softmax inverted attention dropout (timm's attn_drop): first and second moments.

w_j = b_j p_j / (1 - r) with b_j ~ Bernoulli(1 - r), independent. Since b_j^2 = b_j,

    E[w_j]   = (1 - r) p_j / (1 - r)                 = p_j            (c_j = 1: no smoothing)
    E[w_j^2] = (1 - r) p_j^2 / (1 - r)^2             = p_j^2 / (1 - r)
    Var[w_j] = p_j^2 / (1 - r) - p_j^2               = r / (1 - r) p_j^2,

and Cov[w_i, w_j] = 0 for i != j, so Var[o] = sum_j r/(1-r) p_j^2 v_j v_j^T, whose trace is
the per-key penalty r/(1-r) p_j^2 ||v_j||^2 (docs/theory.md section 2). Everything is symbolic for any N
(one key at a time); the numeric API is compared on random rows.
"""

from __future__ import annotations

import itertools
import logging

import numpy as np
import sympy as sp

import theory
from theory.derivations.common import DROP_RATIO, equation, rng_for
from theory.derivations.result import Derivation
from theory.rows import softmax_gaussian_rows

log = logging.getLogger(__name__)

KEY = "dropout-moments"
NUMERIC_RTOL = 1e-13  # relative: float64 rounding of r/(1-r) p^2

_WEIGHT = sp.Symbol("p_j", positive=True)
_OTHER = sp.Symbol("p_i", positive=True)


def _bernoulli_expectation(expression: sp.Expr, indicators: tuple[sp.Symbol, ...]) -> sp.Expr:
    """E over independent Bernoulli(1 - r) indicators: sum over their 0/1 values, weighted."""
    total = sp.Integer(0)
    for values in itertools.product((0, 1), repeat=len(indicators)):
        weight = sp.Mul(*[(1 - DROP_RATIO) if v else DROP_RATIO for v in values])
        total += weight * expression.subs(dict(zip(indicators, values, strict=True)))
    return sp.simplify(total)


def dropout_moments() -> dict[str, sp.Expr]:
    """E[w_j], Var[w_j] and Cov[w_i, w_j] of inverted dropout, derived by summing over the keep bits."""
    keep_j, keep_i = sp.symbols("b_j b_i")
    w_j = keep_j * _WEIGHT / (1 - DROP_RATIO)
    w_i = keep_i * _OTHER / (1 - DROP_RATIO)
    mean = _bernoulli_expectation(w_j, (keep_j,))
    second = _bernoulli_expectation(w_j**2, (keep_j,))
    covariance = _bernoulli_expectation(w_i * w_j, (keep_i, keep_j)) - mean * _bernoulli_expectation(w_i, (keep_i,))
    return {
        "E[w_j]": mean,
        "Var[w_j]": sp.factor(sp.simplify(second - mean**2)),
        "Cov[w_i, w_j]": sp.simplify(covariance),
    }


def claimed_dropout_variance(weight: sp.Expr = _WEIGHT) -> sp.Expr:
    """The claimed Var[w_j] = r/(1 - r) p_j^2 (docs/theory.md section 2)."""
    return DROP_RATIO / (1 - DROP_RATIO) * weight**2


def check_dropout_moments(*, seed: int = 0, claimed_variance: sp.Expr | None = None) -> Derivation:
    """Prove E[w_j] = p_j and Var[w_j] = ``claimed_variance`` (default: r/(1-r) p_j^2, docs/theory.md section 2)."""
    claimed = claimed_dropout_variance() if claimed_variance is None else claimed_variance
    title = "Post-softmax inverted dropout: E[w_j] = p_j, Var[w_j] = r/(1-r) p_j^2"
    statement = (
        "attention dropout after the softmax has c_j = 1 (no first-moment smoothing) and Var[w_j] = r/(1-r) p_j^2"
    )
    moments = dropout_moments()
    mean_ok = sp.simplify(moments["E[w_j]"] - _WEIGHT) == 0
    variance_ok = sp.simplify(moments["Var[w_j]"] - claimed) == 0
    covariance_ok = moments["Cov[w_i, w_j]"] == 0

    rng = rng_for(seed, KEY)
    rows = softmax_gaussian_rows(rng, 16, 197)
    variance_formula = sp.lambdify([_WEIGHT, DROP_RATIO], moments["Var[w_j]"], "numpy")
    numeric_error = 0.0  # largest relative error
    for drop_ratio in (0.1, 0.3, 0.9):
        derived = variance_formula(rows, drop_ratio)
        numeric_error = max(
            numeric_error,
            float(np.max(np.abs(derived - theory.dropout_attention_variance(rows, drop_ratio)) / derived)),
            float(np.max(np.abs(rows - theory.dropout_expected_attention(rows, drop_ratio)) / rows)),
        )
    log.debug("dropout: moments %s, numeric error %.3g", moments, numeric_error)
    expressions: dict[str, sp.Basic] = {
        name: equation(sp.Symbol(name), value) for name, value in moments.items()
    }
    expressions["claimed Var[w_j]"] = claimed
    if not (mean_ok and variance_ok and covariance_ok):
        return Derivation(
            KEY, title, statement, "refuted", False, expressions,
            f"derived E[w_j] = {moments['E[w_j]']}, Var[w_j] = {moments['Var[w_j]']}, "
            f"Cov = {moments['Cov[w_i, w_j]']}; claimed Var[w_j] = {claimed}",
        )
    if numeric_error > NUMERIC_RTOL:
        return Derivation(
            KEY, title, statement, "failed", False, expressions,
            f"numeric API disagrees with the derivation by {numeric_error:.3g}",
        )
    details = (
        "sympy: sums over b_j in {0,1} give E[w_j] = p_j, Var[w_j] = r p_j^2/(1-r), Cov[w_i,w_j] = 0 (any N); "
        f"theory.dropout_attention_variance / dropout_expected_attention agree to relative {numeric_error:.1e} "
        "on 16 random N=197 rows, r=0.1,0.3,0.9"
    )
    return Derivation(KEY, title, statement, "proved", True, expressions, details)
