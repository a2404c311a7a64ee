"""The pre-registered decision rule (reports.statistics.paired_decision) against scipy and statsmodels."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from scipy import stats
from statsmodels.stats.power import TTestPower
from statsmodels.stats.weightstats import DescrStatsW

from reports.statistics import DIRECTIONS, OUTCOMES, POWER, combine, outcome_of, paired_decision, seeds_for

FIXED = np.array([0.41, -0.12, 0.93, 0.27, 0.65, -0.05, 0.38])  # fixed data: mean 0.353, sd 0.373


@pytest.mark.parametrize("alpha", [0.01, 0.05, 0.1])
def test_interval_is_scipys_one_sample_t_interval(alpha):
    decision = paired_decision(FIXED, direction="up", smallest_effect=0.5, alpha=alpha)
    expected = stats.ttest_1samp(FIXED, 0.0).confidence_interval(confidence_level=1 - alpha)
    assert decision.ci_low == pytest.approx(expected.low, rel=1e-12)
    assert decision.ci_high == pytest.approx(expected.high, rel=1e-12)
    assert decision.mean == pytest.approx(FIXED.mean(), rel=1e-15)
    assert decision.sd == pytest.approx(FIXED.std(ddof=1), rel=1e-15)
    assert decision.n == FIXED.size


@pytest.mark.parametrize("margin", [0.3, 0.6, 0.8, 1.2])
def test_negligible_is_statsmodels_tost_at_half_alpha(margin):
    alpha = 0.05
    decision = paired_decision(FIXED, direction="up", smallest_effect=margin, alpha=alpha)
    p_value = DescrStatsW(FIXED).ttost_mean(-margin, margin)[0]
    assert decision.negligible == (p_value < alpha / 2)


def test_power_figures_are_statsmodels_one_sample_power():
    decision = paired_decision(FIXED, direction="up", smallest_effect=0.5)
    power = TTestPower()
    # the detectable effect is detected with 80% power at this n ...
    d = decision.detectable_effect / decision.sd
    assert power.power(effect_size=d, nobs=FIXED.size, alpha=0.05) == pytest.approx(POWER, abs=1e-6)
    # ... and seeds_needed is the smallest n reaching 80% power for the smallest effect
    d_e = 0.5 / decision.sd
    n = decision.seeds_needed
    assert power.power(effect_size=d_e, nobs=n, alpha=0.05) >= POWER
    assert n == 2 or power.power(effect_size=d_e, nobs=n - 1, alpha=0.05) < POWER


def test_issue_example_three_seeds_cannot_decide_half_a_point():
    """n = 3, paired SD 0.8 pp, smallest effect 0.5 pp: about 21-23 seeds are needed; a null mean is inconclusive."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=3)
    x = (x - x.mean()) / x.std(ddof=1) * 0.8  # mean 0, SD 0.8 exactly
    decision = paired_decision(x, direction="up", smallest_effect=0.5)
    assert decision.outcome == "inconclusive"
    assert 20 <= decision.seeds_needed <= 25
    assert decision.detectable_effect > 0.5


@pytest.mark.parametrize("values", [[], [1.0], [np.nan, 2.0], [np.nan, np.nan, np.nan]])
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_fewer_than_two_finite_differences_are_not_measured(values, direction):
    decision = paired_decision(values, direction=direction, smallest_effect=0.5)
    assert decision.outcome == "not yet measured"
    assert math.isnan(decision.mean) and math.isnan(decision.ci_low) and decision.seeds_needed is None
    assert not decision.negligible


def test_nan_differences_are_left_out_and_counted():
    decision = paired_decision([1.0, np.nan, 1.2, 0.9], direction="up", smallest_effect=0.5)
    assert decision.n == 3 and decision.n_missing == 1
    assert decision.mean == pytest.approx(np.mean([1.0, 1.2, 0.9]))


def test_infinite_difference_is_not_measured():
    decision = paired_decision([1.0, np.inf, 1.2], direction="up", smallest_effect=0.5)
    assert decision.outcome == "not yet measured"


def test_two_differences_use_one_degree_of_freedom():
    decision = paired_decision([1.0, 2.0], direction="up", smallest_effect=0.5)
    half = stats.t.isf(0.025, 1) * 0.5  # sd = 0.7071, se = 0.5
    assert decision.ci_low == pytest.approx(1.5 - half) and decision.ci_high == pytest.approx(1.5 + half)
    assert decision.outcome == "inconclusive"


def test_zero_variance_gives_a_point_interval():
    up = paired_decision([0.7, 0.7, 0.7], direction="up", smallest_effect=0.5)
    assert (up.ci_low, up.ci_high) == (0.7, 0.7) and up.outcome == "confirmed" and up.seeds_needed == 2
    flat = paired_decision([0.0, 0.0], direction="up", smallest_effect=0.5)
    assert flat.outcome == "contradicted" and flat.negligible


def test_huge_n_tiny_effect_is_confirmed_and_negligible():
    rng = np.random.default_rng(1)
    x = rng.normal(0.01, 1.0, size=2_000_000)
    decision = paired_decision(x, direction="up", smallest_effect=0.5)
    assert decision.outcome == "confirmed" and decision.negligible
    assert decision.detectable_effect < 0.01


def test_structure_helping_with_one_seed_is_never_confirmed():
    """The issue's case: n = 1 seed, block +5 pp; 'no-gain' must not come out confirmed."""
    decision = paired_decision([5.0], direction="no-gain", smallest_effect=0.5)
    assert decision.outcome == "not yet measured"
    clear_gain = paired_decision([5.0, 4.0, 4.6, 5.3], direction="no-gain", smallest_effect=0.5)
    assert clear_gain.outcome == "contradicted"


def _interval(low, high):
    """Two differences whose 95% t interval is exactly [low, high]."""
    mean, half = (low + high) / 2, (high - low) / 2
    spread = half / stats.t.isf(0.025, 1) * math.sqrt(2) / math.sqrt(2)  # se = sd / sqrt(2); sd = |a - b| / sqrt(2)
    return [mean - spread, mean + spread]


@pytest.mark.parametrize(
    "direction, low, high, outcome",
    [
        ("up", 0.1, 0.9, "confirmed"),
        ("up", -0.4, 0.3, "contradicted"),
        ("up", -0.4, 0.7, "inconclusive"),
        ("up", -2.0, -1.0, "contradicted"),
        ("down", -0.9, -0.1, "confirmed"),
        ("down", -0.3, 0.4, "contradicted"),
        ("down", -0.7, 0.4, "inconclusive"),
        ("no-gain", -0.4, 0.3, "confirmed"),
        ("no-gain", 0.1, 0.9, "contradicted"),
        ("no-gain", -0.4, 0.7, "inconclusive"),
        ("equal", -0.4, 0.3, "confirmed"),
        ("equal", 0.1, 0.9, "contradicted"),
        ("equal", -0.9, -0.1, "contradicted"),
        ("equal", -0.7, 0.4, "inconclusive"),
    ],
)
def test_outcome_table(direction, low, high, outcome):
    assert outcome_of(direction, low, high, 0.5) == outcome
    decision = paired_decision(_interval(low, high), direction=direction, smallest_effect=0.5)
    assert decision.ci_low == pytest.approx(low) and decision.ci_high == pytest.approx(high)
    assert decision.outcome == outcome


@given(st.lists(st.floats(-1e3, 1e3), min_size=2, max_size=30), st.sampled_from(DIRECTIONS),
       st.floats(1e-3, 1e3))
def test_outcome_is_always_one_of_the_four_and_follows_the_interval(values, direction, effect):
    decision = paired_decision(values, direction=direction, smallest_effect=effect)
    assert decision.outcome in OUTCOMES
    if decision.outcome != "not yet measured":
        assert decision.ci_low <= decision.mean <= decision.ci_high
        assert decision.outcome == outcome_of(direction, decision.ci_low, decision.ci_high, effect)
        assert decision.seeds_needed >= 2


def test_covariate_decides_at_a_matched_covariate():
    """OLS intercept = the difference at zero covariate difference; statsmodels' interval (n - 2 dof)."""
    import statsmodels.api as sm

    rng = np.random.default_rng(2)
    entropy = rng.normal(0.0, 0.05, size=12)
    similarity = 0.0 + 0.8 * entropy + rng.normal(0.0, 0.002, size=12)  # explained by entropy alone
    plain = paired_decision(similarity, direction="down", smallest_effect=0.01)
    adjusted = paired_decision(similarity, direction="down", smallest_effect=0.01, covariate=entropy)
    fit = sm.OLS(similarity, sm.add_constant(entropy)).fit()
    assert adjusted.mean == pytest.approx(fit.params[0])
    assert (adjusted.ci_low, adjusted.ci_high) == pytest.approx(tuple(fit.conf_int(0.05)[0]))
    assert adjusted.covariate and adjusted.outcome == "contradicted"  # |intercept| < 0.01 shown
    assert plain.outcome != "contradicted"  # without the covariate entropy's spread hides it


def test_covariate_edge_cases():
    assert (
        paired_decision([1.0, 2.0], direction="up", smallest_effect=1, covariate=[0.1, 0.2]).outcome
        == "not yet measured"
    )
    constant = paired_decision([1.0, 2.0, 1.5], direction="up", smallest_effect=1, covariate=[0.1, 0.1, 0.1])
    assert constant.outcome == "not yet measured" and "does not vary" in constant.reason
    with pytest.raises(ValueError, match="covariate"):
        paired_decision([1.0, 2.0, 3.0], direction="up", smallest_effect=1, covariate=[0.1, 0.2])


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"direction": "sideways", "smallest_effect": 1}, ValueError, "direction"),
        ({"direction": "up", "smallest_effect": 0}, ValueError, "smallest_effect"),
        ({"direction": "up", "smallest_effect": -1}, ValueError, "smallest_effect"),
        ({"direction": "up", "smallest_effect": math.inf}, ValueError, "smallest_effect"),
        ({"direction": "up", "smallest_effect": "big"}, TypeError, "smallest_effect"),
        ({"direction": "up", "smallest_effect": 1, "alpha": 0}, ValueError, "alpha"),
        ({"direction": "up", "smallest_effect": 1, "alpha": 0.7}, ValueError, "alpha"),
    ],
)
def test_bad_arguments_are_named(kwargs, error, match):
    with pytest.raises(error, match=match):
        paired_decision([1.0, 2.0], **kwargs)


def test_differences_must_be_one_dimensional_numbers():
    with pytest.raises(ValueError, match="differences"):
        paired_decision([[1.0, 2.0]], direction="up", smallest_effect=1)
    with pytest.raises(TypeError, match="differences"):
        paired_decision(["a", "b"], direction="up", smallest_effect=1)


def test_seeds_for_extremes():
    assert seeds_for(100.0, 0.05) == 2
    assert seeds_for(1e-6, 0.05) > 10**12
    with pytest.raises(ValueError):
        seeds_for(0.0, 0.05)


@pytest.mark.parametrize(
    "outcomes, verdict",
    [
        (["confirmed", "confirmed"], "confirmed"),
        (["contradicted", "contradicted"], "contradicted"),
        (["confirmed", "contradicted"], "partly"),
        (["confirmed", "inconclusive"], "inconclusive"),
        (["confirmed", "not yet measured"], "inconclusive"),
        (["not yet measured", "not yet measured"], "not yet measured"),
        ([], "not yet measured"),
    ],
)
def test_combine(outcomes, verdict):
    assert combine(outcomes) == verdict


def test_combine_rejects_unknown_outcomes():
    with pytest.raises(ValueError, match="outcome"):
        combine(["maybe"])
