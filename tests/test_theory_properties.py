"""Property tests of the smoothing theory over random attention rows (hypothesis).

Rows: N from 1 to 64 keys, ties, and rows with one dominant key. Log-weights are
drawn from [-span, 0] nats with span in {1, 5, 30}, and a dominant key sits
span + 5 nats above the rest, so the largest weight of a row is at most
e^35 ~ 1.6e15 times its smallest: weights span up to about 15 decades
(35 / ln 10 = 15.2; 13 decades without a dominant key).

Drop ratios: the whole open interval (0, 1) in double precision, from the
smallest subnormal 5e-324 to 1 - 2^-53 (hypothesis draws both ends). This is
sound because every method works in log space (r^N and (1 - r)^k as exp of
N log r and k log1p(-r), the integral's factors by logaddexp) and 1 - r is
exact for r >= 1/2; every tolerance below is relative to the size of the
quantities compared, which shrink like 1 - r near r = 1.

Numerical tolerance: the integral method's fixed-step trapezoid is within ~1e-14
relative of 30-digit references (theory/integral.py, benchmarks/results/
expected_attention_cpu.md); inequalities are asserted up to TOL = 1e-11 relative. Where a strict
inequality is asserted, it is through a *derived lower bound* on the gap, so "strict" means "by at
least that margin".
The Monte-Carlo test uses a fixed seed per example and 5 standard errors, the
standard error computed from the exact variance (so rare events such as "only
key j survives" are accounted for even when the sample misses them).
"""

from __future__ import annotations

import numpy as np
from hypothesis import example, given, settings
from hypothesis import strategies as st

from theory import (
    ALL_DROPPED_CONVENTIONS,
    AUTO_ENUMERATE_MAX_KEYS,
    ENUMERATE_MAX_KEYS,
    attention_variance,
    expected_attention,
    sampled_expected_attention,
    smoothing_coefficients,
)

TOL = 1e-11


@st.composite
def attention_rows(draw, min_keys: int = 1, max_keys: int = 64) -> np.ndarray:
    """A positive attention row: log-weights over many decades, with ties and a dominant key."""
    n_keys = draw(st.integers(min_keys, max_keys))
    span = draw(st.sampled_from([1.0, 5.0, 30.0]))  # natural-log range of the weights
    log_weights = draw(
        st.lists(st.floats(-span, 0.0, allow_nan=False), min_size=n_keys, max_size=n_keys)
    )
    log_weights = np.array(log_weights)
    if n_keys > 1 and draw(st.booleans()):  # ties: copy some weights onto others
        copies = draw(st.lists(st.integers(0, n_keys - 1), min_size=2, max_size=n_keys))
        log_weights[copies] = log_weights[copies[0]]
    if draw(st.booleans()):  # one dominant key
        log_weights[draw(st.integers(0, n_keys - 1))] = span + 5.0
    weights = np.exp(log_weights - log_weights.max())
    return weights / weights.sum()


#: The whole open interval (0, 1): hypothesis also draws 5e-324, subnormals and 1 - 2^-53.
drop_ratios = st.floats(0.0, 1.0, exclude_min=True, exclude_max=True)
conventions = st.sampled_from(ALL_DROPPED_CONVENTIONS)


def _pairs(p: np.ndarray):
    """Index arrays (s, t) over all ordered pairs with p_s > p_t, and tied pairs."""
    s, t = np.nonzero(p[:, None] > p[None, :])
    ties_s, ties_t = np.nonzero((p[:, None] == p[None, :]) & ~np.eye(p.size, dtype=bool))
    return (s, t), (ties_s, ties_t)


@given(attention_rows(), drop_ratios, conventions)
def test_coefficients_strictly_decrease_in_p(p, r, convention):
    """c_t - c_s >= r (1 - r) (p_s - p_t) for p_s > p_t (from the gap identity, since
    E[1/((p_s + R)(p_t + R))] >= 1), and c_s == c_t for tied weights."""
    c = smoothing_coefficients(p, r, all_dropped=convention)
    (s, t), (ties_s, ties_t) = _pairs(p)
    gap_bound = r * (1 - r) * (p[s] - p[t])
    assert np.all(c[t] - c[s] >= gap_bound - TOL * np.maximum(c[s], c[t]))
    np.testing.assert_allclose(c[ties_s], c[ties_t], rtol=TOL)


@given(attention_rows(), drop_ratios, conventions)
def test_order_is_preserved_and_ratios_are_compressed(p, r, convention):
    """For p_s > p_t, both strictly, by derived margins (reports/claims.py cites this test by name):

    order:  E[w_s] - E[w_t] >= (1 - r)^2 (p_s - p_t) > 0, because
            E[w_s] - E[w_t] = (1-r) [(1-r) E_R[(p_s - p_t)/(p_s + p_t + R)]
            + r E_R[R (p_s - p_t)/((p_s + R)(p_t + R))]] (+ r^N (p_s - p_t) when undropped)
            (theory.derivations.order): both terms >= 0 and p_s + p_t + R <= 1;
    ratios: E[w_t] p_s - E[w_s] p_t = p_s p_t (c_t - c_s) >= r (1 - r) p_s p_t (p_s - p_t) > 0,
            i.e. E[w_s]/E[w_t] < p_s/p_t, by the c-gap bound of the test above.

    Each bound is asserted up to rounding (TOL relative to the quantities compared);
    wherever the bound exceeds that slack, the strict inequality is asserted too."""
    expected = expected_attention(p, r, all_dropped=convention)
    (s, t), _ = _pairs(p)

    order_gap = expected[s] - expected[t]
    order_bound = (1 - r) ** 2 * (p[s] - p[t])
    order_slack = TOL * np.maximum(expected[s], expected[t])
    assert np.all(order_gap >= order_bound - order_slack)
    assert np.all(order_gap[order_bound > order_slack] > 0)

    ratio_margin = expected[t] * p[s] - expected[s] * p[t]
    ratio_bound = r * (1 - r) * p[s] * p[t] * (p[s] - p[t])
    ratio_slack = TOL * expected[t] * p[s]
    assert np.all(ratio_margin >= ratio_bound - ratio_slack)
    assert np.all(ratio_margin[ratio_bound > ratio_slack] > 0)


@given(attention_rows(), drop_ratios, conventions)
def test_normalised_expectation_is_majorised_by_p(p, r, convention):
    """q = E[w] / sum E[w] is majorised by p: sorted partial sums of q never exceed p's,
    hence max(q) <= max(p) and entropy(q) >= entropy(p)."""
    expected = expected_attention(p, r, all_dropped=convention)
    q = expected / expected.sum()
    partial_q = np.cumsum(np.sort(q)[::-1])
    partial_p = np.cumsum(np.sort(p)[::-1])
    assert np.all(partial_q <= partial_p + TOL)
    assert q.max() <= p.max() + TOL

    def entropy(x):
        x = x[x > 0]
        return -np.sum(x * np.log(x))

    assert entropy(q) >= entropy(p) - TOL * max(1.0, entropy(p))


@given(attention_rows(), drop_ratios)
def test_total_expected_weight(p, r):
    """sum_j E[w_j] = 1 - r^N (zero), and 1 (uniform, undropped): the row is a convex
    combination of masks whose all-dropped part carries total weight 0 or 1."""
    n = p.size
    zero = expected_attention(p, r, all_dropped="zero").sum()
    assert abs(zero - (-np.expm1(n * np.log(r)))) <= TOL
    for convention in ("uniform", "undropped"):
        total = expected_attention(p, r, all_dropped=convention).sum()
        assert abs(total - 1.0) <= TOL


@given(attention_rows(max_keys=12), drop_ratios, conventions)
def test_enumeration_equals_integral(p, r, convention):
    """The two exact methods agree to 1e-10 relative wherever both apply (N <= 12: many examples)."""
    enumerated = expected_attention(p, r, all_dropped=convention, method="enumerate")
    integral = expected_attention(p, r, all_dropped=convention, method="integral")
    np.testing.assert_allclose(integral, enumerated, rtol=1e-10, atol=0)
    np.testing.assert_allclose(
        smoothing_coefficients(p, r, all_dropped=convention, method="integral"),
        smoothing_coefficients(p, r, all_dropped=convention, method="enumerate"),
        rtol=1e-10,
    )


_LIMIT_ROW = np.exp(-np.linspace(0.0, 35.0, ENUMERATE_MAX_KEYS))  # 15 decades, N at the limit


@settings(max_examples=6)
@given(attention_rows(min_keys=13, max_keys=ENUMERATE_MAX_KEYS), drop_ratios, conventions)
@example(_LIMIT_ROW / _LIMIT_ROW.sum(), 0.3, "zero")
@example(np.full(ENUMERATE_MAX_KEYS, 1.0 / ENUMERATE_MAX_KEYS), 1 - 2**-53, "uniform")
def test_enumeration_equals_integral_up_to_the_enumeration_limit(p, r, convention):
    """The same agreement for 13 <= N <= ENUMERATE_MAX_KEYS (18): few examples, as one
    enumeration costs 2^N N; the explicit examples sit at N = 18. (smoothing_coefficients
    is E[w]/p for present keys, so comparing E[w] covers it.)"""
    assert AUTO_ENUMERATE_MAX_KEYS < 13 <= ENUMERATE_MAX_KEYS == 18
    enumerated = expected_attention(p, r, all_dropped=convention, method="enumerate")
    integral = expected_attention(p, r, all_dropped=convention, method="integral")
    np.testing.assert_allclose(integral, enumerated, rtol=1e-10, atol=0)


@settings(max_examples=25)
@given(attention_rows(), drop_ratios, conventions, st.integers(0, 2**32 - 1))
def test_monte_carlo_agrees_within_five_standard_errors(p, r, convention, seed):
    """Sampled means of 20,000 masks match the exact E[w] within 5 standard errors,
    SE = sqrt(Var_exact / n) (plus 1e-12 for keys whose weight never varies)."""
    n_samples = 20_000
    sampled = sampled_expected_attention(p, r, num_samples=n_samples, seed=seed, all_dropped=convention)
    exact = expected_attention(p, r, all_dropped=convention)
    standard_error = np.sqrt(attention_variance(p, r, all_dropped=convention) / n_samples)
    assert np.all(np.abs(sampled.mean - exact) <= 5 * standard_error + 1e-12)


def test_monte_carlo_check_can_fail():
    """The 5-SE check above rejects a wrong expectation: post-softmax dropout's E[w] = p."""
    p = np.array([0.7, 0.2, 0.1])
    r = 0.5
    sampled = sampled_expected_attention(p, r, num_samples=20_000, seed=1, all_dropped="zero")
    standard_error = np.sqrt(attention_variance(p, r, all_dropped="zero") / 20_000)
    assert np.any(np.abs(sampled.mean - p) > 5 * standard_error)
