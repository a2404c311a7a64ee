"""Exact moments of DropKey attention weights from the integral representation.

Derivation (checked symbolically in :mod:`theory.derivations`). For a kept key j
with weight p_j, let S = sum_{i != j} b_i p_i over the other *present* keys
(p_i > 0), m of them, each kept with probability 1 - r. Using
1/x^k = 1/(k-1)! * integral_0^inf t^(k-1) e^(-t x) dt and independence,

    E[1/(p_j + S)^k] = 1/(k-1)! * integral_0^inf t^(k-1) e^(-t p_j) G_j(t) dt,
    G_j(t) = E[e^(-t S)] = prod_{i != j} (r + (1 - r) e^(-t p_i)).

G_j tends to r^m (all others dropped) as t -> inf. We split that constant off,
which integrates in closed form, and keep the *regular part*

    Reg_k(j) = 1/(k-1)! * integral_0^inf t^(k-1) e^(-t p_j) (G_j(t) - r^m) dt  >= 0,

so that, exactly and with no cancellation,

    E[w_j^k] = (1 - r) * (r^m + p_j^k Reg_k(j))          (zero convention)
    c_j      = (1 - r) * (r^m / p_j + Reg_1(j)).

Numerics. With t = e^u the integrand is an entire function of u that decays
like e^(k u) as u -> -inf and double-exponentially once t p is large, so the
trapezoidal rule on a uniform u-grid converges geometrically in the step h. We
halve h until successive estimates agree to INTEGRAL_RTOL. Everything is evaluated
in log space:  G_j(t) - r^m = r^m * expm1(A_j(t)),
A_j(t) = sum_{i != j} log1p(((1 - r)/r) e^(-t p_i)),
so no product underflows, even for r^m far below 1e-308.

Cost: O(R * N * nodes) for R rows of N keys; each node costs one pass over the
row, shared by all N coefficients (the leave-one-out sum A_j is a subtraction).
"""

from __future__ import annotations

import logging
import math

import numpy as np

log = logging.getLogger(__name__)

#: Convergence target of the step-halving loop: it stops once successive estimates
#: agree to this relative tolerance. The error it reaches is smaller, because the
#: trapezoidal rule converges geometrically and the last halving gains many digits:
#: below 1e-14 relative (at most 9.5e-15) against 30-digit mpmath on every
#: coefficient of ViT-like rows with N <= 577 at r = 0.1, and on all 197 keys for
#: r from 0.001 to 0.99 (benchmarks/bench_theory.py, results/theory_cpu.md).
INTEGRAL_RTOL = 1e-13
_FIRST_STEP = 0.5  # initial trapezoid step in u = log t
_MAX_HALVINGS = 8  # step never goes below 0.5 / 2^8
_LOWER_U = -40.0  # e^(-40) ~ 4e-18: truncation below is far under rtol
_MAX_BLOCK_ENTRIES = 2_000_000  # (rows x nodes x keys) float64 entries held at once


def _upper_u(p_min: float, n_keys: int, order: int) -> float:
    """Upper end of the u-grid: beyond it, every regular-part tail is below ~1e-17.

    The regular integrand of key j is at most m t^(k-1) e^(-t (p_j + p_other_min)),
    and every scale it is compared with is at least 1, so t_max * p_min of about
    45 + log(N / p_min), times the order for the t^(k-1) factor, is enough.
    """
    t_max = order * (45.0 + math.log(n_keys / p_min)) / p_min
    return math.log(t_max)


def _log_integrand(u: np.ndarray, rows: np.ndarray, drop_ratio: float, order: int) -> np.ndarray:
    """log of the regular-part integrand (including dt = t du) at nodes u.

    u: (M,) nodes; rows: (R, N). Returns (R, M, N); -inf where the integrand is 0.

    We write G_j - r^m = G_j * (1 - r^m / G_j) = G_j * (-expm1(-A_j)) and take
    log G_j = sum_{i != j} log(r + (1 - r) e^(-t p_i)) directly, each factor by
    logaddexp: writing G_j as r^m e^(A_j) instead would cancel two numbers of size
    m |log r| (1e4 for a 577-key row at r = 1e-15) and lose 1e-12 of accuracy.
    """
    log_r = math.log(drop_ratio)
    log_keep = math.log1p(-drop_ratio)
    log_q = log_keep - log_r  # log((1 - r) / r), finite for any r in (0, 1)
    present = rows > 0  # (R, N); an absent key's factor is 1 (log 0)
    x = np.exp(u)[None, :, None] * rows[:, None, :]  # (R, M, N)  t * p_i
    log_factor = np.where(present[:, None, :], np.logaddexp(log_r, log_keep - x), 0.0)
    log_ratio = np.where(present[:, None, :], np.logaddexp(0.0, log_q - x), 0.0)  # log(factor / r)
    log_g = log_factor.sum(axis=2, keepdims=True) - log_factor  # log G_j, leave-one-out
    leave_one_out = np.maximum(log_ratio.sum(axis=2, keepdims=True) - log_ratio, 0.0)  # A_j
    with np.errstate(divide="ignore"):  # A_j == 0 -> log(0) = -inf, integrand 0
        log_excess = np.log(-np.expm1(-leave_one_out))
    return order * u[None, :, None] - x + np.minimum(log_g, 0.0) + log_excess - math.lgamma(order)


def _trapezoid_sum(u: np.ndarray, rows: np.ndarray, drop_ratio: float, order: int) -> np.ndarray:
    """sum over nodes of the integrand, (R, N); the caller multiplies by the step.

    Nodes are processed in chunks so memory stays under _MAX_BLOCK_ENTRIES entries.
    """
    chunk = max(1, _MAX_BLOCK_ENTRIES // rows.size)
    total = np.zeros_like(rows)
    for start in range(0, u.size, chunk):
        total += np.exp(_log_integrand(u[start : start + chunk], rows, drop_ratio, order)).sum(axis=1)
    return total


def regular_part(rows: np.ndarray, drop_ratio: float, order: int) -> np.ndarray:
    """Reg_order(j) for every key of every row, (R, N). Requires 0 < drop_ratio < 1."""
    if not 0.0 < drop_ratio < 1.0:
        raise ValueError(f"regular_part needs 0 < drop_ratio < 1, got {drop_ratio!r}")
    n_rows, n_keys = rows.shape
    result = np.empty_like(rows)
    # Rows share a grid within a block; a block holds at least 256 nodes per chunk.
    block_rows = max(1, _MAX_BLOCK_ENTRIES // (256 * n_keys))
    for start in range(0, n_rows, block_rows):
        result[start : start + block_rows] = _regular_part_block(
            rows[start : start + block_rows], drop_ratio, order
        )
    return result


def _regular_part_block(rows: np.ndarray, drop_ratio: float, order: int) -> np.ndarray:
    p_min = float(rows[rows > 0].min())
    u_hi = _upper_u(p_min, rows.shape[1], order)
    step = _FIRST_STEP
    n_intervals = int(math.ceil((u_hi - _LOWER_U) / step))
    node_sum = _trapezoid_sum(_LOWER_U + step * np.arange(n_intervals + 1), rows, drop_ratio, order)
    estimate = step * node_sum

    # What each estimate is compared with: E[1/(p_j + S)^k] = r^m / p_j^k + Reg,
    # or Reg alone for an absent key (p_j = 0).
    present = rows > 0
    n_others = present.sum(axis=1, keepdims=True) - present
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        singular = np.where(present, np.exp(n_others * math.log(drop_ratio)) / rows**order, 0.0)

    for _ in range(_MAX_HALVINGS):
        midpoints = _LOWER_U + step * (np.arange(n_intervals) + 0.5)
        node_sum = node_sum + _trapezoid_sum(midpoints, rows, drop_ratio, order)
        n_intervals *= 2
        step /= 2
        refined = step * node_sum
        change = np.abs(refined - estimate)
        estimate = refined
        if np.all(change <= INTEGRAL_RTOL * (estimate + singular)):
            return estimate
    worst = float(np.max(change / np.maximum(estimate + singular, np.finfo(float).tiny)))
    raise RuntimeError(
        f"integral method did not reach rtol {INTEGRAL_RTOL:g} after {_MAX_HALVINGS} step "
        f"halvings (last relative change {worst:.3g}); please report this row"
    )
