"""The numeric theory API: input validation, shapes, edge cases with closed forms.

Closed forms used as independent references (derived by hand, see each test):
N = 1, N = 2, uniform rows, first order in r near 0 and in 1 - r near 1,
and the absent-key (p_j = 0) convention.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import theory
from theory import (
    ALL_DROPPED_CONVENTIONS,
    attention_variance,
    dropout_attention_variance,
    dropout_expected_attention,
    expected_attention,
    smoothing_coefficients,
)
from theory.conventions import DEFAULT, all_dropped_weights, renormalise_kept
from theory.seeding import generator, keyed_sequence, root_sequence

PUBLIC_ROW_FUNCTIONS = [expected_attention, smoothing_coefficients, attention_variance]
DROPOUT_FUNCTIONS = [dropout_expected_attention, dropout_attention_variance]
ROW = np.array([0.6, 0.3, 0.1])


# --- input validation ---------------------------------------------------------------


@pytest.mark.parametrize("function", PUBLIC_ROW_FUNCTIONS + DROPOUT_FUNCTIONS)
@pytest.mark.parametrize(
    ("p", "message"),
    [
        ([0.5, np.nan, 0.5], "finite"),
        ([0.5, np.inf, 0.5], "finite"),
        ([1.2, -0.2], "non-negative"),
        ([0.5, 0.4], "sum to 1"),
        ([[0.5, 0.5], [0.9, 0.2]], "row 1 sums"),
        ([[[0.5, 0.5]], [[0.5, 0.5]], [[0.9, 0.2]]], "row \\(2, 0\\) sums"),  # (..., N) batches name the index
        (np.float64(1.0), "1-D"),
        (np.zeros((0,)), "at least one"),
        (np.array([0.5 + 0j, 0.5]), "real numbers"),
        (["a", "b"], "real numbers"),
    ],
)
def test_invalid_rows_raise_naming_p(function, p, message):
    with pytest.raises(ValueError, match=message) as error:
        function(p, 0.1)
    assert str(error.value).startswith("p ") or "of p" in str(error.value)


@pytest.mark.parametrize("function", PUBLIC_ROW_FUNCTIONS + DROPOUT_FUNCTIONS)
@pytest.mark.parametrize("drop_ratio", [1.0, -0.1, 1.5, math.nan, math.inf, True, "0.1", None])
def test_invalid_drop_ratio_raises_with_range(function, drop_ratio):
    with pytest.raises(ValueError, match=r"drop_ratio .*\[0, 1\)"):
        function(ROW, drop_ratio)


@pytest.mark.parametrize("function", PUBLIC_ROW_FUNCTIONS)
def test_unknown_options_raise(function):
    with pytest.raises(ValueError, match=r"all_dropped must be one of \('zero', 'uniform'"):
        function(ROW, 0.1, all_dropped="nan")
    with pytest.raises(ValueError, match=r"method must be one of \('auto', 'enumerate'"):
        function(ROW, 0.1, method="simpson")


def test_enumeration_refuses_long_rows_with_the_limit_in_the_message():
    row = np.full(theory.ENUMERATE_MAX_KEYS + 1, 1 / (theory.ENUMERATE_MAX_KEYS + 1))
    with pytest.raises(ValueError, match=f"at most {theory.ENUMERATE_MAX_KEYS} keys"):
        expected_attention(row, 0.1, method="enumerate")


def test_rows_within_the_stated_tolerance_are_accepted():
    row = np.array([0.5, 0.5 + 0.9 * theory.ROW_SUM_TOLERANCE])
    assert np.all(np.isfinite(expected_attention(row, 0.2)))


# --- shapes and r = 0 -----------------------------------------------------------------


@pytest.mark.parametrize("function", PUBLIC_ROW_FUNCTIONS)
def test_batch_of_rows_equals_row_by_row(function):
    rng = np.random.default_rng(3)
    batch = rng.dirichlet(np.ones(14), size=5)
    stacked = function(batch, 0.3)
    assert stacked.shape == batch.shape
    for row, result in zip(batch, stacked, strict=True):
        np.testing.assert_allclose(function(row, 0.3), result, rtol=1e-13)


def test_drop_ratio_zero_returns_p_exactly():
    rng = np.random.default_rng(4)
    for n_keys in (1, 5, 40):
        row = rng.dirichlet(np.ones(n_keys))
        for convention in ALL_DROPPED_CONVENTIONS:
            result = expected_attention(row, 0.0, all_dropped=convention)
            assert np.array_equal(result, row) and result is not row
            assert np.array_equal(smoothing_coefficients(row, 0.0), np.ones(n_keys))
            assert np.array_equal(attention_variance(row, 0.0), np.zeros(n_keys))


def test_integer_and_list_input_are_accepted():
    np.testing.assert_array_equal(expected_attention([1], 0.5, all_dropped="zero"), [0.5])
    np.testing.assert_array_equal(expected_attention(np.array([1]), 0.5, all_dropped="zero"), [0.5])


# --- closed forms -----------------------------------------------------------------------


@pytest.mark.parametrize("method", ["enumerate", "integral"])
def test_single_key(method):
    # N = 1: the key is kept w.p. 1 - r (weight 1), else the row is all-dropped.
    for r in (1e-9, 0.3, 0.999):
        assert expected_attention([1.0], r, all_dropped="zero", method=method)[0] == pytest.approx(1 - r, rel=1e-13)
        for convention in ("uniform", "undropped"):
            value = expected_attention([1.0], r, all_dropped=convention, method=method)[0]
            assert value == pytest.approx(1.0, rel=1e-13)


@pytest.mark.parametrize("method", ["enumerate", "integral"])
def test_two_keys_closed_form(method):
    # N = 2: w_1 = 1 when only key 1 is kept, p_1 when both are: E = (1-r) r + (1-r)^2 p_1.
    p = np.array([0.8, 0.2])
    for r in (0.05, 0.5, 0.95):
        exact = (1 - r) * r + (1 - r) ** 2 * p
        np.testing.assert_allclose(expected_attention(p, r, all_dropped="zero", method=method), exact, rtol=1e-13)
        np.testing.assert_allclose(
            expected_attention(p, r, all_dropped="uniform", method=method), exact + r**2 / 2, rtol=1e-13
        )
        np.testing.assert_allclose(
            expected_attention(p, r, all_dropped="undropped", method=method), exact + r**2 * p, rtol=1e-13
        )


@pytest.mark.parametrize("n_keys", [3, 10, 197])
def test_uniform_row_is_uniform(n_keys):
    # By symmetry every key gets (1 - r^N) / N, and c = 1 - r^N.
    row = np.full(n_keys, 1 / n_keys)
    r = 0.4
    np.testing.assert_allclose(expected_attention(row, r, all_dropped="zero"), (1 - r**n_keys) / n_keys, rtol=1e-12)
    np.testing.assert_allclose(smoothing_coefficients(row, r, all_dropped="zero"), 1 - r**n_keys, rtol=1e-12)


@pytest.mark.parametrize("n_keys", [4, 30])
def test_first_order_in_small_drop_ratio(n_keys):
    # Only single-key drops matter to first order: dropping j gives w_j = 0, dropping
    # k != j gives p_j / (1 - p_k). So c_j = 1 - N r + r sum_{k != j} 1/(1 - p_k) + O(r^2).
    rng = np.random.default_rng(5)
    p = rng.dirichlet(np.ones(n_keys))
    r = 1e-7
    first_order = 1 - n_keys * r + r * (np.sum(1 / (1 - p)) - 1 / (1 - p))
    coefficients = smoothing_coefficients(p, r, all_dropped="zero")
    np.testing.assert_allclose(coefficients, first_order, rtol=0, atol=50 * (n_keys * r) ** 2)


@pytest.mark.parametrize("n_keys", [3, 25])
def test_first_order_in_keep_ratio_near_one(n_keys):
    # s = 1 - r -> 0: key j alone (prob s r^(N-1)) gives 1, j with one other k gives
    # p_j / (p_j + p_k): E[w_j] = s + s^2 (sum_{k != j} p_j / (p_j + p_k) - (N - 1)) + O(s^3).
    rng = np.random.default_rng(6)
    p = rng.dirichlet(np.ones(n_keys))
    s = 1e-5
    pair = p[:, None] / (p[:, None] + p[None, :])
    second = pair.sum(axis=1) - 0.5 - (n_keys - 1)
    np.testing.assert_allclose(
        expected_attention(p, 1 - s, all_dropped="zero"), s + s**2 * second, rtol=0, atol=10 * n_keys**3 * s**3
    )


# --- absent keys (p_j = 0) -----------------------------------------------------------


@pytest.mark.parametrize("method", ["enumerate", "integral"])
def test_absent_keys_get_no_weight_and_do_not_count(method):
    # [0.5, 0.5, 0, 0] behaves like [0.5, 0.5]; N' = 2 present keys.
    r = 0.5
    row = np.array([0.5, 0.5, 0.0, 0.0])
    zero = expected_attention(row, r, all_dropped="zero", method=method)
    np.testing.assert_allclose(zero, [0.375, 0.375, 0, 0], rtol=1e-13)
    uniform = expected_attention(row, r, all_dropped="uniform", method=method)
    np.testing.assert_allclose(uniform, [0.5, 0.5, 0, 0], rtol=1e-13)


def test_absent_key_coefficient_is_the_marginal_coefficient():
    # For p_j = 0, c_j := (1 - r) E[1/S ; S > 0]. Row [1, 0]: S = b_1, so c = (1 - r)^2.
    r = 0.3
    assert smoothing_coefficients([1.0, 0.0], r)[1] == pytest.approx((1 - r) ** 2, rel=1e-12)
    # It is the slope of E[w_j] as p_j grows from 0, after the jump (1 - r) r^(N'-1).
    rng = np.random.default_rng(7)
    others = rng.dirichlet(np.ones(6))
    eps = 1e-9
    tiny = np.concatenate([[eps], (1 - eps) * others])
    jump = (1 - r) * r**6
    slope = (expected_attention(tiny, r, all_dropped="zero")[0] - jump) / eps
    marginal = smoothing_coefficients(np.concatenate([[0.0], others]), r)[0]
    assert slope == pytest.approx(marginal, rel=1e-5)


def test_weight_of_a_vanishing_key_tends_to_the_alone_probability():
    r = 0.6
    others = np.array([0.7, 0.3])
    for eps in (1e-6, 1e-12, 1e-200):
        row = np.concatenate([[eps], (1 - eps) * others])
        assert expected_attention(row, r, all_dropped="zero")[0] == pytest.approx((1 - r) * r**2, rel=1e-5)


# --- post-softmax dropout -------------------------------------------------------------


def test_post_softmax_dropout_has_no_first_moment_smoothing():
    rng = np.random.default_rng(8)
    p = rng.dirichlet(np.ones(9))
    np.testing.assert_array_equal(dropout_expected_attention(p, 0.7), p)
    np.testing.assert_allclose(dropout_attention_variance(p, 0.7), 0.7 / 0.3 * p**2, rtol=1e-15)


@pytest.mark.parametrize("drop_ratio", [0.0, 1e-300, 0.5, np.float32(0.25), 1 - 1e-16])
def test_post_softmax_dropout_accepts_the_whole_drop_ratio_range(drop_ratio):
    """r in [0, 1) (numpy scalars too): E[w] = p; the variance r/(1-r) p^2 is 0 at r = 0."""
    p = np.array([0.6, 0.3, 0.1])
    np.testing.assert_array_equal(dropout_expected_attention(p, drop_ratio), p)
    r = float(drop_ratio)
    np.testing.assert_allclose(dropout_attention_variance(p, drop_ratio), r / (1 - r) * p**2, rtol=1e-15)
    assert np.all(dropout_attention_variance(p, 0.0) == 0.0)


@pytest.mark.parametrize("function", DROPOUT_FUNCTIONS)
def test_post_softmax_dropout_batch_of_rows(function):
    """A 2-D batch (one row per query) gives one output row per input row, as row by row; 1-D stays 1-D."""
    rng = np.random.default_rng(10)
    batch = rng.dirichlet(np.ones(7), size=4)
    stacked = function(batch, 0.4)
    assert stacked.shape == batch.shape and stacked.dtype == np.float64
    for row, result in zip(batch, stacked, strict=True):
        single = function(row, 0.4)
        assert single.shape == row.shape
        np.testing.assert_array_equal(single, result)
    if function is dropout_expected_attention:
        np.testing.assert_array_equal(stacked, batch)
        stacked[0, 0] = -1.0  # the result is a copy: the caller's rows are untouched
        assert batch[0, 0] > 0
    with pytest.raises(ValueError, match="row 2 sums"):
        function(np.vstack([batch[:2], [0.5, 0.6, 0, 0, 0, 0, 0]]), 0.4)


# --- variance ---------------------------------------------------------------------------


@pytest.mark.parametrize("convention", ALL_DROPPED_CONVENTIONS)
def test_variance_enumerate_equals_integral(convention):
    rng = np.random.default_rng(9)
    p = rng.dirichlet(np.ones(8) * 0.5)
    for r in (0.01, 0.3, 0.9):
        exact = attention_variance(p, r, all_dropped=convention, method="enumerate")
        np.testing.assert_allclose(
            attention_variance(p, r, all_dropped=convention, method="integral"), exact, rtol=1e-9, atol=1e-15
        )


def test_two_key_variance_closed_form():
    # w_1 in {1 (w.p. (1-r) r), p_1 (w.p. (1-r)^2), 0}: Var = E[w^2] - E[w]^2.
    p1, r = 0.7, 0.4
    second = (1 - r) * r + (1 - r) ** 2 * p1**2
    first = (1 - r) * r + (1 - r) ** 2 * p1
    assert attention_variance([p1, 1 - p1], r, all_dropped="zero")[0] == pytest.approx(second - first**2, rel=1e-12)


# --- the all-dropped default and the shared homes the theory uses -----------------------------


def test_default_convention_is_the_documented_one():
    """Every numeric function defaults to theory.conventions.DEFAULT ("uniform", docs/theory.md section 1).

    Two equal keys at r = 1/2: each is alone w.p. 1/4 (weight 1), both kept w.p. 1/4 (1/2), none
    w.p. 1/4, which "uniform" turns into 1/2 each and "zero" into 0: E[w] = 1/2 and 3/8.
    """
    assert DEFAULT == "uniform"
    row = [0.5, 0.5]
    np.testing.assert_allclose(expected_attention(row, 0.5), [0.5, 0.5], rtol=1e-14)
    np.testing.assert_allclose(expected_attention(row, 0.5, all_dropped="zero"), [0.375, 0.375], rtol=1e-14)
    np.testing.assert_allclose(smoothing_coefficients(row, 0.5), [1.0, 1.0], rtol=1e-14)
    # Var: w in {1, 0 (one key alone), 1/2 (both), 1/2 (none, uniform)}: E[w^2] = 1/4 + 1/16 + 1/16, E[w] = 1/2.
    np.testing.assert_allclose(attention_variance(row, 0.5), [0.125, 0.125], rtol=1e-13)
    sampled = theory.sampled_expected_attention([0.2, 0.8], 0.9, num_samples=4000, seed=0)
    uniform = theory.sampled_expected_attention([0.2, 0.8], 0.9, num_samples=4000, seed=0, all_dropped="uniform")
    assert np.array_equal(sampled.mean, uniform.mean)
    zero = theory.sampled_expected_attention([0.2, 0.8], 0.9, num_samples=4000, seed=0, all_dropped="zero")
    assert np.all(sampled.mean > zero.mean)  # same masks: the all-dropped ones (81%) add 1/2 each


def test_conventions_spread_uniform_weight_over_present_keys_only():
    p = np.array([[0.5, 0.0, 0.5, 0.0], [0.25, 0.25, 0.25, 0.25]])
    np.testing.assert_array_equal(all_dropped_weights(p, "uniform"), np.full((2, 4), 0.25))
    np.testing.assert_array_equal(all_dropped_weights(p, "uniform", present=p > 0), [[0.5, 0, 0.5, 0], [0.25] * 4])
    keep = np.zeros((3, 4), dtype=bool)
    keep[0, 0] = True
    weights = renormalise_kept(p[0], keep, "uniform", present=p[0] > 0)
    np.testing.assert_array_equal(weights, [[1, 0, 0, 0], [0.5, 0, 0.5, 0], [0.5, 0, 0.5, 0]])
    np.testing.assert_array_equal(renormalise_kept(p[0], keep, "uniform")[1], [0.25] * 4)


def test_seed_streams_match_numpy_and_do_not_depend_on_other_keys():
    assert np.array_equal(generator(root_sequence(7)).random(4), np.random.default_rng(7).random(4))
    sequence = np.random.SeedSequence(3)
    assert root_sequence(sequence) is sequence
    first = generator(keyed_sequence(0, "order-preservation")).random(3)
    assert np.array_equal(first, generator(keyed_sequence(0, "order-preservation")).random(3))
    assert not np.array_equal(first, generator(keyed_sequence(0, "majorisation")).random(3))
    assert not np.array_equal(first, generator(keyed_sequence(1, "order-preservation")).random(3))
    with pytest.raises(ValueError, match="seed must be an integer"):
        root_sequence(-1)
    with pytest.raises(ValueError, match="seed must be an integer"):
        keyed_sequence(1.5, "key")
