"""Pre-registered decision rules: from paired differences to an outcome, with its interval and power.

One function decides every empirical claim of the report: :func:`paired_decision`. Its input
is one number per seed (or per simulated problem), each a *paired* difference (the same seed
under two arms), and three things fixed in the claims registry before any data are seen: the
claimed ``direction``, the ``smallest_effect`` that matters, and ``alpha``. Its output is a
:class:`Decision`: the mean, a two-sided ``1 - alpha`` Student-t interval (``n - 1`` degrees of
freedom), and an outcome read off the interval:

====================  =========================  =============================  ==============
direction             confirmed                  contradicted                   else
====================  =========================  =============================  ==============
``"up"``              ci_low > 0                 ci_high < e                    inconclusive
``"down"``            ci_high < 0                ci_low > -e                    inconclusive
``"no-gain"``         ci_high < e                ci_low > 0                     inconclusive
``"equal"``           -e < ci_low, ci_high < e   ci_low > 0 or ci_high < 0      inconclusive
====================  =========================  =============================  ==============

(``e`` = smallest_effect; rows are tried left to right.) "up" contradicted means any rise is shown
to be smaller than the smallest that matters (or the quantity falls): a *lack* of significance is
never a contradiction, only an interval that excludes every effect that matters is. "equal" (the
quantity is claimed to be zero within ``e``; used for calibration checks) extends the three
directions of the issue that specified this module, with the no-gain rule applied to both signs.

``negligible`` is the equivalence result (two one-sided tests at ``alpha / 2`` each, i.e. the
``1 - alpha`` interval inside ``(-e, e)``): the effect, whatever its sign, is smaller than what
matters. ``detectable_effect`` is the true effect that this ``n`` and sample SD detect with 80%
power (two-sided t-test at ``alpha``); ``seeds_needed`` is the ``n`` that would detect ``e`` with
80% power. Both come from statsmodels' power of the one-sample t-test.

Not measurable -> ``"not yet measured"`` (never confirmed): fewer than 2 finite differences, or a
non-finite SD. NaN differences are left out and counted (``n_missing``); an infinite one makes
the SD non-finite.

With ``covariate`` (one number per pair, e.g. the entropy difference of the same two runs), the
decision is on the intercept of the least-squares line ``difference = a + b * covariate``: the
difference at a matched covariate. Its interval has ``n - 2`` degrees of freedom (statsmodels OLS);
its power figures use the normal-theory approximation ``(t_{1-alpha/2} + t_{power}) * SE``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

from theory.checks import check_choice, check_real

DIRECTIONS = ("up", "down", "no-gain", "equal")
OUTCOMES = ("confirmed", "contradicted", "inconclusive", "not yet measured")
POWER = 0.8  # the power at which detectable effects and needed seeds are stated


@dataclass(frozen=True)
class Decision:
    """The outcome of one pre-registered comparison and the numbers behind it (see the module doc)."""

    outcome: str
    direction: str
    smallest_effect: float
    alpha: float
    n: int
    mean: float
    sd: float
    ci_low: float
    ci_high: float
    negligible: bool
    detectable_effect: float
    seeds_needed: int | None
    n_missing: int = 0
    covariate: bool = False
    reason: str = ""

    @property
    def confidence(self) -> float:
        return 1.0 - self.alpha

    def interval_text(self, digits: int = 3) -> str:
        """'+0.12 [95% CI −0.30, +0.54]' (or 'n/a' when not measured)."""
        if not math.isfinite(self.mean):
            return "n/a"
        level = f"{100 * self.confidence:g}%"
        return (f"{self.mean:+.{digits}g} [{level} CI {self.ci_low:+.{digits}g}, {self.ci_high:+.{digits}g}]")

    def describe(self, digits: int = 3) -> str:
        """One line: interval, n, smallest effect, outcome and, if inconclusive, the power figures."""
        text = f"{self.interval_text(digits)}, n = {self.n}, smallest effect {self.smallest_effect:g}: {self.outcome}"
        if self.outcome == "inconclusive":
            text += f" (detects {self.detectable_effect:.{digits}g} at {POWER:.0%} power"
            text += f"; about {self.seeds_needed} needed)" if self.seeds_needed is not None else ")"
        if self.negligible:
            text += ", negligible"
        return text

    def to_record(self) -> dict[str, object]:
        """A flat JSON-ready record (non-finite numbers as None)."""
        record: dict[str, object] = {}
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            record[name] = None if isinstance(value, float) and not math.isfinite(value) else value
        return record


def _check(direction: str, smallest_effect: float, alpha: float) -> tuple[str, float, float]:
    """TypeError for a number of the wrong type, else the ranges of :mod:`theory.checks` (ValueError)."""
    check_choice(direction, "direction", DIRECTIONS)
    if isinstance(smallest_effect, bool) or not isinstance(smallest_effect, (int, float, np.floating, np.integer)):
        raise TypeError(f"smallest_effect must be a real number > 0, got {smallest_effect!r}")
    smallest_effect = check_real(smallest_effect, "smallest_effect", 0.0, None, low_open=True)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float, np.floating)):
        raise TypeError(f"alpha must be a real number in (0, 0.5], got {alpha!r}")
    return direction, smallest_effect, check_real(alpha, "alpha", 0.0, 0.5, low_open=True)


def _as_vector(values: Iterable[float] | np.ndarray, name: str) -> np.ndarray:
    try:
        array = np.asarray(list(values) if not isinstance(values, np.ndarray) else values, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise TypeError(f"{name} must be a sequence of real numbers: {error}") from None
    if array.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional (one number per seed or problem), got shape {array.shape}")
    return array


def outcome_of(direction: str, ci_low: float, ci_high: float, smallest_effect: float) -> str:
    """The outcome an interval gives for a claimed direction (the table of the module doc)."""
    e = smallest_effect
    if direction == "up":
        return "confirmed" if ci_low > 0 else ("contradicted" if ci_high < e else "inconclusive")
    if direction == "down":
        return "confirmed" if ci_high < 0 else ("contradicted" if ci_low > -e else "inconclusive")
    if direction == "no-gain":
        return "confirmed" if ci_high < e else ("contradicted" if ci_low > 0 else "inconclusive")
    if direction == "equal":
        if -e < ci_low and ci_high < e:
            return "confirmed"
        return "contradicted" if (ci_low > 0 or ci_high < 0) else "inconclusive"
    raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")


def _power_solve(**kwargs: float | None) -> float:
    """statsmodels' one-sample t-test power solve; NaN when its root finder fails."""
    from statsmodels.stats.power import TTestPower
    from statsmodels.tools.sm_exceptions import ConvergenceWarning

    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        warnings.simplefilter("ignore", RuntimeWarning)
        try:
            value = TTestPower().solve_power(power=POWER, alternative="two-sided", **kwargs)
        except (ConvergenceWarning, ValueError, ZeroDivisionError):
            return math.nan
    value = float(np.atleast_1d(value)[0])
    return value if math.isfinite(value) else math.nan


def _normal_z(alpha: float) -> float:
    return float(stats.norm.isf(alpha / 2) + stats.norm.ppf(POWER))


def detectable_standardised_effect(n: int, alpha: float) -> float:
    """The effect (in SDs of the differences) a two-sided t-test at ``alpha`` detects with 80% power at ``n``."""
    if n < 2:
        return math.nan
    solved = _power_solve(effect_size=None, nobs=n, alpha=alpha)
    return solved if math.isfinite(solved) else _normal_z(alpha) / math.sqrt(n)


def seeds_for(standardised_effect: float, alpha: float) -> int:
    """The smallest n >= 2 at which a two-sided t-test at ``alpha`` detects that effect with 80% power."""
    from statsmodels.stats.power import TTestPower

    d = abs(float(standardised_effect))
    if not math.isfinite(d):
        return 2
    if d == 0.0:
        raise ValueError("a zero effect cannot be detected at any n")
    if TTestPower().power(effect_size=d, nobs=2, alpha=alpha, alternative="two-sided") >= POWER:
        return 2
    solved = _power_solve(effect_size=d, nobs=None, alpha=alpha)
    if not math.isfinite(solved):
        solved = (_normal_z(alpha) / d) ** 2
    return max(2, math.ceil(solved - 1e-9))


def _not_measured(direction: str, e: float, alpha: float, n: int, missing: int, reason: str,
                  covariate: bool = False) -> Decision:
    nan = math.nan
    return Decision("not yet measured", direction, e, alpha, n, nan, nan, nan, nan, False, nan, None,
                    missing, covariate, reason)


def paired_decision(
    differences: Sequence[float] | np.ndarray,
    *,
    direction: str,
    smallest_effect: float,
    alpha: float = 0.05,
    covariate: Sequence[float] | np.ndarray | None = None,
) -> Decision:
    """Decide a pre-registered claim from paired differences (one per seed or problem); see the module doc."""
    direction, e, alpha = _check(direction, smallest_effect, alpha)
    x = _as_vector(differences, "differences")
    if covariate is not None:
        return _decision_with_covariate(x, _as_vector(covariate, "covariate"), direction, e, alpha)
    present = ~np.isnan(x)
    missing = int((~present).sum())
    x = x[present]
    n = int(x.size)
    if n < 2:
        return _not_measured(direction, e, alpha, n, missing, f"{n} finite difference(s); at least 2 are needed")
    with np.errstate(all="ignore"):
        identical = bool(np.all(x == x[0]))  # exactly equal pairs: the SD is 0, not a rounding residue
        mean = float(x[0]) if identical else float(x.mean())
        sd = 0.0 if identical else float(x.std(ddof=1))
    if not (math.isfinite(sd) and math.isfinite(mean)):
        return _not_measured(direction, e, alpha, n, missing, "the differences' SD is not finite")
    if sd == 0.0:  # every pair differs by exactly the same amount: the interval is that point
        low = high = mean
    else:
        low, high = (float(v) for v in stats.t.interval(1.0 - alpha, df=n - 1, loc=mean, scale=sd / math.sqrt(n)))
    outcome = outcome_of(direction, low, high, e)
    detectable = detectable_standardised_effect(n, alpha) * sd
    needed = 2 if sd == 0.0 else seeds_for(e / sd, alpha)
    return Decision(outcome, direction, e, alpha, n, mean, sd, low, high, bool(-e < low and high < e),
                    float(detectable), needed, missing, False, f"t interval, {n - 1} degrees of freedom")


def _decision_with_covariate(y: np.ndarray, x: np.ndarray, direction: str, e: float, alpha: float) -> Decision:
    """The intercept of OLS ``y = a + b x``: the paired difference at a matched covariate."""
    import statsmodels.api as sm

    if x.shape != y.shape:
        raise ValueError(f"covariate must have one number per difference: shapes {x.shape} and {y.shape}")
    present = ~(np.isnan(x) | np.isnan(y))
    missing = int((~present).sum())
    x, y = x[present], y[present]
    n = int(y.size)
    if n < 3:
        return _not_measured(direction, e, alpha, n, missing,
                             f"{n} finite pair(s); a line with an intercept needs at least 3", covariate=True)
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        return _not_measured(direction, e, alpha, n, missing, "a difference or covariate is infinite", covariate=True)
    if float(np.ptp(x)) == 0.0:
        return _not_measured(direction, e, alpha, n, missing,
                             "the covariate does not vary: its effect cannot be separated", covariate=True)
    fit = sm.OLS(y, sm.add_constant(x, has_constant="add")).fit()
    low, high = (float(v) for v in fit.conf_int(alpha)[0])
    intercept, se, df = float(fit.params[0]), float(fit.bse[0]), int(fit.df_resid)
    if not math.isfinite(se):
        return _not_measured(direction, e, alpha, n, missing, "the intercept's SE is not finite", covariate=True)
    z = lambda dof: float(stats.t.isf(alpha / 2, dof) + stats.t.ppf(POWER, dof))  # noqa: E731
    detectable = z(df) * se
    if se == 0.0:
        needed: int | None = 3
    else:  # SE shrinks as 1/sqrt(n) at the same design: the smallest n' with z(n' - 2) SE sqrt(n / n') < e;
        # z(df) falls towards its normal limit, so the normal-theory n is a lower bound to start from
        needed = max(3, math.ceil(n * (_normal_z(alpha) * se / e) ** 2))
        while z(needed - 2) * se * math.sqrt(n / needed) >= e:
            needed += 1
    outcome = outcome_of(direction, low, high, e)
    sd_residual = float(math.sqrt(fit.scale)) if fit.df_resid > 0 else math.nan
    return Decision(outcome, direction, e, alpha, n, intercept, sd_residual, low, high, bool(-e < low and high < e),
                    detectable, needed, missing, True,
                    f"intercept of a line on the covariate, t interval with {df} degrees of freedom")


def combine(outcomes: Iterable[str]) -> str:
    """A claim's verdict from its quantities' outcomes.

    confirmed if all are; contradicted if all are; "partly" if some are confirmed and others
    contradicted; "not yet measured" if none is measured; else inconclusive.
    """
    found = list(outcomes)
    for outcome in found:
        check_choice(outcome, "outcome", OUTCOMES)
    if not found or all(o == "not yet measured" for o in found):
        return "not yet measured"
    if all(o == "confirmed" for o in found):
        return "confirmed"
    if all(o == "contradicted" for o in found):
        return "contradicted"
    if "confirmed" in found and "contradicted" in found:
        return "partly"
    return "inconclusive"
