"""Tests of the symbolic derivations (theory.derivations) and the numeric summary.

Each derivation must hold with the status it claims, and each checker must be
able to fail: feeding it a deliberately wrong formula must give holds=False.
verify_all() runs once per module (~10 s); the N = 4 symbolic variants are `slow`.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import sympy as sp

import theory.derivations as derivations
from theory.derivations import Derivation, verify_all
from theory.derivations.common import DROP_RATIO, INTEGRATION_VARIABLE, key_weights
from theory.derivations.dropout import check_dropout_moments
from theory.derivations.expected_output import (
    check_expected_output,
    integral_form_integrand,
    smoothing_coefficient_closed_form,
)
from theory.derivations.lagrangian import (
    beta,
    check_gradient_difference,
    check_lagrangian_gradients,
    j,
    mu,
    notes_gradient_difference,
    notes_gradients,
    p,
    s,
    t,
)
from theory.derivations.order import check_order_preservation
from theory.derivations.row_sum import check_row_sum
from theory.derivations.smoothing_gap import check_smoothing_gap
from theory.summary import numeric_summary
from theory.smoothing import expected_attention

EXPECTED_KEYS = [key for key, _ in derivations.CHECKS]


@pytest.fixture(scope="module")
def results() -> dict[str, Derivation]:
    return {result.key: result for result in verify_all(seed=0)}


def test_verify_all_covers_every_check_once(results: dict[str, Derivation]) -> None:
    assert list(results) == EXPECTED_KEYS
    assert len(set(EXPECTED_KEYS)) == len(EXPECTED_KEYS)


@pytest.mark.parametrize("key", EXPECTED_KEYS)
def test_derivation_holds(results: dict[str, Derivation], key: str) -> None:
    result = results[key]
    assert result.holds, f"{key}: {result.status}: {result.details}"
    assert result.status in ("proved", "checked")
    assert result.title and result.statement and result.details
    assert "\n" not in result.details  # one line, as the CLI prints it


@pytest.mark.parametrize("key", EXPECTED_KEYS)
def test_expressions_are_sympy_objects(results: dict[str, Derivation], key: str) -> None:
    expressions = results[key].expressions
    assert expressions
    for name, expression in expressions.items():
        assert isinstance(expression, sp.Basic), name


def test_gradient_difference_reports_the_missing_multipliers(results: dict[str, Derivation]) -> None:
    """(11) as printed omits mu_t - mu_s from (7); the check must say so and hold only for mu_s = mu_t."""
    result = results["gradient-difference"]
    assert sp.simplify(result.expressions["derived - printed"] - (mu[t] - mu[s])) == 0
    assert "DISCREPANCY" in result.details and "mu_s = mu_t" in result.details


def test_derivation_rejects_inconsistent_status() -> None:
    with pytest.raises(ValueError, match="cannot hold"):
        Derivation("k", "t", "s", "refuted", True)
    with pytest.raises(ValueError, match="status"):
        Derivation("k", "t", "s", "maybe", False)


def test_a_check_that_raises_is_reported_as_failed(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*, seed: int = 0) -> Derivation:
        raise RuntimeError("boom")

    monkeypatch.setattr(derivations, "CHECKS", (("broken", broken),))
    (result,) = verify_all(seed=0)
    assert (result.key, result.status, result.holds) == ("broken", "failed", False)
    assert "boom" in result.details


# --- every checker can fail: wrong claims are refuted -------------------------------------------


def test_wrong_integral_form_is_refuted() -> None:
    """Dropping the (1 - r) factor of the integral form must be caught."""

    def without_keep_factor(n_keys: int, key: int) -> sp.Integral:
        integrand = integral_form_integrand(n_keys, key) / (1 - DROP_RATIO)
        return sp.Integral(integrand, (INTEGRATION_VARIABLE, 0, sp.oo))

    result = check_expected_output(integral_form=without_keep_factor, symbolic_sizes=(2,))
    assert (result.status, result.holds) == ("refuted", False)


def test_wrong_row_sum_is_refuted() -> None:
    result = check_row_sum(claimed_total=lambda n_keys, convention: sp.Integer(1))  # wrong for "zero"
    assert (result.status, result.holds) == ("refuted", False)
    assert "zero" in result.details and "uniform" not in result.details


def test_wrong_gap_prefactor_is_refuted() -> None:
    result = check_smoothing_gap(claimed_prefactor=1 - DROP_RATIO)
    assert (result.status, result.holds) == ("refuted", False)


def test_wrong_dropout_variance_is_refuted() -> None:
    result = check_dropout_moments(claimed_variance=DROP_RATIO * sp.Symbol("p_j", positive=True) ** 2)
    assert (result.status, result.holds) == ("refuted", False)


def test_wrong_beta_gradient_is_refuted() -> None:
    def without_weight() -> dict[str, sp.Expr]:
        printed = notes_gradients()
        printed["dL/dbeta_j"] = printed["dL/dbeta_j"] / p[j]  # (10) without its p_j factor
        return printed

    result = check_lagrangian_gradients(printed=without_weight)
    assert (result.status, result.holds) == ("refuted", False)
    assert "dL/dbeta_j" in result.details


def test_wrong_gradient_difference_is_refuted() -> None:
    result = check_gradient_difference(printed=lambda: notes_gradient_difference() + 2 * (beta[s] - beta[t]))
    assert (result.status, result.holds) == ("refuted", False)


# --- spot checks of the derived objects ----------------------------------------------------------


def test_closed_form_matches_numeric_api_at_n3() -> None:
    weights = key_weights(3)
    expected = [smoothing_coefficient_closed_form(3, key) * weights[key] for key in range(3)]
    evaluate = sp.lambdify([weights, DROP_RATIO], expected, "numpy")
    row = np.array([0.6, 0.3, 0.1])
    np.testing.assert_allclose(evaluate(row, 0.4), expected_attention(row, 0.4), rtol=1e-14)


def test_checks_hold_for_another_seed() -> None:
    assert check_order_preservation(seed=7).holds
    assert check_smoothing_gap(seed=7).holds


def test_numeric_summary_is_fast_and_complete() -> None:
    started = time.perf_counter()
    lines = numeric_summary(seed=0)
    assert time.perf_counter() - started < 1.0
    assert len(lines) == 3
    assert "r=0.1" in lines[1] and "r=0.3" in lines[2]
    assert all("max q" in line and "entropy q" in line and "ms" in line for line in lines[1:])


# --- the larger symbolic sizes (seconds each) -----------------------------------------------------


@pytest.mark.slow
def test_expected_output_at_n4() -> None:
    assert check_expected_output(symbolic_sizes=(4,)).holds


@pytest.mark.slow
def test_smoothing_gap_and_order_at_n4() -> None:
    assert check_smoothing_gap(symbolic_sizes=(4,)).holds
    assert check_order_preservation(symbolic_sizes=(4,)).holds
