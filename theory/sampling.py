"""Monte-Carlo estimate of DropKey's expected attention: the check, not the method.

Samples keep masks b ~ Bernoulli(1 - r) per key, forms w = b p / sum(b p) (an
all-dropped row follows the chosen convention) and averages. Used by the
property tests (agreement with the exact value within 5 standard errors) and by
the benchmark (how slow sampling is next to the exact integral).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from theory.checks import check_drop_ratio, check_int
from theory.conventions import DEFAULT, check_all_dropped, renormalise_kept
from theory.seeding import generator, root_sequence
from theory.validation import check_attention_rows

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
    all_dropped: str = DEFAULT,
) -> SampledAttention:
    """Monte-Carlo mean of DropKey weights for one row p, with its standard error.

    Masks are drawn from ``theory.seeding.generator(root_sequence(seed))`` (the stream of
    ``numpy.random.default_rng(seed)``); a SeedSequence may be passed so callers derive child
    seeds. All-dropped masks follow ``all_dropped`` (default ``"uniform"``, 1/N' on the present
    keys). Memory is bounded by sampling in chunks (the result does not depend on the chunking).
    """
    rows, batch_shape = check_attention_rows(p)
    if batch_shape:
        raise ValueError(f"p must be one row (1-D) here, got shape {(*batch_shape, rows.shape[1])}")
    r = check_drop_ratio(drop_ratio)
    convention = check_all_dropped(all_dropped)
    num_samples = check_int(num_samples, "num_samples", 2)
    row = rows[0]
    present = row > 0

    rng = generator(root_sequence(seed))
    total = np.zeros_like(row)
    total_sq = np.zeros_like(row)
    chunk = max(1, _MAX_CHUNK_ENTRIES // row.size)
    for start in range(0, num_samples, chunk):
        size = min(chunk, num_samples - start)
        kept = rng.random((size, row.size)) >= r  # (S, N)
        weights = renormalise_kept(row, kept, convention, present=present)  # (S, N)
        total += weights.sum(axis=0)
        total_sq += (weights**2).sum(axis=0)
    mean = total / num_samples
    variance = np.maximum(total_sq / num_samples - mean**2, 0.0) * num_samples / (num_samples - 1)
    return SampledAttention(mean, np.sqrt(variance / num_samples), num_samples)
