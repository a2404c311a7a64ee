"""Issue 15, theory layer: every valid extreme input gets a finite, correct answer; every bad one a
ValueError naming the argument.

The reference is :func:`theory.reference.mpmath_enumerated_moments`: all 2^N masks of a short row in
mpmath at 40+ significant digits and an unbounded exponent range, sharing no code with the methods
under test. Tolerances: the integral method's documented error is below 1e-13 relative on every
coefficient (docs/theory_numerics.md), so E[w] and c are held to 1e-12; variances, assembled from
two moments of that accuracy, to 1e-11. Values below 1e-300 are compared in absolute terms at
1e-312: a subnormal result carries only the absolute rounding of the subnormal terms it sums
(spacing 5e-324 each), never a relative accuracy.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import theory
from theory import attention_variance, expected_attention, smoothing_coefficients
from theory.checks import check_drop_ratio, check_int, check_real
from theory.reference import mpmath_enumerated_moments
from theory.rows import softmax_gaussian_rows

CONVENTIONS = ("zero", "uniform", "undropped")
METHODS = ("enumerate", "integral")
EXTREME_RATIOS = (1e-300, 1e-12, 1e-3, 0.3, 1 - 1e-12)
#: Short rows at the edges: subnormal and tiny weights, absent keys, one key, a weight near 1.
EXTREME_ROWS = (
    [1e-200, 0.3, 0.7],
    [1.0],
    [0.2, 0.3, 0.5, 0.0],
    [1e-310, 0.4, 0.6],
    [5e-324, 1.0],
    [1e-20, 1e-10, 1 - 1e-10],
    [5e-324, 0.0, 0.5, 0.5],
    [1e-300, 1e-305, 1e-310, 1e-320, 1.0],
    [0.0, 1e-318, 1.0],
)
FLOOR = 1e-300
ABSOLUTE = 1e-312


def assert_close(found: np.ndarray, expected: list[float], rtol: float, what: str) -> None:
    found, expected = np.asarray(found, dtype=float), np.asarray(expected, dtype=float)
    assert np.all(np.isfinite(found)), f"{what}: not finite: {found}"
    small = np.abs(expected) < FLOOR
    np.testing.assert_allclose(found[~small], expected[~small], rtol=rtol, atol=0, err_msg=what)
    np.testing.assert_allclose(found[small], expected[small], rtol=0, atol=ABSOLUTE, err_msg=what)


def no_warnings(function, *args, **kwargs):
    """Call ``function`` with warnings turned into errors (no 'only a warning'): numpy's default
    error state warns on overflow, invalid values and division by zero; underflow is legitimate."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return function(*args, **kwargs)


@pytest.mark.parametrize("r", EXTREME_RATIOS)
@pytest.mark.parametrize("row", EXTREME_ROWS, ids=lambda row: f"N{len(row)}-min{min(x for x in row if x > 0):.0e}")
def test_extreme_rows_and_ratios_match_mpmath_enumeration(row, r):
    """E[w], Var[w] and c at r from 1e-300 to 1 - 1e-12 with weights down to 5e-324, every convention
    and method, against mpmath; a coefficient beyond float64's range is a ValueError naming p.
    Before issue 15: Var was 0 or O(1)-relative wrong at small r ([1e-200, 0.3, 0.7] at 1e-300 gave 0),
    1e-5-relative wrong at r = 1 - 1e-12, and c was inf where it is finite (([0, 1e-318, 1], 1e-12))."""
    for convention in CONVENTIONS:
        reference = mpmath_enumerated_moments(row, r, convention)
        for method in METHODS:
            what = f"{convention}, {method}"
            options = {"all_dropped": convention, "method": method}
            assert_close(no_warnings(expected_attention, row, r, **options), reference.means, 1e-12, f"E {what}")
            assert_close(no_warnings(attention_variance, row, r, **options), reference.variances, 1e-11,
                         f"Var {what}")
            if np.all(np.isfinite(reference.coefficients)):
                assert_close(no_warnings(smoothing_coefficients, row, r, **options), reference.coefficients, 1e-12,
                             f"c {what}")
            else:
                with pytest.raises(ValueError, match="^p: the smoothing coefficient of key"):
                    no_warnings(smoothing_coefficients, row, r, **options)


def test_item6_subnormal_coefficient_beyond_float64_is_a_value_error():
    """Issue 15 item 6: smoothing_coefficients([1.0, 1e-310], 0.3) returned [0.7, inf] with a warning.
    The exact c_1 = (1 - r) r / p_1 + r^2 / (2 p_1) = 2.55e309 exceeds float64: ValueError naming p."""
    reference = mpmath_enumerated_moments([1.0, 1e-310], 0.3, "uniform")
    assert reference.coefficients[1] == np.inf  # the exact value is beyond float64, not a rounding artefact
    with pytest.raises(ValueError, match=r"^p: the smoothing coefficient of key 1 \(weight 1e-310"):
        no_warnings(smoothing_coefficients, [1.0, 1e-310], 0.3)
    # E[w] itself stays finite and exact
    assert_close(no_warnings(expected_attention, [1.0, 1e-310], 0.3), reference.means, 1e-12, "E")


@pytest.mark.parametrize("tiny", [1e-300, 1e-310, 1e-318, 5e-324])
def test_item6_tiny_weight_coefficients_scale_exactly_as_one_over_p(tiny):
    """A long row (integral method) plus one tiny key, zero convention: c_tiny = (1 - r) E[1/(p + S)] is
    r^m (1 - r) / p plus a part that tends to a finite limit, so p c_tiny must equal
    (1 - r) r^m + p (1 - r) E[1/S'] to float64 accuracy for every tiny p; between two tiny p of the
    same row it changes by far less than 1e-12 relative. Before: inf or warnings below ~1e-308."""
    base = softmax_gaussian_rows(np.random.default_rng(3), 1, 30, logit_std=0.5)[0]
    r = 0.2
    row = np.concatenate([base * (1 - tiny), [tiny]])
    c = no_warnings(smoothing_coefficients, row, r, all_dropped="zero", method="integral")
    assert np.all(np.isfinite(c))
    alone = (1 - r) * r ** base.size  # the key alone is kept: weight 1
    # p c - (1 - r) r^m = p (1 - r) E[1/S ; S > 0] <= p (1 - r) / min(base): below 1e-280 here
    assert abs(row[-1] * c[-1] - alone) <= 1e-12 * alone
    np.testing.assert_allclose(c[:-1], no_warnings(smoothing_coefficients, base, r, all_dropped="zero"),
                               rtol=1e-12)


def test_item9_variance_at_drop_ratio_1e300_is_finite_and_exact():
    """Issue 15 item 9: attention_variance([1e-200, 0.3, 0.7], 1e-300) raised RuntimeError (then 0: the
    variance, O(r), cancels in E[w^2] - E[w]^2). It is about 5.8e-301 for the two large keys."""
    reference = mpmath_enumerated_moments([1e-200, 0.3, 0.7], 1e-300, "uniform")
    for method in METHODS:
        found = no_warnings(attention_variance, [1e-200, 0.3, 0.7], 1e-300, method=method)
        assert found[1] > 0 and found[2] > 0
        np.testing.assert_allclose(found[1:], reference.variances[1:], rtol=1e-11)


@pytest.mark.parametrize("function", [expected_attention, attention_variance, smoothing_coefficients])
def test_item9_integral_method_takes_weights_down_to_the_smallest_subnormal(function):
    """Issue 15 item 9: rows with a weight below ~4e-306 raised OverflowError in the integral method.
    A 40-key row whose weights run from 1e-300 to 5e-324 (plus an absent key): finite, no warnings, and
    sum_j E[w_j] = 1 (uniform convention: every mask's weights sum to 1; exact identity) / sum_j c_j p_j = 1."""
    rng = np.random.default_rng(5)
    tiny = np.concatenate([[5e-324, 1e-320, 1e-310, 4e-306], 10.0 ** rng.uniform(-323, -300, 20)])
    large = softmax_gaussian_rows(rng, 1, 15)[0] * (1 - tiny.sum())
    row = np.concatenate([large, tiny, [0.0]])
    for r in (1e-300, 1e-3, 0.3, 1 - 1e-12):
        if function is smoothing_coefficients and r > 0.5:  # c of the 5e-324 key ~ (1 - r) r^38 / 5e-324 = 2e311
            with pytest.raises(ValueError, match="^p: the smoothing coefficient of key 15 "):
                no_warnings(function, row, r, method="integral")
            continue
        found = no_warnings(function, row, r, method="integral")
        assert np.all(np.isfinite(found)) and np.all(found >= 0)
        if function is expected_attention:
            assert found.sum() == pytest.approx(1.0, abs=1e-13)
        elif function is smoothing_coefficients:
            assert (found * row).sum() == pytest.approx(1.0, abs=1e-13)


def test_item9_huge_integer_drop_ratio_is_a_value_error_naming_drop_ratio():
    """Issue 15 item 9: drop_ratio=10**400 raised OverflowError (float(10**400))."""
    for function in (expected_attention, attention_variance, smoothing_coefficients,
                     theory.dropout_expected_attention, theory.dropout_attention_variance):
        for value in (10**400, -(10**400)):
            with pytest.raises(ValueError, match=r"^drop_ratio must be a real number in \[0, 1\)"):
                function([0.5, 0.5], value)
    with pytest.raises(ValueError, match="^drop_ratio must be"):
        theory.sampled_expected_attention([0.5, 0.5], 10**400, num_samples=10, seed=0)
    with pytest.raises(ValueError, match="^x must be a real number"):
        check_real(10**400, "x", 0.0, None)
    with pytest.raises(ValueError, match="^rate must be"):
        check_drop_ratio(10**400, "rate")
    with pytest.raises(ValueError, match=r"^n must be an integer in \[0, 10\], got 1000"):
        check_int(10**400, "n", 0, 10)


def test_rows_summing_to_inf_are_a_value_error_without_warnings():
    """[1e308, 1e308] sums to inf: a ValueError naming p, not an overflow warning first."""
    with pytest.raises(ValueError, match="^each row of p must sum to 1"):
        no_warnings(expected_attention, [1e308, 1e308], 0.3)


@pytest.mark.parametrize("r", [0.0099, 0.0101, 0.9899, 0.9901])
def test_variance_paths_agree_at_their_boundaries(r):
    """The cancellation-free variance (r < 0.01 or r > 0.99) and the ordinary one meet continuously:
    a ViT-like row just inside and outside each boundary agrees with the enumeration reference."""
    row = softmax_gaussian_rows(np.random.default_rng(11), 1, 8)[0]
    reference = mpmath_enumerated_moments(row, r, "uniform")
    for method in METHODS:
        np.testing.assert_allclose(attention_variance(row, r, method=method), reference.variances, rtol=1e-11)
