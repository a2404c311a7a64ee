"""Exact moments of DropKey attention weights by enumerating every keep mask.

For one row p of N weights and drop ratio r, each key is kept independently
with probability 1 - r, and a kept mask b gives weights w_j = b_j p_j / sum_k b_k p_k.
Summing over all 2^N masks, weighted by their probabilities, gives E[w_j^k]
exactly (up to float64 rounding). This is the specification the integral method
is checked against; its cost is 2^N * N per row, so it is limited to
:data:`ENUMERATE_MAX_KEYS` keys.

Masks whose kept keys all have zero weight (the all-dropped event) contribute 0
here (the ``zero`` convention of :func:`theory.conventions.renormalise_kept`); the
other conventions of docs/theory.md section 1 are added in one place,
:mod:`theory.smoothing`.
"""

from __future__ import annotations

import numpy as np

from theory.conventions import AllDropped, renormalise_kept

#: Largest row length the enumeration accepts: 2^18 masks x 18 keys.
ENUMERATE_MAX_KEYS = 18

# Bound on the (row, mask, key) float64 entries of one block's arrays (~64 MB each; a block holds a few).
_MAX_BLOCK_ENTRIES = 8_000_000


def all_keep_masks(n_keys: int) -> np.ndarray:
    """All 2^n keep masks as a (2^n, n) boolean array; row m is the binary digits of m."""
    codes = np.arange(2**n_keys, dtype=np.int64)[:, None]
    return ((codes >> np.arange(n_keys, dtype=np.int64)) & 1).astype(bool)


def enumerated_weight_moment(rows: np.ndarray, drop_ratio: float, order: int) -> np.ndarray:
    """E[w_j^order] under the zero convention, by summing over all keep masks.

    rows: (R, N) float64, validated attention rows with N <= ENUMERATE_MAX_KEYS.
    Returns an (R, N) array.
    """
    n_rows, n_keys = rows.shape
    if n_keys > ENUMERATE_MAX_KEYS:
        raise ValueError(
            f"method='enumerate' supports rows of at most {ENUMERATE_MAX_KEYS} keys "
            f"(2^N masks), got N = {n_keys}; use method='integral'"
        )
    masks = all_keep_masks(n_keys)  # (M, N)
    n_kept = masks.sum(axis=1)
    with np.errstate(divide="ignore"):  # log(0) when r == 0: those masks get probability 0
        log_prob = n_kept * np.log1p(-drop_ratio) + (n_keys - n_kept) * np.log(drop_ratio)
    mask_prob = np.exp(log_prob)  # (M,)

    moment = np.empty_like(rows)
    block = max(1, _MAX_BLOCK_ENTRIES // (masks.shape[0] * n_keys))
    for start in range(0, n_rows, block):
        p = rows[start : start + block]  # (b, N)
        weights = renormalise_kept(p[:, None, :], masks[None, :, :], AllDropped.ZERO)  # (b, M, N)
        moment[start : start + block] = np.einsum("m,bmn->bn", mask_prob, weights**order)
    return moment


def enumerated_centred_moments(rows: np.ndarray, drop_ratio: float, *, per_weight: bool = False) -> np.ndarray:
    """E[Y_j^k | key j kept] for k = 1, 2 by summing over all keep masks: shape (2, R, N).

    Y_j = p_j / (p_j + S) - p_j / T, the kept weight's distance from its all-kept value
    (:mod:`theory.centred`, the integral form), formed per mask as (p_j / K) (D / T) from the
    kept total K and the dropped total D of the others, never as a difference. 0 < drop_ratio < 1;
    rows as :func:`enumerated_weight_moment`. With ``per_weight``, entry 0 is (1 - r) E[Y_j / p_j |
    key j kept] = E[D / (K T) ; j kept] instead, each term formed in logs (+inf only where the sum
    exceeds float64's range), and entry 1 is 0, as :func:`theory.centred.centred_kept_moments`.
    """
    n_rows, n_keys = rows.shape
    masks = all_keep_masks(n_keys)  # (M, N)
    n_kept = masks.sum(axis=1)
    # P(mask) / (1 - r): the probability of the other keys' mask given that the kept key j is kept.
    log_given_kept = (n_kept - 1) * np.log1p(-drop_ratio) + (n_keys - n_kept) * np.log(drop_ratio)
    if per_weight:
        log_kept_mask = log_given_kept + np.log1p(-drop_ratio)  # P(mask), j kept
        return np.stack([_per_weight_excess(rows, masks, log_kept_mask), np.zeros_like(rows)])
    given_kept = np.exp(log_given_kept)
    moments = np.empty((2, n_rows, n_keys))
    block = max(1, _MAX_BLOCK_ENTRIES // (masks.shape[0] * n_keys))
    for start in range(0, n_rows, block):
        p = rows[start : start + block]  # (b, N)
        kept_total = p @ masks.T  # (b, M)
        dropped_total = p @ (~masks).T
        share = np.divide(p[:, None, :], kept_total[:, :, None], out=np.zeros((p.shape[0], *masks.shape)),
                          where=masks[None] & (kept_total[:, :, None] > 0))  # p_j / K where j is kept
        distance = share * (dropped_total / p.sum(axis=1, keepdims=True))[:, :, None]
        moments[0, start : start + block] = np.einsum("m,bmn->bn", given_kept, distance)
        moments[1, start : start + block] = np.einsum("m,bmn->bn", given_kept, distance**2)
    return moments


def _per_weight_excess(rows: np.ndarray, masks: np.ndarray, log_probability: np.ndarray) -> np.ndarray:
    """sum over masks keeping j of P(mask) D / (K T), per (row, key), from logs: (R, N)."""
    excess = np.zeros_like(rows)
    block = max(1, _MAX_BLOCK_ENTRIES // (masks.shape[0] * rows.shape[1]))
    for start in range(0, rows.shape[0], block):
        p = rows[start : start + block]
        with np.errstate(divide="ignore"):  # log 0: masks that keep nothing present, or drop nothing
            log_kept, log_dropped = np.log(p @ masks.T), np.log(p @ (~masks).T)  # (b, M)
        log_terms = log_probability[None, :] + log_dropped - log_kept - np.log(p.sum(axis=1, keepdims=True))
        counted = masks[None] & (p[:, None, :] > 0) & np.isfinite(log_terms)[:, :, None]  # (b, M, N)
        with np.errstate(over="ignore"):
            excess[start : start + block] = np.where(counted, np.exp(log_terms)[:, :, None], 0.0).sum(axis=1)
    return excess
