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
