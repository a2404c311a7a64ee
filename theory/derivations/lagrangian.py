"""The gradient argument of the paper (Eqs. 5-11, docs/theory.md section 3).

Objective (5): L = 1/2 ||sum_j p_j v_j - y||^2 subject to sum_j p_j = 1, p_j >= 0,
with y = M e (||e|| = 1) and v_j = beta_j e + alpha_j, alpha_j ⟂ e. Because
alpha_j ⟂ e, ||(sum p beta - M) e + sum p alpha||^2 splits into the two squares of
the Lagrangian (6):

    L = 1/2 (sum_k p_k beta_k - M)^2 + 1/2 ||sum_k p_k alpha_k||^2 + lambda (sum_k p_k - 1) - sum_k mu_k p_k.

Coordinates: e is the first basis vector (no loss of generality: L is invariant
under rotations), so alpha_j = (0, alpha_{j,1}, ..., alpha_{j,D}) and the gradient
with respect to alpha_j is the gradient in its D free coordinates (the part of
the full gradient orthogonal to e).

sympy differentiates (6) for a *general* N and D (indexed symbols, Sum and
KroneckerDelta), giving (7), (8), (10) and the difference (11); the split (5) = (6)
is expanded at N = 4, d = 4; central differences of the Lagrangian in numpy (exact
up to rounding: it is quadratic in each variable) check every gradient at a random
point (N = 5, d = 4, random unit e).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import sympy as sp

from theory.derivations.common import (
    DIFFERENCE_STEP,
    central_differences,
    difference_tolerance,
    rng_for,
)
from theory.derivations.result import Derivation

log = logging.getLogger(__name__)

GRADIENTS_KEY = "lagrangian-gradients"
DIFFERENCE_KEY = "gradient-difference"

# Indexed symbols for a general number of keys N and of free alpha coordinates D.
N_KEYS, N_FREE = sp.symbols("N D", integer=True, positive=True)
# Indices (docs/theory.md section 3): j (a key), k (summed over keys), i, m (alpha coordinates),
# s, t (a pair of keys).
j, k, i, m, s, t = sp.symbols("j k i m s t", integer=True, positive=True)
p = sp.IndexedBase("p")
beta = sp.IndexedBase("beta")
alpha = sp.IndexedBase("alpha")  # alpha[k, i]: free coordinate i of alpha_k
mu = sp.IndexedBase("mu")
TARGET_NORM, MULTIPLIER = sp.symbols("M lambda", real=True)


def weighted_beta() -> sp.Expr:
    """sum_k p_k beta_k."""
    return sp.Sum(p[k] * beta[k], (k, 1, N_KEYS))


def weighted_alpha(coordinate: sp.Expr) -> sp.Expr:
    """Coordinate ``coordinate`` of sum_k p_k alpha_k."""
    return sp.Sum(p[k] * alpha[k, coordinate], (k, 1, N_KEYS))


def alpha_inner(key: sp.Expr) -> sp.Expr:
    """(sum_k p_k alpha_k) . alpha_key."""
    return sp.Sum(weighted_alpha(i) * alpha[key, i], (i, 1, N_FREE))


def lagrangian() -> sp.Expr:
    """The Lagrangian (6) for general N and D."""
    fit = sp.Rational(1, 2) * (weighted_beta() - TARGET_NORM) ** 2
    spread = sp.Rational(1, 2) * sp.Sum(weighted_alpha(i) ** 2, (i, 1, N_FREE))
    constraints = MULTIPLIER * (sp.Sum(p[k], (k, 1, N_KEYS)) - 1) - sp.Sum(mu[k] * p[k], (k, 1, N_KEYS))
    return fit + spread + constraints


def _guarded_branch(piecewise: sp.Piecewise) -> sp.Expr:
    """The branch of Piecewise((value, index <= size), (0, True)) whose guard is an index range."""
    (value, guard), = [(branch.expr, branch.cond) for branch in piecewise.args if branch.cond != sp.true]
    if not all(isinstance(atom, sp.Rel) for atom in (guard.args if isinstance(guard, sp.And) else (guard,))):
        raise ValueError(f"unexpected Piecewise guard {guard}")
    return value


def _in_range(expression: sp.Expr) -> sp.Expr:
    """Drop sympy's Piecewise guards (j <= N, m <= D): every index we differentiate by is in range."""
    return expression.replace(lambda e: isinstance(e, sp.Piecewise), _guarded_branch)


def _derive(variable: sp.Expr) -> sp.Expr:
    return sp.simplify(_in_range(sp.simplify(_in_range(sp.diff(lagrangian(), variable).doit()))))


def lagrangian_gradients() -> dict[str, sp.Expr]:
    """dL/dp_j (7), dL/dalpha_{j,m} (8, coordinate m) and dL/dbeta_j (10), derived by sympy."""
    return dict(_lagrangian_gradients())


@functools.cache
def _lagrangian_gradients() -> dict[str, sp.Expr]:
    return {
        "dL/dp_j": _derive(p[j]),
        "dL/dalpha_jm": _derive(alpha[j, m]),
        "dL/dbeta_j": _derive(beta[j]),
    }


def printed_gradients() -> dict[str, sp.Expr]:
    """(7) and (10) as the paper states them, and (8), p_j sum_k p_k alpha_k (docs/theory.md section 3)."""
    residual = weighted_beta() - TARGET_NORM
    return {
        "dL/dp_j": residual * beta[j] + alpha_inner(j) + MULTIPLIER - mu[j],
        "dL/dalpha_jm": p[j] * weighted_alpha(m),
        "dL/dbeta_j": p[j] * residual,
    }


def printed_gradient_difference() -> sp.Expr:
    """(11) as printed: (sum p beta)(beta_s - beta_t) + (sum p alpha).(alpha_s - alpha_t) - M (beta_s - beta_t)."""
    return (
        weighted_beta() * (beta[s] - beta[t])
        + sp.Sum(weighted_alpha(i) * (alpha[s, i] - alpha[t, i]), (i, 1, N_FREE))
        - TARGET_NORM * (beta[s] - beta[t])
    )


def _same(a: sp.Expr, b: sp.Expr) -> bool:
    """Equality of expressions with Sums: expand, merge the Sums, simplify."""
    difference = sp.expand(sp.simplify(a - b))
    if difference == 0:
        return True
    return sp.simplify(sp.factor_terms(difference).doit()) == 0


def objective_split_residual(n_keys: int = 4, dimension: int = 4) -> sp.Expr:
    """1/2||sum p_j v_j - M e||^2 - [1/2 (sum p beta - M)^2 + 1/2 ||sum p alpha||^2], e = first basis vector."""
    weights = sp.symbols(f"p1:{n_keys + 1}", positive=True)
    betas = sp.symbols(f"beta1:{n_keys + 1}", real=True)
    alphas = [sp.Matrix([0, *sp.symbols(f"alpha{q}_1:{dimension}", real=True)]) for q in range(1, n_keys + 1)]
    unit = sp.Matrix([1] + [0] * (dimension - 1))
    output = sum(((w * (b * unit + a)) for w, b, a in zip(weights, betas, alphas, strict=True)), sp.zeros(dimension, 1))
    objective = sp.Rational(1, 2) * (output - TARGET_NORM * unit).dot(output - TARGET_NORM * unit)
    spread = sum((w * a for w, a in zip(weights, alphas, strict=True)), sp.zeros(dimension, 1))
    split = sp.Rational(1, 2) * (sum(w * b for w, b in zip(weights, betas, strict=True)) - TARGET_NORM) ** 2
    split += sp.Rational(1, 2) * spread.dot(spread)
    return sp.expand(objective - split)


def _evaluate(expression: sp.Expr, values: dict[sp.Expr, float], n_keys: int, n_free: int) -> float:
    """A derived indexed expression at concrete sizes and values (Sums expanded), evaluated to 30 digits.

    The float64 values are exact binary numbers; 30 digits make the derived side's rounding
    negligible next to the finite differences' (below 1e-28 relative).
    """
    concrete = expression.subs({N_KEYS: n_keys, N_FREE: n_free}).doit()
    return float(concrete.evalf(30, subs=values))


@dataclass(frozen=True)
class _Point:
    """A random point of the full-vector Lagrangian: e, an orthonormal basis of e's complement, and the values."""

    unit: np.ndarray  # e, (d,)
    basis: np.ndarray  # (d, d - 1)
    weights: np.ndarray  # p, (N,)
    betas: np.ndarray  # (N,)
    coordinates: np.ndarray  # alpha_j in the basis, (N, d - 1)
    target_norm: float  # M
    multiplier: float  # lambda
    multipliers: np.ndarray  # mu, (N,)

    def value(self, weights: np.ndarray, betas: np.ndarray, coordinates: np.ndarray) -> float:
        """1/2 ||sum_j p_j (beta_j e + alpha_j) - M e||^2 + lambda (sum p - 1) - mu.p, in float64."""
        values = betas[:, None] * self.unit[None, :] + coordinates @ self.basis.T
        residual = weights @ values - self.target_norm * self.unit
        return float(0.5 * residual @ residual + self.multiplier * (weights.sum() - 1) - self.multipliers @ weights)

    def magnitude(self, step: float) -> float:
        """The value's terms taken in absolute value, with every variable moved by ``step`` away from 0."""
        weights, betas, coordinates = (np.abs(x) + step for x in (self.weights, self.betas, self.coordinates))
        values = betas[:, None] * np.abs(self.unit)[None, :] + coordinates @ np.abs(self.basis).T
        residual = weights @ values + self.target_norm * np.abs(self.unit)
        constraints = abs(self.multiplier) * (weights.sum() + 1) + self.multipliers @ weights
        return float(0.5 * residual @ residual + constraints)


def _random_point(seed: int, n_keys: int, dimension: int) -> _Point:
    rng = rng_for(seed, GRADIENTS_KEY)
    frame, _ = np.linalg.qr(rng.standard_normal((dimension, dimension)))
    logits = rng.standard_normal(n_keys)
    return _Point(
        unit=frame[:, 0], basis=frame[:, 1:],  # e and an orthonormal basis of its complement
        weights=np.exp(logits) / np.exp(logits).sum(),
        betas=rng.standard_normal(n_keys),
        coordinates=rng.standard_normal((n_keys, dimension - 1)),
        target_norm=3.0 + rng.random(), multiplier=rng.standard_normal(), multipliers=rng.random(n_keys),
    )


def finite_difference_errors(
    derived: dict[str, sp.Expr], seed: int, n_keys: int = 5, dimension: int = 4
) -> tuple[dict[str, float], float]:
    """(largest |central difference - derived sympy gradient| for (7), (8), (10) at a random point, tolerance).

    The numeric side is independent of sympy: numpy evaluates the full-vector Lagrangian
    1/2||sum p_j (beta_j e + alpha_j) - M e||^2 + lambda (sum p - 1) - mu.p with a random unit e,
    alpha_j written in an orthonormal basis B of e's complement (its D = d - 1 free coordinates),
    and differentiates it by central differences. The Lagrangian is quadratic in each p_j,
    beta_j and alpha coordinate separately, so the differences are exact up to rounding, and
    the tolerance is the rounding bound of :func:`~theory.derivations.common.difference_tolerance`:
    at most 2 (N + d) + 8 roundings on any path of the evaluation (values, the sum over keys,
    the norm, the constraints), on terms of at most the absolute-value magnitude at the point
    moved by the step. A wrong gradient formula is off by O(1) (tests show it fails).
    """
    point = _random_point(seed, n_keys, dimension)
    grad_p = central_differences(lambda x: point.value(x, point.betas, point.coordinates), point.weights)
    grad_beta = central_differences(lambda x: point.value(point.weights, x, point.coordinates), point.betas)
    grad_coord = central_differences(lambda x: point.value(point.weights, point.betas, x), point.coordinates)
    tolerance = difference_tolerance(point.magnitude(DIFFERENCE_STEP), 2 * (n_keys + dimension) + 8)

    values: dict[sp.Expr, float] = {TARGET_NORM: point.target_norm, MULTIPLIER: point.multiplier}
    for key in range(n_keys):
        values.update({p[key + 1]: point.weights[key], beta[key + 1]: point.betas[key],
                       mu[key + 1]: point.multipliers[key]})
        values.update({alpha[key + 1, c + 1]: point.coordinates[key, c] for c in range(dimension - 1)})
    free = dimension - 1
    errors = {"dL/dp_j": 0.0, "dL/dalpha_jm": 0.0, "dL/dbeta_j": 0.0}
    for key in range(n_keys):
        at_key = {j: key + 1}
        errors["dL/dp_j"] = max(
            errors["dL/dp_j"], abs(_evaluate(derived["dL/dp_j"].subs(at_key), values, n_keys, free) - grad_p[key])
        )
        errors["dL/dbeta_j"] = max(
            errors["dL/dbeta_j"],
            abs(_evaluate(derived["dL/dbeta_j"].subs(at_key), values, n_keys, free) - grad_beta[key]),
        )
        for c in range(free):
            derived_value = _evaluate(derived["dL/dalpha_jm"].subs({j: key + 1, m: c + 1}), values, n_keys, free)
            errors["dL/dalpha_jm"] = max(errors["dL/dalpha_jm"], abs(derived_value - grad_coord[key, c]))
    return {name: float(error) for name, error in errors.items()}, tolerance


def check_lagrangian_gradients(
    *,
    seed: int = 0,
    printed: Callable[[], dict[str, sp.Expr]] = printed_gradients,
    derive: Callable[[], dict[str, sp.Expr]] = lagrangian_gradients,
) -> Derivation:
    """Derive (7), (8), (10) for general N, D and compare with ``printed()`` and with central differences.

    ``derive()`` gives the derived gradients (default: sympy's, :func:`lagrangian_gradients`);
    tests pass a wrong one (and the same as ``printed``) to show the numeric cross-check fails.
    """
    title = "Lagrangian gradients (7), (8), (10)"
    statement = (
        "dL/dp_j = (sum p beta - M) beta_j + (sum p alpha).alpha_j + lambda - mu_j;  "
        "dL/dalpha_j = p_j sum_k p_k alpha_k;  dL/dbeta_j = p_j (sum p beta - M)"
    )
    derived = derive()
    claimed = printed()
    mismatched = [name for name in derived if not _same(derived[name], claimed[name])]
    split_residual = objective_split_residual()
    errors, tolerance = finite_difference_errors(derived, seed)
    log.debug("lagrangian: mismatched %s, split %s, differences %s (tolerance %.1e)", mismatched, split_residual,
              errors, tolerance)
    expressions: dict[str, sp.Basic] = {"L (6)": lagrangian()}
    expressions.update({f"{name} (derived)": value for name, value in derived.items()})
    expressions["(5) - (6) without constraints (N=4, d=4)"] = split_residual
    if mismatched:
        expressions.update({f"{name} (printed)": claimed[name] for name in mismatched})
        return Derivation(
            GRADIENTS_KEY, title, statement, "refuted", False, expressions,
            "derived != printed for " + ", ".join(mismatched) + "; see the '(derived)' expressions",
        )
    if split_residual != 0 or max(errors.values()) > tolerance:
        return Derivation(
            GRADIENTS_KEY, title, statement, "failed", False, expressions,
            f"(5) - (6) = {split_residual}; central-difference errors {errors} (rounding bound {tolerance:.1e})",
        )
    details = (
        "sympy differentiates (6) for general N and D (IndexedBase, Sum, KroneckerDelta) and the results equal "
        "(7), (8), (10); (5) = (6) on alpha ⟂ e expanded at N=4, d=4 (e = first basis vector, WLOG by rotation "
        "invariance); central differences of the Lagrangian (quadratic in each variable, so exact up to "
        "rounding) vs the derived expressions at N=5, d=4, random unit e: max errors "
        + ", ".join(f"{name} {error:.1e}" for name, error in errors.items())
        + f" (rounding bound {tolerance:.1e})"
    )
    return Derivation(GRADIENTS_KEY, title, statement, "proved", True, expressions, details)


def derived_gradient_difference() -> sp.Expr:
    """dL/dp_s - dL/dp_t from the derived (7)."""
    gradient = lagrangian_gradients()["dL/dp_j"]
    return gradient.subs(j, s) - gradient.subs(j, t)


def check_gradient_difference(
    *, seed: int = 0, printed: Callable[[], sp.Expr] = printed_gradient_difference
) -> Derivation:
    """Compare the derived dL/dp_s - dL/dp_t with (11) as printed, and derive the chain's sign conditions."""
    del seed  # purely symbolic
    title = "Gradient difference (11) and the rich-get-richer conditions"
    statement = (
        "dL/dp_s - dL/dp_t = (sum p beta - M)(beta_s - beta_t) + (sum p alpha).(alpha_s - alpha_t) + (mu_t - mu_s), "
        "which is (11) when mu_s = mu_t (e.g. p_s, p_t > 0, as softmax weights are, so mu = 0 by complementary "
        "slackness); if sum p beta < M then p_s > p_t gives dL/dbeta_s < dL/dbeta_t"
    )
    derived = derived_gradient_difference()
    claimed = printed()
    discrepancy = sp.simplify(sp.expand(derived - claimed))
    exact = _same(derived, claimed)
    interior = _same(derived.subs({mu[s]: 0, mu[t]: 0}), claimed)

    # Rich get richer, step 1: the beta-gradients, with p_s = p_t + delta and sum p beta - M = -gap.
    gradients = lagrangian_gradients()
    beta_gap = sp.simplify(gradients["dL/dbeta_j"].subs(j, s) - gradients["dL/dbeta_j"].subs(j, t))
    delta, shortfall = sp.symbols("delta g", positive=True)
    beta_gap_sign = sp.factor(beta_gap.subs({p[s]: p[t] + delta}).subs(weighted_beta(), TARGET_NORM - shortfall))
    beta_step_ok = bool(beta_gap_sign.is_negative)

    # Step 2: with beta_s - beta_t = Delta > 0, (11) < 0 iff g Delta > alpha term + mu_t - mu_s.
    overtake = sp.Symbol("Delta", positive=True)
    alpha_term = sp.Sum(weighted_alpha(i) * (alpha[s, i] - alpha[t, i]), (i, 1, N_FREE))
    condition = sp.StrictGreaterThan(shortfall * overtake, alpha_term + mu[t] - mu[s])
    rearranged = derived.subs(weighted_beta(), TARGET_NORM - shortfall).subs(beta[s], beta[t] + overtake)
    condition_ok = _same(rearranged, -(condition.lhs - condition.rhs))
    log.debug("gradient difference: discrepancy %s, beta gap %s", discrepancy, beta_gap_sign)

    expressions: dict[str, sp.Basic] = {
        "dL/dp_s - dL/dp_t (derived)": derived,
        "(11) as printed": claimed,
        "derived - printed": discrepancy,
        "dL/dbeta_s - dL/dbeta_t": beta_gap,
        "... with p_s = p_t + delta, sum p beta = M - g": beta_gap_sign,
        "dL/dp_s < dL/dp_t iff (beta_s = beta_t + Delta)": condition,
    }
    if not (beta_step_ok and condition_ok):
        return Derivation(
            DIFFERENCE_KEY, title, statement, "failed", False, expressions,
            f"beta step proved {beta_step_ok}, condition rearrangement {condition_ok}",
        )
    chain = (
        "dL/dbeta_s - dL/dbeta_t = (p_s - p_t)(sum p beta - M) < 0 when sum p beta < M (sympy sign); "
        "dL/dp_s < dL/dp_t iff (M - sum p beta)(beta_s - beta_t) > (sum p alpha).(alpha_s - alpha_t) + mu_t - mu_s"
    )
    if exact:
        return Derivation(
            DIFFERENCE_KEY, title, statement, "proved", True, expressions, "(11) matches exactly; " + chain
        )
    if interior:
        details = (
            f"DISCREPANCY: (11) as printed omits {discrepancy} (the multiplier terms of (7)); it is exact iff "
            "mu_s = mu_t, true for softmax weights (p > 0, so mu = 0 by complementary slackness); " + chain
        )
        return Derivation(DIFFERENCE_KEY, title, statement, "proved", True, expressions, details)
    return Derivation(
        DIFFERENCE_KEY, title, statement, "refuted", False, expressions,
        f"(11) as printed differs from the derivation by {discrepancy}, even with mu_s = mu_t = 0",
    )
