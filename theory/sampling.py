"""Monte-Carlo estimate of DropKey's expected attention: the check, not the method.

Samples keep masks b ~ Bernoulli(1 - r) per key, forms w = b p / sum(b p) (an
all-dropped row follows the chosen convention) and averages. Used by the
property tests (agreement with the exact value within 5 standard errors) and by
the benchmark (how slow sampling is next to the exact integral).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from theory.validation import (
    ALL_DROPPED_CONVENTIONS,
    check_attention_rows,
    check_drop_ratio,
    check_option,
)

# Bound on (samples x keys) float64 entries per chunk (~32 MB).
_MAX_CHUNK_ENTRIES = 4_000_000


@dataclass(frozen=True)
class SampledAttention:
    """Sample mean and standard error of the weights, each of shape (N,)."""

    mean: np.ndarray
    standard_error: np.ndarray
    num_samples: int


def sampled_expected_attention(
    p: object,
    drop_ratio: object,
    *,
    num_samples: int,
    seed: int | np.random.SeedSequence,
    all_dropped: str = "zero",
) -> SampledAttention:
    """Monte-Carlo mean of DropKey weights for one row p, with its standard error.

    Masks are drawn from ``numpy.random.default_rng(seed)``; a SeedSequence may be
    passed so callers derive child seeds. Memory is bounded by sampling in chunks
    (the result does not depend on the chunking).
    """
    rows, batch_shape = check_attention_rows(p)
    if batch_shape:
        raise ValueError(f"p must be one row (1-D) here, got shape {(*batch_shape, rows.shape[1])}")
    r = check_drop_ratio(drop_ratio)
    convention = check_option(all_dropped, ALL_DROPPED_CONVENTIONS, name="all_dropped")
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 2:
        raise ValueError(f"num_samples must be an integer >= 2, got {num_samples!r}")
    row = rows[0]
    present = row > 0
    fallback = {
        "zero": np.zeros_like(row),
        "uniform": present / present.sum(),
        "undropped": row,
    }[convention]

    rng = np.random.default_rng(seed)
    total = np.zeros_like(row)
    total_sq = np.zeros_like(row)
    chunk = max(1, _MAX_CHUNK_ENTRIES // row.size)
    for start in range(0, num_samples, chunk):
        size = min(chunk, num_samples - start)
        kept = rng.random((size, row.size)) >= r  # (S, N)
        kept_weight = kept * row  # (S, N)
        norm = kept_weight.sum(axis=1, keepdims=True)  # (S, 1)
        weights = np.where(norm > 0, kept_weight / np.where(norm > 0, norm, 1.0), fallback)
        total += weights.sum(axis=0)
        total_sq += (weights**2).sum(axis=0)
    mean = total / num_samples
    variance = np.maximum(total_sq / num_samples - mean**2, 0.0) * num_samples / (num_samples - 1)
    return SampledAttention(mean, np.sqrt(variance / num_samples), num_samples)
