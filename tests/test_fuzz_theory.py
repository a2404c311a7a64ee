"""Issue 15: fuzz the theory's public API with valid extremes and hostile inputs.

Allowed outcomes only: a finite, correct result (short rows against the mpmath enumeration of
:mod:`theory.reference`, every row against exact identities), or ValueError/TypeError whose message
names an argument that was generated invalid (or names p where a coefficient exceeds float64,
which the mpmath reference must confirm for short rows). Each fast test sets ``max_examples``
explicitly (its count under the derandomised "ci" profile is known: 560 in all); the
``@pytest.mark.slow`` variants take the "slow" profile (2000 each). Outcomes are recorded with
``hypothesis.event`` (``--hypothesis-show-statistics``).

Tolerances: 1e-12 relative for E[w] and c (the integral method's documented error is below 1e-13),
1e-11 for variances, absolute 1e-312 for values below 1e-300 (subnormal sums carry absolute rounding
only); identities (sum_j E[w_j] = 1 - [zero] r^N') to 1e-12 absolute: a row of at most 40 keys
summing N values of relative error 1e-13.
"""

from __future__ import annotations

import math
import re
import warnings

import numpy as np
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

import theory
from theory import checks
from theory.conventions import check_all_dropped
from theory.reference import mpmath_enumerated_moments

SLOW = settings.get_profile("slow")
EXACT = {
    "expected_attention": theory.expected_attention,
    "smoothing_coefficients": theory.smoothing_coefficients,
    "attention_variance": theory.attention_variance,
}


class Arg:
    """A generated argument: its value and whether it is valid on its own."""

    def __init__(self, value: object, valid: bool):
        self.value, self.valid = value, valid

    def __repr__(self) -> str:
        return f"Arg({self.value!r}, valid={self.valid})"


# --- strategies -----------------------------------------------------------------------------------

WEIGHT_KINDS = st.sampled_from(["zero", "subnormal", "tiny", "ordinary", "ordinary"])


@st.composite
def valid_rows(draw, max_keys: int = 12, batched: bool = True) -> np.ndarray:
    """Attention rows (1-D or batched) with zeros, subnormal and tiny weights, summing to 1."""
    n_keys = draw(st.integers(1, max_keys))
    batch = draw(st.sampled_from([(), (), (1,), (2,), (2, 2)])) if batched else ()
    raw = np.empty((*batch, n_keys))
    for index in np.ndindex(raw.shape):
        kind = draw(WEIGHT_KINDS)
        raw[index] = {
            "zero": lambda: 0.0,
            "subnormal": lambda: draw(st.floats(5e-324, 2.2e-308)),
            "tiny": lambda: 10.0 ** draw(st.floats(-307, -20)),
            "ordinary": lambda: draw(st.floats(0.01, 1.0)),
        }[kind]()
    raw = raw.reshape(-1, n_keys)
    for row in raw:
        if row.max() < 1e-3:  # at least one ordinary key, so that normalising keeps the tiny ones tiny
            row[draw(st.integers(0, n_keys - 1))] = 1.0
    return (raw / raw.sum(axis=1, keepdims=True)).reshape(*batch, n_keys)


BAD_P = st.sampled_from([
    None, "0.5,0.5", b"ab", [0.5, "a"], [[0.5, 0.5], [1.0]], 0.5, np.array(1.0), [], [[]], np.zeros((0, 3)),
    [math.nan, 1.0], [math.inf, 0.0], [-0.5, 1.5], [0.5, 0.4], [0.7, 0.7], [True, False], [0.5 + 0j, 0.5],
    {"p": 1}, np.array([0.5, 0.5], dtype=object), np.array(["a", "b"]), [10**400, 0], [1e308, 1e308],
    [[0.5, 0.5], [0.9, 0.3]], [0.5, -0.0, 0.5, -1e-300],
])


@st.composite
def p_args(draw, max_keys: int = 12, batched: bool = True) -> Arg:
    if draw(st.integers(0, 5)) == 0:
        return Arg(draw(BAD_P), False)
    return Arg(draw(valid_rows(max_keys, batched)), True)


VALID_RATIOS = st.one_of(
    st.sampled_from([0.0, 5e-324, 1e-300, 1e-12, 1e-3, 0.0099, 0.0101, 0.3, 0.5, 0.99, 1 - 1e-12,
                     1 - 2**-53]),
    st.floats(0.0, 1.0, exclude_max=True),
    st.floats(0.0, 1e-5),
)
BAD_RATIOS = st.sampled_from([math.nan, math.inf, -math.inf, -1e-300, -0.1, 1.0, 1.5, 10**400, -(10**400), True,
                              False, None, "0.3", 0.3 + 0j, [0.3], np.array([0.3, 0.4])])


@st.composite
def ratio_args(draw) -> Arg:
    if draw(st.integers(0, 5)) == 0:
        return Arg(draw(BAD_RATIOS), False)
    value = draw(VALID_RATIOS)
    return Arg(draw(st.sampled_from([value, np.float64(value), np.float32(value) if value in (0.0, 0.5) else value])),
               True)


@st.composite
def option_args(draw, valid: list[object], bad: list[object]) -> Arg:
    """A valid option, or (one time in ten) a bad one."""
    if draw(st.integers(0, 9)) == 0:
        return Arg(draw(st.sampled_from(bad)), False)
    return Arg(draw(st.sampled_from(valid)), True)


CONVENTION_ARGS = option_args(["zero", "uniform", "undropped"], ["", "Zero", "none", None, 1, True, b"zero"])
METHOD_ARGS = option_args(["auto", "auto", "enumerate", "integral"], ["exact", None, 0, ["auto"]])
WORKSPACE_ARGS = option_args([None, None, 1, 4096, 2**26, 10**400], [0, -1, 1.5, True, "64", math.nan])


# --- oracle ---------------------------------------------------------------------------------------


def names_an_invalid_argument(error: Exception, arguments: dict[str, Arg]) -> bool:
    message = str(error)
    return any(re.search(rf"\b{re.escape(name)}\b", message) for name, arg in arguments.items() if not arg.valid)


def call(function, *args, **kwargs):
    """Call with warnings as errors: a result with 'only a warning' is not an allowed outcome."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return function(*args, **kwargs)


def assert_close(found: np.ndarray, expected: np.ndarray, rtol: float) -> None:
    small = np.abs(expected) < 1e-300
    np.testing.assert_allclose(found[~small], expected[~small], rtol=rtol, atol=0)
    np.testing.assert_allclose(found[small], expected[small], rtol=0, atol=1e-312)


def check_exact(name: str, p: Arg, r: Arg, convention: Arg, method: Arg, workspace: Arg) -> None:
    """One call of an exact function; assert an allowed outcome and record it."""
    arguments = {"p": p, "drop_ratio": r, "all_dropped": convention, "method": method, "workspace_bytes": workspace}
    n_keys = np.shape(p.value)[-1] if p.valid else 0
    if p.valid and method.value == "enumerate" and n_keys > theory.ENUMERATE_MAX_KEYS:
        arguments["method"] = Arg(method.value, False)
    options = {"all_dropped": convention.value, "method": method.value, "workspace_bytes": workspace.value}
    try:
        found = call(EXACT[name], p.value, r.value, **options)
    except (ValueError, TypeError) as error:
        if all(arg.valid for arg in arguments.values()):  # only a coefficient beyond float64, naming p
            assert name == "smoothing_coefficients", error
            assert str(error).startswith("p: the smoothing coefficient"), error
            assert np.min(np.where(p.value > 0, p.value, 1.0)) < 1e-290  # only tiny weights can overflow c
            confirm_overflow(p.value, float(r.value), convention.value)
            event(f"{name}: ValueError (coefficient beyond float64)")
        else:
            assert names_an_invalid_argument(error, arguments), (error, arguments)
            event(f"{name}: {type(error).__name__}")
        return
    assert all(arg.valid for arg in arguments.values()), f"accepted invalid input {arguments}: {found}"
    found = np.asarray(found)
    assert found.shape == np.shape(p.value) and found.dtype == np.float64
    assert np.all(np.isfinite(found)) and np.all(found >= 0)
    check_correct(name, np.asarray(p.value, dtype=np.float64), float(r.value), convention.value, found)
    event(f"{name}: finite result")


def confirm_overflow(p: np.ndarray, r: float, convention: str) -> None:
    """For one short row the mpmath reference must agree that some coefficient exceeds float64."""
    if p.ndim == 1 and p.size <= 5:
        assert not np.all(np.isfinite(mpmath_enumerated_moments(p, r, convention).coefficients))


def check_correct(name: str, p: np.ndarray, r: float, convention: str, found: np.ndarray) -> None:
    if p.ndim == 1 and p.size <= 5:  # the independent mpmath enumeration
        reference = mpmath_enumerated_moments(p, r, convention)
        expected = {"expected_attention": reference.means, "attention_variance": reference.variances,
                    "smoothing_coefficients": reference.coefficients}[name]
        assert_close(found, np.asarray(expected), 1e-11 if name == "attention_variance" else 1e-12)
        return
    rows, present = p.reshape(-1, p.shape[-1]), (p > 0).reshape(-1, p.shape[-1])
    alone = np.exp(present.sum(axis=1) * math.log(r)) if r > 0 else np.zeros(rows.shape[0])
    if name == "attention_variance":  # w_j in [0, 1]: Var <= E[w^2] <= E[w]
        mean = theory.expected_attention(p, r, all_dropped=convention)
        assert np.all(found <= mean * (1 + 1e-12) + 1e-300)
        return
    expectation = found if name == "expected_attention" else found * p
    totals = expectation.reshape(rows.shape).sum(axis=1)
    np.testing.assert_allclose(totals, 1.0 - alone if convention == "zero" else 1.0, rtol=0, atol=1e-12)


# --- the exact functions --------------------------------------------------------------------------


def exact_property(name: str, p: Arg, r: Arg, convention: Arg, method: Arg, workspace: Arg) -> None:
    check_exact(name, p, r, convention, method, workspace)


EXACT_ARGS = dict(p=p_args(), r=ratio_args(), convention=CONVENTION_ARGS, method=METHOD_ARGS,
                  workspace=WORKSPACE_ARGS)
LONG_ARGS = dict(p=p_args(max_keys=40), r=ratio_args(), convention=CONVENTION_ARGS,
                 method=option_args(["auto", "integral"], ["exact", None]), workspace=WORKSPACE_ARGS)


def fast_and_slow(prop, max_examples: int, parametrize: tuple | None = None, **strategies):
    """The fast test (``max_examples`` under every profile) and its @slow variant (the "slow" profile)."""
    fast = settings(max_examples=max_examples)(given(**strategies)(prop))
    slow = pytest.mark.slow(settings(SLOW)(given(**strategies)(prop)))
    if parametrize:
        fast, slow = pytest.mark.parametrize(*parametrize)(fast), pytest.mark.parametrize(*parametrize)(slow)
    return fast, slow


BY_NAME = ("name", list(EXACT))
test_fuzz_exact_functions, test_fuzz_exact_functions_slow = fast_and_slow(exact_property, 100, BY_NAME, **EXACT_ARGS)
test_fuzz_exact_functions_long_rows, test_fuzz_exact_functions_long_rows_slow = fast_and_slow(
    exact_property, 40, BY_NAME, **LONG_ARGS)


# --- post-softmax dropout and the sampler -----------------------------------------------------------


def dropout_property(p: Arg, r: Arg) -> None:
    arguments = {"p": p, "drop_ratio": r}
    for name, function in (("dropout_expected_attention", theory.dropout_expected_attention),
                           ("dropout_attention_variance", theory.dropout_attention_variance)):
        try:
            found = call(function, p.value, r.value)
        except (ValueError, TypeError) as error:
            assert names_an_invalid_argument(error, arguments), (error, arguments)
            event(f"{name}: {type(error).__name__}")
            continue
        assert p.valid and r.valid, f"accepted invalid input {arguments}"
        rows, ratio = np.asarray(p.value, dtype=np.float64), float(r.value)
        expected = rows if name == "dropout_expected_attention" else ratio / (1 - ratio) * rows**2
        assert np.all(np.isfinite(found))
        assert_close(np.asarray(found), expected, 1e-15)
        event(f"{name}: finite result")


def sampled_property(p: Arg, r: Arg, samples: Arg, seed: Arg, convention: Arg) -> None:
    arguments = {"p": p, "drop_ratio": r, "num_samples": samples, "seed": seed, "all_dropped": convention}
    if p.valid and np.ndim(p.value) != 1:
        arguments["p"] = Arg(p.value, False)  # the sampler takes one row
    try:
        found = call(theory.sampled_expected_attention, p.value, r.value, num_samples=samples.value,
                     seed=seed.value, all_dropped=convention.value)
    except (ValueError, TypeError) as error:
        assert names_an_invalid_argument(error, arguments), (error, arguments)
        event(f"sampled_expected_attention: {type(error).__name__}")
        return
    assert all(arg.valid for arg in arguments.values()), f"accepted invalid input {arguments}"
    assert np.all(np.isfinite(found.mean)) and np.all(np.isfinite(found.standard_error))
    assert np.all((found.mean >= 0) & (found.mean <= 1 + 1e-12))
    event("sampled_expected_attention: finite result")


SAMPLES_ARGS = option_args([2, 3, 50], [1, 0, -5, 2.5, True, "10", None])
SEED_ARGS = option_args([0, 1, 2**63 - 1, np.random.SeedSequence(3)], [-1, 2**64, 1.5, "0", None, True])


test_fuzz_dropout_functions, test_fuzz_dropout_functions_slow = fast_and_slow(
    dropout_property, 80, p=p_args(), r=ratio_args())
test_fuzz_sampled_expected_attention, test_fuzz_sampled_expected_attention_slow = fast_and_slow(
    sampled_property, 60, p=p_args(6, batched=False), r=ratio_args(), samples=SAMPLES_ARGS, seed=SEED_ARGS,
    convention=CONVENTION_ARGS)

# --- the shared checks ----------------------------------------------------------------------------

ANYTHING = st.one_of(
    st.floats(0.0, 1.0), st.integers(-6, 11), st.sampled_from(["a", "b", "zero", "uniform", "undropped"]),
    st.lists(st.integers(0, 2), min_size=1, max_size=3, unique=True).map(tuple),
    st.integers(-(10**400), 10**400), st.sampled_from([10**400, -(10**400), 2**63, 2**64]),
    st.floats(allow_nan=True, allow_infinity=True), st.booleans(), st.none(), st.text(max_size=5),
    st.complex_numbers(max_magnitude=10), st.lists(st.integers(0, 3), max_size=3).map(tuple),
    st.sampled_from([np.float64(0.5), np.int64(3), np.float32(np.nan), np.bool_(True), b"1", [1]]),
)


def checks_property(value: object) -> None:
    """Every check returns a value of its type within range, or raises ValueError naming 'arg'."""
    cases = [
        ("check_real", lambda v: checks.check_real(v, "arg", 0.0, 1.0, high_open=True),
         lambda out: isinstance(out, float) and 0.0 <= out < 1.0),
        ("check_int", lambda v: checks.check_int(v, "arg", -5, 10**30),
         lambda out: type(out) is int and -5 <= out <= 10**30),
        ("check_drop_ratio", lambda v: checks.check_drop_ratio(v, "arg", allow_zero=False),
         lambda out: isinstance(out, float) and 0.0 < out < 1.0),
        ("check_seed", lambda v: checks.check_seed(v, "arg"), lambda out: type(out) is int and 0 <= out < 2**63),
        ("check_bool", lambda v: checks.check_bool(v, "arg"), lambda out: out is True or out is False),
        ("check_choice", lambda v: checks.check_choice(v, "arg", ("a", "b")), lambda out: out in ("a", "b")),
        ("check_tuple", lambda v: checks.check_tuple(v, "arg", lambda x, n: checks.check_int(x, n, 0, 2)),
         lambda out: isinstance(out, tuple) and all(0 <= x <= 2 for x in out)),
        ("check_all_dropped", lambda v: check_all_dropped(v, "arg"), lambda out: out in ("zero", "uniform",
                                                                                        "undropped")),
    ]
    for name, check, accepted in cases:
        try:
            out = check(value)
        except ValueError as error:
            assert re.match(r"^arg(\[\d+\])? must", str(error)), (name, value, error)
            assert len(str(error)) < 400  # a 400-digit integer is not printed in full
            event(f"{name}: ValueError")
            continue
        assert accepted(out), (name, value, out)
        event(f"{name}: accepted")


test_fuzz_checks, test_fuzz_checks_slow = fast_and_slow(checks_property, 100, value=ANYTHING)
