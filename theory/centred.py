"""Centred moments of a kept key's weight, for variances at tiny drop ratios (issue 15).

Var[w_j] from E[w_j^2] - E[w_j]^2 loses everything when the variance is far below
E[w_j]^2: at drop ratio r the variance is O(r) while the moments are O(1), so
``attention_variance([1e-200, 0.3, 0.7], 1e-300)`` came back as 0 where it is about 6e-301
(relative error ~1e-16 / r in general). For r < SMALL_DROP_RATIO :mod:`theory.smoothing`
therefore uses the moments of the kept weight's distance from its all-kept value instead.

For a present key j of a row p (T = sum p) that is kept, X_j = p_j / (p_j + S) with
S = sum_{i != j} b_i p_i, and with every other key kept X_j = x0_j = p_j / T. Then

    Y_j = X_j - x0_j = p_j D / ((p_j + S) T),   D = sum_{i != j} (1 - b_i) p_i,

the weight the dropped others leave, is 0 with probability (1 - r)^m and never
negative, so Var[X_j] = E[Y_j^2] - E[Y_j]^2 suffers no cancellation at small r. With
1/A^k = 1/(k-1)! int_0^oo t^(k-1) e^(-tA) dt and independence of the keys,

    T^k E[Y_j^k] = 1/(k-1)! int_0^oo x_j^k e^(-x_j) G_j(t) B_k(t) dt / t,   x_j = t p_j,
    B_1 = sum_{i != j} a_i,   B_2 = (1 - r) sum_{i != j} a_i b_i + B_1^2,
    a_i = r p_i / f_i,   b_i = p_i e^(-t p_i) / f_i,   f_i = r + (1 - r) e^(-t p_i),

(E[D e^(-tS)] = G_j B_1 and E[D^2 e^(-tS)] = G_j B_2, G_j = prod_{i != j} f_i). Every
term is positive and bounded (a_i <= p_i, b_i <= p_i / (1 - r)); the sums over i != j are
prefix plus suffix sums, never a total minus a part; every factor is formed in logs
(log f_i = logaddexp(log r, log(1 - r) - x_i)), so neither subnormal weights nor
r down to 5e-324 overflow or lose the result.

Numerics. The integrand is a positive mixture, over the keep masks, of the bumps
(tA)^k e^(-tA) (A = p_j + S, with p_j <= A <= T) in u = log t, so the trapezoid on a
uniform u-grid has each bump's relative error, 2 |Gamma(k + 2 pi i / h)| / (k-1)!:
9e-19 (k = 1) and 3e-17 (k = 2) at h = STEP = 0.22. The grid runs from u = LOWER_U
(each bump's part below is under e^(k LOWER_U) / (k h), 3e-18) to t = RIGHT_X / p_min
(each bump's part beyond is under Gamma(k, RIGHT_X) / (k-1)!, 1e-18). No step check is
needed: these bounds hold for every row. The cost is about 10 transcendental functions
per (row, node, key), 200-3,600 nodes per row: it serves the rare extreme drop ratios,
never the committed studies (r >= 0.05).
"""

from __future__ import annotations

import math

import numpy as np

#: Trapezoid step in u = log t.
STEP = 0.22
#: First node; the bumps' parts below it are negligible (e^-42 / 0.22 < 3e-18).
LOWER_U = -42.0
#: The grid ends at t = RIGHT_X / p_min: Gamma(2, 45) = 46 e^-45 < 1e-18.
RIGHT_X = 45.0
#: Below this drop ratio :func:`theory.smoothing.attention_variance` uses these moments.
SMALL_DROP_RATIO = 0.01

# float64 buffers of (rows x nodes x keys) held at once by one piece of nodes, and the cap on
# a piece's entries (cache-sized buffers).
_BUFFERS = 12
_PIECE_ENTRIES = 1 << 16


def centred_kept_moments(rows: np.ndarray, drop_ratio: float, *, workspace_bytes: int,
                         per_weight: bool = False) -> np.ndarray:
    """E[Y_j^k | key j kept] for k = 1, 2: shape (2, R, N), 0 for absent keys.

    rows: (R, N) float64, validated attention rows; 0 < drop_ratio < 1.
    ``workspace_bytes`` bounds the piece buffers (at least one node of one row is processed).
    With ``per_weight``, entry 0 is (1 - r) E[Y_j / p_j | key j kept] = E[D / ((p_j + S) T) ; j kept]
    instead (what a coefficient c_j is made of, formed without dividing by p_j: the integrand's
    x_j = t p_j becomes t, and the factors 1 - r and STEP join it in logs), and entry 1 is not
    computed (0); it is +inf only where it exceeds float64's range (c_j ~ (1 - r) r^m / p_j).
    """
    if not 0.0 < drop_ratio < 1.0:
        raise ValueError(f"centred_kept_moments needs 0 < drop_ratio < 1, got {drop_ratio!r}")
    n_rows, n_keys = rows.shape
    result = np.zeros((2, n_rows, n_keys))
    present = rows > 0
    p_min = np.where(present, rows, np.inf).min(axis=1)
    counts = np.ceil((math.log(RIGHT_X) - np.log(p_min) - LOWER_U) / STEP).astype(np.int64) + 1
    piece_entries = max(n_keys, min(_PIECE_ENTRIES, workspace_bytes // (8 * _BUFFERS)))
    group = max(1, piece_entries // (16 * n_keys))  # rows that share a piece of at least 16 nodes
    by_count = np.argsort(counts, kind="stable")
    for start in range(0, n_rows, group):
        which = by_count[start : start + group]
        result[:, which] = _integrate(rows[which], drop_ratio, int(counts[which].max()), piece_entries, per_weight)
    return result


def _integrate(p: np.ndarray, r: float, n_nodes: int, piece_entries: int, per_weight: bool) -> np.ndarray:
    """(2, R, N): the trapezoid sums for rows p (R, N) on nodes 0..n_nodes-1, divided by T^k
    (with ``per_weight``: the first divided by T p_j, the second 0)."""
    n_rows, n_keys = p.shape
    with np.errstate(divide="ignore"):
        log_p = np.log(p)  # -inf for absent keys: x = 0, f = 1, a = b = 0, no term of their own
    log_r, log_keep = math.log(r), math.log1p(-r)
    sums = np.zeros((2, n_rows, n_keys))
    per_piece = max(1, piece_entries // (n_rows * n_keys))
    for first in range(0, n_nodes, per_piece):
        u = LOWER_U + STEP * np.arange(first, min(n_nodes, first + per_piece))
        log_x = u[None, :, None] + log_p[:, None, :]  # (R, T, N)
        with np.errstate(over="ignore"):
            x = np.exp(log_x)  # +inf beyond float64: e^-x = 0 and f = r, as in the limit
        log_f = np.logaddexp(log_r, log_keep - x)
        log_g = log_f.sum(axis=2, keepdims=True)
        a = p[:, None, :] * np.exp(log_r - log_f)
        b = p[:, None, :] * np.exp(-x - log_f)
        first_sum = _others(a)
        second_sum = (1.0 - r) * _others(a * b) + first_sum**2
        own = log_g - log_f - x  # log(G_j e^-x_j), from logs so that x^k e^-x never meets inf * 0
        if per_weight:  # (1 - r) h t G_j e^-x_j B_1: x_j / p_j = t; beyond float64 only where the sum is
            with np.errstate(under="ignore", over="ignore"):
                sums[0] += (np.exp(u[None, :, None] + own + (log_keep + math.log(STEP))) * first_sum).sum(axis=1)
            continue
        with np.errstate(under="ignore"):
            sums[0] += (np.exp(log_x + own) * first_sum).sum(axis=1)
            sums[1] += (np.exp(2.0 * log_x + own) * second_sum).sum(axis=1)
    total = p.sum(axis=1)[:, None]
    if per_weight:
        return np.where(p > 0, sums / total, 0.0)
    return np.where(p > 0, STEP * sums / np.stack([total, total**2]), 0.0)


def _others(values: np.ndarray) -> np.ndarray:
    """sum_{i != j} values_i along the last axis, as prefix plus suffix sums (positive terms, no cancellation)."""
    before = np.cumsum(values, axis=-1)
    before = np.concatenate([np.zeros_like(values[..., :1]), before[..., :-1]], axis=-1)
    after = np.cumsum(values[..., ::-1], axis=-1)[..., ::-1]
    after = np.concatenate([after[..., 1:], np.zeros_like(values[..., :1])], axis=-1)
    return before + after
