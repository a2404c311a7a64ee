"""Tests of the symbolic derivations (theory.derivations) and the numeric summary.

Each derivation must hold with the status it claims, and each checker must be
able to fail: feeding it a deliberately wrong formula must give holds=False.
verify_all() runs once per module (~10 s); the N = 4 symbolic variants are `slow`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import sympy as sp

import theory
import theory.derivations as derivations
from theory.derivations import Derivation, verify_all
from theory.derivations.common import (
    DROP_RATIO,
    INTEGRATION_VARIABLE,
    keep_masks,
    kept_sum,
    key_weights,
    mask_probability,
)
from theory.derivations.dropkey_gradient import TARGET_NORM, check_dropkey_gradient
from theory.derivations.dropkey_gradient import finite_difference_errors as dropkey_finite_difference_errors
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
    lagrangian_gradients,
    mu,
    p,
    printed_gradient_difference,
    printed_gradients,
    s,
    t,
)
from theory.derivations.lagrangian import finite_difference_errors as lagrangian_finite_difference_errors
from theory.derivations.majorisation import check_majorisation, claimed_partial_sum_gap
from theory.derivations.order import check_order_preservation, check_ratio_compression, pair_difference
from theory.derivations.row_sum import check_row_sum
from theory.derivations.smoothing_gap import check_smoothing_gap
from theory.smoothing import expected_attention
from theory.summary import numeric_summary

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


THEORY_DOC = Path(__file__).resolve().parents[1] / "docs" / "theory.md"
THEORY_SECTIONS = (
    "## 1. DropKey attention and all-dropped rows",
    "## 2. Expected output and smoothing coefficients (Eqs. 3-4)",
    "## 3. The gradient argument (Eqs. 5-11)",
    "## 4. Schedules, train/test alignment and structured masks",
    "## 5. Attention collapse (DeepViT)",
)


def test_theory_document_has_its_cited_sections_and_names_every_derivation() -> None:
    """docs/theory.md is what code and report cite ("docs/theory.md section N"): its numbered sections
    exist in order, and every derivation key of theory.derivations.CHECKS is stated there."""
    text = THEORY_DOC.read_text(encoding="utf-8")
    headings = [line for line in text.splitlines() if line.startswith("## ")]
    assert tuple(headings) == THEORY_SECTIONS
    missing = [key for key in EXPECTED_KEYS if f"`{key}`" not in text]
    assert not missing, f"derivations not described in docs/theory.md: {missing}"


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
        printed = printed_gradients()
        printed["dL/dbeta_j"] = printed["dL/dbeta_j"] / p[j]  # (10) without its p_j factor
        return printed

    result = check_lagrangian_gradients(printed=without_weight)
    assert (result.status, result.holds) == ("refuted", False)
    assert "dL/dbeta_j" in result.details


def test_wrong_gradient_difference_is_refuted() -> None:
    result = check_gradient_difference(printed=lambda: printed_gradient_difference() + 2 * (beta[s] - beta[t]))
    assert (result.status, result.holds) == ("refuted", False)


def _sharpened(rows: np.ndarray, drop_ratio: float, **options: object) -> np.ndarray:
    """A wrong 'expected attention' that sharpens p (p^2, renormalised): ratios grow, q majorises p."""
    del drop_ratio, options
    squared = np.asarray(rows) ** 2
    return squared / squared.sum(axis=-1, keepdims=True)


def test_wrong_order_decomposition_is_refuted() -> None:
    """Forgetting the masks that drop the other key of the pair (the r E_R[d_0] term) must be caught."""

    def without_dropped_term(n_keys: int, *, all_dropped: str) -> sp.Expr:
        assert all_dropped in theory.ALL_DROPPED_CONVENTIONS
        weights = key_weights(n_keys)
        others = weights[2:]
        total = sp.Integer(0)
        for mask in keep_masks(len(others)):
            kept = pair_difference(1, kept_sum(mask, others))
            total += mask_probability(mask) * (1 - DROP_RATIO) * kept.subs(
                {sp.Symbol("p_s", positive=True): weights[0], sp.Symbol("p_t", positive=True): weights[1]},
                simultaneous=True,
            )
        return (1 - DROP_RATIO) * total

    result = check_order_preservation(decomposition=without_dropped_term)
    assert (result.status, result.holds) == ("refuted", False)
    assert "claimed decomposition" in result.details and "N=3 zero" in result.details
    assert "numeric" not in result.details  # the numeric API is right: only the claimed identity is wrong


def test_order_check_refutes_a_reversed_expectation() -> None:
    """An 'expected attention' that reverses the order of p gives numeric violations."""
    def reversed_expectation(rows: np.ndarray, r: float, **options: object) -> np.ndarray:
        return 1.0 - theory.expected_attention(rows, r, **options)

    result = check_order_preservation(symbolic_sizes=(), expected_attention=reversed_expectation)
    assert (result.status, result.holds) == ("refuted", False)
    assert "numeric order violations" in result.details and "decomposition" not in result.details


def test_wrong_ratio_bound_is_refuted() -> None:
    """Claiming more compression than DropKey gives (E[w_s]/E[w_t] <= sqrt(p_s/p_t)) must be caught."""
    result = check_ratio_compression(bound=lambda larger, smaller: (larger / smaller) ** 0.5)
    assert (result.status, result.holds) == ("refuted", False)
    assert "counter-examples" in result.details


def test_ratio_check_refutes_an_expectation_that_expands_ratios() -> None:
    result = check_ratio_compression(expected_attention=_sharpened)
    assert (result.status, result.holds) == ("refuted", False)


def test_wrong_partial_sum_gap_is_refuted() -> None:
    """The gap with the wrong sign (which would make q majorise p: sharpening) must be caught."""
    result = check_majorisation(claimed_gap=lambda n_keys, k: -claimed_partial_sum_gap(n_keys, k))
    assert (result.status, result.holds) == ("refuted", False)
    assert "N=2 k=1" in result.details and "numeric" not in result.details


def test_majorisation_check_refutes_a_sharpening_expectation() -> None:
    result = check_majorisation(expected_attention=_sharpened)
    assert (result.status, result.holds) == ("refuted", False)
    assert "numeric counter-examples" in result.details and "partial-sum gap" not in result.details
    assert "'max': 0" not in result.details and "'entropy': 0" not in result.details


def test_undamped_beta_gradient_is_refuted() -> None:
    """Claiming DropKey leaves (10) unchanged, E[dL/dbeta_j] ~ p_j (sum p beta - M), must be caught."""

    def undamped(n_keys: int, key: int) -> sp.Expr:
        weights = key_weights(n_keys)
        betas = sp.symbols(f"beta1:{n_keys + 1}", real=True)
        return weights[key] * (sp.Add(*[w * b for w, b in zip(weights, betas, strict=True)]) - TARGET_NORM)

    result = check_dropkey_gradient(first_order_gradient=undamped)
    assert (result.status, result.holds) == ("refuted", False)
    assert "from the claimed form for [1, 2, 3]" in result.details


def test_gradient_check_compares_finite_differences_with_the_expectation() -> None:
    """With post-softmax dropout's E[w] = p in place of DropKey's, the finite-difference cross-check fails."""
    result = check_dropkey_gradient(expected_attention=lambda weights, r, **options: np.asarray(weights))
    assert (result.status, result.holds) == ("refuted", False)
    assert "finite-difference slope" in result.details


def test_gradient_slope_check_catches_a_small_error_in_the_expectation() -> None:
    """The slope is exact up to rounding: E[w] off by one part in 1e9 (far below any statistical check) fails."""
    _, ratio = dropkey_finite_difference_errors(0)
    assert ratio < 1
    _, ratio = dropkey_finite_difference_errors(
        0, lambda weights, r, **options: theory.expected_attention(weights, r, **options) * (1 + 1e-9)
    )
    assert ratio > 1


def test_lagrangian_numeric_check_fails_on_a_wrong_gradient() -> None:
    """The central differences are independent of sympy: a derived (10) without its p_j factor, printed the same
    way (so the symbolic comparison agrees), must fail the numeric cross-check."""

    def without_weight() -> dict[str, sp.Expr]:
        gradients = lagrangian_gradients()
        gradients["dL/dbeta_j"] = gradients["dL/dbeta_j"] / p[j]
        return gradients

    errors, tolerance = lagrangian_finite_difference_errors(lagrangian_gradients(), seed=0)
    assert max(errors.values()) < tolerance < 1e-11  # exact up to rounding
    result = check_lagrangian_gradients(printed=without_weight, derive=without_weight)
    assert (result.status, result.holds) == ("failed", False)
    assert "central-difference errors" in result.details
    errors, tolerance = lagrangian_finite_difference_errors(without_weight(), seed=0)
    assert errors["dL/dbeta_j"] > 1e6 * tolerance and errors["dL/dp_j"] < tolerance


# --- spot checks of the derived objects ----------------------------------------------------------


def test_closed_form_matches_numeric_api_at_n3() -> None:
    weights = key_weights(3)
    expected = [smoothing_coefficient_closed_form(3, key) * weights[key] for key in range(3)]
    evaluate = sp.lambdify([weights, DROP_RATIO], expected, "numpy")
    row = np.array([0.6, 0.3, 0.1])
    np.testing.assert_allclose(evaluate(row, 0.4), expected_attention(row, 0.4, all_dropped="zero"), rtol=1e-14)


def test_checks_hold_for_another_seed() -> None:
    assert check_order_preservation(seed=7).holds
    assert check_smoothing_gap(seed=7).holds


def test_numeric_summary_is_complete() -> None:
    lines = numeric_summary(seed=0)
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
