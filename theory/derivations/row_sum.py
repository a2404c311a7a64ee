"""sum_j E[w_j] = sum_j c_j p_j = 1 - r^N under the zero convention (1 under the other two).

Argument for every N: a mask B with at least one kept key has weights
p_j / S(B) on its kept keys, which sum to 1; the empty mask (probability r^N)
has weights 0 (zero), 1/N each (uniform) or p (undropped), summing to 0, 1, 1.
So sum_j E[w_j] = P(B nonempty) + r^N * {0, 1, 1}.

Computation: sympy sums the closed-form c_j p_j for symbolic p at N = 2, 3, 4 and
cancels the difference with the claimed total to 0, for each convention.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import sympy as sp

from theory.derivations.common import (
    ALL_DROPPED_CONVENTIONS,
    DROP_RATIO,
    cancel_by_denominator,
    equation,
    key_weights,
)
from theory.derivations.expected_output import smoothing_coefficient_closed_form
from theory.derivations.result import Derivation

log = logging.getLogger(__name__)

KEY = "row-sum"
SYMBOLIC_SIZES = (2, 3, 4)


def expected_row_sum(n_keys: int, *, all_dropped: str = "zero") -> sp.Expr:
    """sum_j c_j p_j from the closed-form coefficients (symbolic p, r)."""
    weights = key_weights(n_keys)
    return sp.Add(
        *[
            smoothing_coefficient_closed_form(n_keys, j, all_dropped=all_dropped) * weights[j]
            for j in range(n_keys)
        ]
    )


def claimed_row_sum(n_keys: int, all_dropped: str) -> sp.Expr:
    """The claimed total (docs/theory.md section 2): 1 - r^N (zero); 1 (uniform, undropped)."""
    return 1 - DROP_RATIO**n_keys if all_dropped == "zero" else sp.Integer(1)


def _equal_on_simplex(derived: sp.Expr, claimed: sp.Expr, n_keys: int) -> bool:
    """derived == claimed for symbolic p with sum p = 1 (p_N = 1 - p_1 - ... - p_(N-1)).

    The zero and uniform totals hold for any p > 0 (they are homogeneous of degree 0);
    the undropped one adds r^N sum_j p_j, which is r^N only on the simplex.
    """
    weights = key_weights(n_keys)
    difference = cancel_by_denominator(derived - claimed)
    on_simplex = difference.subs(weights[-1], 1 - sp.Add(*weights[:-1]))
    return sp.cancel(sp.together(on_simplex)) == 0


def check_row_sum(
    *, seed: int = 0, claimed_total: Callable[[int, str], sp.Expr] = claimed_row_sum
) -> Derivation:
    """Prove sum_j c_j p_j equals ``claimed_total(N, convention)`` at N = 2, 3, 4 (seed unused)."""
    del seed  # purely symbolic
    title = "Row sum of the expected attention"
    statement = "sum_j c_j p_j = 1 - r^N under the zero convention, and 1 under uniform and undropped"
    mismatches = [
        f"N={n_keys} {convention}"
        for n_keys in SYMBOLIC_SIZES
        for convention in ALL_DROPPED_CONVENTIONS
        if not _equal_on_simplex(
            expected_row_sum(n_keys, all_dropped=convention), claimed_total(n_keys, convention), n_keys
        )
    ]
    log.debug("row-sum mismatches: %s", mismatches)
    expressions: dict[str, sp.Basic] = {
        "sum c_j p_j (N=2, zero)": equation(expected_row_sum(2), sp.factor(cancel_by_denominator(expected_row_sum(2)))),
        **{
            f"claimed ({convention})": claimed_total(sp.Symbol("N"), convention)
            for convention in ALL_DROPPED_CONVENTIONS
        },
    }
    if mismatches:
        return Derivation(
            KEY, title, statement, "refuted", False, expressions,
            "sum_j c_j p_j minus the claimed total does not cancel at " + "; ".join(mismatches),
        )
    details = (
        "sympy: cancel(sum_j c_j p_j - claimed) == 0 for symbolic p (sum p = 1) at N=2,3,4 and all three "
        "conventions (zero, uniform: for any p > 0); "
        "general N by argument: the kept weights of a nonempty mask sum to 1, the empty mask has probability r^N"
    )
    return Derivation(KEY, title, statement, "proved", True, expressions, details)
