"""The gradient argument of the paper (Eqs. 5-11, THEORY-NOTES section 3).

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
is expanded at N = 4, d = 4; torch autograd checks every gradient at a random
point (N = 5, d = 4, random unit e).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

import numpy as np
import sympy as sp

from theory.derivations.common import equation, rng_for
from theory.derivations.result import Derivation

log = logging.getLogger(__name__)

GRADIENTS_KEY = "lagrangian-gradients"
DIFFERENCE_KEY = "gradient-difference"

# Indexed symbols for a general number of keys N and of free alpha coordinates D.
N_KEYS, N_FREE = sp.symbols("N D", integer=True, positive=True)
# Indices as in the notes: j (a key), k (summed over keys), i, m (alpha coordinates), s, t (a pair of keys).
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


def notes_gradients() -> dict[str, sp.Expr]:
    """(7) and (10) as printed in THEORY-NOTES, and (8), which the notes do not print: p_j sum_k p_k alpha_k."""
    residual = weighted_beta() - TARGET_NORM
    return {
        "dL/dp_j": residual * beta[j] + alpha_inner(j) + MULTIPLIER - mu[j],
        "dL/dalpha_jm": p[j] * weighted_alpha(m),
        "dL/dbeta_j": p[j] * residual,
    }


def notes_gradient_difference() -> sp.Expr:
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
    """A derived indexed expression at concrete sizes and values (Sums expanded, then substituted)."""
    concrete = expression.subs({N_KEYS: n_keys, N_FREE: n_free}).doit()
    return float(concrete.subs(values))


def autograd_errors(
    derived: dict[str, sp.Expr], seed: int, n_keys: int = 5, dimension: int = 4
) -> dict[str, float]:
    """Largest |torch autograd - derived sympy gradient| for (7), (8), (10) at a random point.

    torch differentiates the full-vector Lagrangian 1/2||sum p_j (beta_j e + alpha_j) - M e||^2
    + lambda (sum p - 1) - mu.p in float64 with a random unit e; alpha_j lies in e's
    complement, written in an orthonormal basis B of it (the D = d - 1 free coordinates),
    so the alpha gradient in those coordinates is B^T (full gradient).
    """
    import torch  # lazy: torch is slow to import and only this check needs it

    rng = rng_for(seed, GRADIENTS_KEY)
    frame, _ = np.linalg.qr(rng.standard_normal((dimension, dimension)))
    unit, basis = frame[:, 0], frame[:, 1:]  # e and an orthonormal basis of its complement
    logits = rng.standard_normal(n_keys)
    weights = np.exp(logits) / np.exp(logits).sum()
    betas = rng.standard_normal(n_keys)
    coordinates = rng.standard_normal((n_keys, dimension - 1))
    target_norm, multiplier = 3.0 + rng.random(), rng.standard_normal()
    multipliers = rng.random(n_keys)

    p_t, beta_t, coord_t = (
        torch.tensor(x, dtype=torch.float64, requires_grad=True) for x in (weights, betas, coordinates)
    )
    e_t, basis_t = torch.tensor(unit), torch.tensor(basis)
    values = beta_t[:, None] * e_t[None, :] + coord_t @ basis_t.T  # v_j = beta_j e + alpha_j
    residual = (p_t[:, None] * values).sum(0) - target_norm * e_t
    lagrangian_value = (
        0.5 * residual.dot(residual) + multiplier * (p_t.sum() - 1) - (torch.tensor(multipliers) * p_t).sum()
    )
    grad_p, grad_beta, grad_coord = torch.autograd.grad(lagrangian_value, (p_t, beta_t, coord_t))

    point: dict[sp.Expr, float] = {TARGET_NORM: target_norm, MULTIPLIER: multiplier}
    for key in range(n_keys):
        point.update({p[key + 1]: weights[key], beta[key + 1]: betas[key], mu[key + 1]: multipliers[key]})
        point.update({alpha[key + 1, c + 1]: coordinates[key, c] for c in range(dimension - 1)})
    free = dimension - 1
    errors = {"dL/dp_j": 0.0, "dL/dalpha_jm": 0.0, "dL/dbeta_j": 0.0}
    for key in range(n_keys):
        at_key = {j: key + 1}
        errors["dL/dp_j"] = max(
            errors["dL/dp_j"], abs(_evaluate(derived["dL/dp_j"].subs(at_key), point, n_keys, free) - float(grad_p[key]))
        )
        errors["dL/dbeta_j"] = max(
            errors["dL/dbeta_j"],
            abs(_evaluate(derived["dL/dbeta_j"].subs(at_key), point, n_keys, free) - float(grad_beta[key])),
        )
        for c in range(free):
            derived_value = _evaluate(derived["dL/dalpha_jm"].subs({j: key + 1, m: c + 1}), point, n_keys, free)
            errors["dL/dalpha_jm"] = max(errors["dL/dalpha_jm"], abs(derived_value - float(grad_coord[key, c])))
    return errors


def check_lagrangian_gradients(
    *, seed: int = 0, printed: Callable[[], dict[str, sp.Expr]] = notes_gradients
) -> Derivation:
    """Derive (7), (8), (10) for general N, D and compare with ``printed()`` and with torch autograd."""
    title = "Lagrangian gradients (7), (8), (10)"
    statement = (
        "dL/dp_j = (sum p beta - M) beta_j + (sum p alpha).alpha_j + lambda - mu_j;  "
        "dL/dalpha_j = p_j sum_k p_k alpha_k;  dL/dbeta_j = p_j (sum p beta - M)"
    )
    derived = lagrangian_gradients()
    claimed = printed()
    mismatched = [name for name in derived if not _same(derived[name], claimed[name])]
    split_residual = objective_split_residual()
    errors = autograd_errors(derived, seed)
    log.debug("lagrangian: mismatched %s, split %s, autograd %s", mismatched, split_residual, errors)
    expressions: dict[str, sp.Basic] = {"L (6)": lagrangian()}
    expressions.update({f"{name} (derived)": value for name, value in derived.items()})
    expressions["(5) - (6) without constraints (N=4, d=4)"] = split_residual
    if mismatched:
        expressions.update({f"{name} (printed)": claimed[name] for name in mismatched})
        return Derivation(
            GRADIENTS_KEY, title, statement, "refuted", False, expressions,
            "derived != printed for " + ", ".join(mismatched) + "; see the '(derived)' expressions",
        )
    if split_residual != 0 or max(errors.values()) > 1e-12:
        return Derivation(
            GRADIENTS_KEY, title, statement, "failed", False, expressions,
            f"(5) - (6) = {split_residual}; autograd errors {errors}",
        )
    details = (
        "sympy differentiates (6) for general N and D (IndexedBase, Sum, KroneckerDelta) and the results equal "
        "(7), (8), (10); (5) = (6) on alpha ⟂ e expanded at N=4, d=4 (e = first basis vector, WLOG by rotation "
        "invariance); torch autograd vs the derived expressions at N=5, d=4, random unit e: max errors "
        + ", ".join(f"{name} {error:.1e}" for name, error in errors.items())
    )
    return Derivation(GRADIENTS_KEY, title, statement, "proved", True, expressions, details)


def derived_gradient_difference() -> sp.Expr:
    """dL/dp_s - dL/dp_t from the derived (7)."""
    gradient = lagrangian_gradients()["dL/dp_j"]
    return gradient.subs(j, s) - gradient.subs(j, t)


def check_gradient_difference(
    *, seed: int = 0, printed: Callable[[], sp.Expr] = notes_gradient_difference
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
        return Derivation(DIFFERENCE_KEY, title, statement, "proved", True, expressions, "(11) matches exactly; " + chain)
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
