"""The integral method's trapezoid nodes below its first node, summed in closed form.

:mod:`theory.integral` sums, for nodes t_n = e^(u0 - n h), n >= 1 (all below its grid),

    h / (k-1)! * sum_n x_n^k B(x_n) G(t_n),   x_n = t_n p_j,   B(z) = e^-z / f(z),

with f(z) = r + (1 - r) e^-z and G(t) = prod_i f(t p_i): the k-th moment's integrand
x^k e^-x G_j(t) with G_j = G / f_j. Both factors have Taylor series at 0 that are
cheap to get: log f(z) = sum_m a_m z^m with a_m = kappa_m (-1)^m / m! (kappa_m the
cumulants of a Bernoulli(1 - r) variable), so log G(t) = sum_m a_m P_m t^m with
P_m = sum_i p_i^m (one set of coefficients per row) and log B(z) = -z - log f(z)
(one set for all keys). With G = sum_a A_a t^a and B = sum_b B_b z^b, the sum is

    h / (k-1)! * p_j^k * sum_b (B_b D_b) p_j^b,   D_b = sum_a A_a S_(k+a+b),

truncated at a + b <= TAYLOR_TERMS, with S_q = sum_n t_n^q = e^(q (u0 - h)) / (1 - e^(-q h)):
per key, a polynomial in p_j of degree TAYLOR_TERMS with per-row coefficients.

Accuracy: the product x^k B(x) G(t) = x^k e^-x G_j(t) is entire in t, and as the row sums
to 1 its n-th Taylor coefficient is at most sqrt(2 pi n) / n! (Cauchy's bound on the
circle |t| = n), so at u0 = -2 and 8 terms the part left out is below 1e-15 relative to
M_k(j) >= p_j^k.
"""

from __future__ import annotations

import functools
import math

import numpy as np

#: Taylor terms (beyond the constant) of the integrands at t = 0.
TAYLOR_TERMS = 8


def _cumulant_polynomials(count: int) -> tuple[tuple[int, ...], ...]:
    """Integer coefficients (in powers of s) of the Bernoulli(s) cumulants kappa_1..kappa_count.

    kappa_1 = s and kappa_(n+1) = s (1 - s) d kappa_n / ds.
    """
    polynomial = [0, 1]
    found = []
    for _ in range(count):
        found.append(tuple(polynomial))
        derivative = [k * c for k, c in enumerate(polynomial)][1:]
        polynomial = [0] * (len(derivative) + 2)
        for k, c in enumerate(derivative):  # times s - s^2
            polynomial[k + 1] += c
            polynomial[k + 2] -= c
    return tuple(found)


_CUMULANT_POLYNOMIALS = _cumulant_polynomials(TAYLOR_TERMS)


@functools.lru_cache(maxsize=64)
def log_factor_coefficients(drop_ratio: float) -> np.ndarray:
    """a_1..a_K with log(r + (1 - r) e^-z) = sum_m a_m z^m, K = TAYLOR_TERMS (read-only, cached)."""
    s = 1.0 - drop_ratio
    kappas = [sum(c * s**k for k, c in enumerate(coefficients)) for coefficients in _CUMULANT_POLYNOMIALS]
    coefficients = np.array([kappa * (-1.0) ** m / math.factorial(m) for m, kappa in enumerate(kappas, start=1)])
    coefficients.flags.writeable = False
    return coefficients


@functools.lru_cache(maxsize=64)
def key_series(drop_ratio: float) -> np.ndarray:
    """B_0..B_K with e^-z / (r + (1 - r) e^-z) = sum_b B_b z^b (read-only, cached)."""
    logs = -log_factor_coefficients(drop_ratio)
    logs[0] -= 1.0
    series = exp_series(logs)
    series.flags.writeable = False
    return series


def exp_series(logs: np.ndarray) -> np.ndarray:
    """Taylor coefficients c_0..c_K of exp(sum_{m=1}^K l_m t^m); logs: (K, ...) -> (K + 1, ...).

    The recurrence c_n = (1/n) sum_{m=1}^n m l_m c_(n-m).
    """
    terms = logs.shape[0]
    weighted = logs * np.arange(1, terms + 1).reshape(-1, *[1] * (logs.ndim - 1))
    coefficients = np.empty((terms + 1, *logs.shape[1:]))
    coefficients[0] = 1.0
    for n in range(1, terms + 1):
        coefficients[n] = np.einsum("m...,m...->...", weighted[:n], coefficients[n - 1 :: -1][:n]) / n
    return coefficients


def geometric_sums(first_u: float, step: float, lowest: int) -> np.ndarray:
    """S_q = sum_{n >= 1} e^(q (first_u - n step)) for q = lowest .. lowest + TAYLOR_TERMS."""
    powers = np.arange(lowest, lowest + TAYLOR_TERMS + 1, dtype=float)
    return np.exp(powers * (first_u - step)) / -np.expm1(-powers * step)


class LeftTails:
    """Closed-form left tails for the rows p (R, N) at drop ratio r (0 < r < 1)."""

    def __init__(self, p: np.ndarray, drop_ratio: float):
        self.p = p
        factor_logs = log_factor_coefficients(drop_ratio)  # (K,)
        power = p.copy()
        power_sums = []
        for _ in range(TAYLOR_TERMS):
            power_sums.append(power.sum(axis=1))
            power *= p
        self.row_series = exp_series(factor_logs[:, None] * np.array(power_sums))  # A_a: (K + 1, R)
        self.key_series = key_series(drop_ratio)  # B_b: (K + 1,)
        self.alone = np.exp((p > 0).sum(axis=1) * math.log(drop_ratio))  # r^m over the present keys
        self.powers: np.ndarray | None = None

    def moments(self, first_u: float, steps: tuple[float, ...], order: int) -> np.ndarray:
        """(len(steps), R, N): h / (k-1)! sum_{n >= 1} x_n^k B(x_n) G(t_n) for every key, k = order."""
        terms = TAYLOR_TERMS
        index = np.add.outer(np.arange(terms + 1), np.arange(terms + 1))
        coefficients = []
        for step in steps:
            # D_b = sum_a S_(k+a+b) A_a over a + b <= K: a Hankel matrix times the row series.
            sums = np.append(geometric_sums(first_u, step, order), 0.0)
            hankel = sums[np.where(index <= terms, index, terms + 1)]
            scale = step / math.factorial(order - 1)
            coefficients.append(scale * self.key_series[:, None] * (hankel @ self.row_series))  # of p_j^b
        if self.powers is None:  # p_j^0 .. p_j^K, shared by every call
            self.powers = np.empty((terms + 1, *self.p.shape))
            self.powers[0] = 1.0
            for b in range(1, terms + 1):
                np.multiply(self.powers[b - 1], self.p, out=self.powers[b])
        return np.einsum("sbr,brn->srn", np.array(coefficients), self.powers) * self.powers[order]

    def marginal(self, first_u: float, step: float) -> np.ndarray:
        """(R,): h sum_{n >= 1} t_n (G(t_n) - r^m), the absent-key integrand's left tail."""
        series = self.row_series.copy()
        series[0] -= self.alone
        return step * np.einsum("a,ar->r", geometric_sums(first_u, step, 1), series)
