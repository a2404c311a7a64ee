"""A short numeric summary of DropKey's smoothing on one ViT-like attention row.

The row: N = 197 keys (a ViT-B/16 sequence), p = softmax of Gaussian logits with
standard deviation 2, drawn from a generator seeded by ``SeedSequence(seed)``
(:func:`theory.rows.vit_like_row`, the suite's one definition of such rows).
For each drop ratio we report the range of the smoothing coefficients c, how the
peak and the entropy of the normalised expected attention q = E[w]/sum E[w]
compare with p's, that sum E[w] = 1 - r^N (zero convention), and how long the
exact integral method took for all 197 coefficients.
"""

from __future__ import annotations

import logging
import time

import numpy as np

from theory.conventions import AllDropped, entropy
from theory.rows import LOGIT_STD, VIT_KEYS, vit_like_row
from theory.smoothing import smoothing_coefficients

log = logging.getLogger(__name__)

DROP_RATIOS = (0.1, 0.3)


def numeric_summary(*, seed: int = 0) -> list[str]:
    """Lines for the CLI: what DropKey does to one ViT-like row at r = 0.1 and 0.3."""
    row = vit_like_row(seed)
    lines = [
        f"ViT-like row: N={VIT_KEYS}, p = softmax of N(0, {LOGIT_STD:g}^2) logits (seed {seed}); "
        f"max p = {row.max():.4f}, entropy p = {entropy(row):.4f} nats (uniform {np.log(VIT_KEYS):.4f})"
    ]
    for drop_ratio in DROP_RATIOS:
        started = time.perf_counter()
        coefficients = smoothing_coefficients(row, drop_ratio, all_dropped=AllDropped.ZERO, method="integral")
        elapsed_ms = 1e3 * (time.perf_counter() - started)
        expected = coefficients * row
        normalised = expected / expected.sum()
        lines.append(
            f"  r={drop_ratio:g}: c in [{coefficients.min():.4f}, {coefficients.max():.4f}]; "
            f"max q = {normalised.max():.4f} (p {row.max():.4f}); "
            f"entropy q = {entropy(normalised):.4f} (p {entropy(row):.4f}); "
            f"sum E[w] - (1 - r^N) = {expected.sum() - (1 - drop_ratio**VIT_KEYS):.1e} "
            f"(r^N = {drop_ratio**VIT_KEYS:.1e}); "
            f"integral method {elapsed_ms:.1f} ms"
        )
        log.debug("summary r=%g done in %.1f ms", drop_ratio, elapsed_ms)
    return lines
