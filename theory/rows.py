"""ViT-like attention rows: the one generator of random rows the suite uses.

A ViT-like row is the softmax of Gaussian logits, p = softmax(logit_std * z) with
z ~ N(0, I_N); with logit_std = 2 its peak and entropy resemble those of trained
ViT attention rows. The theory summary, the derivations' numeric cross-checks,
the simulations and the benchmark all draw their rows here, so "ViT-like" means
one thing everywhere. Rows come back in key order (unsorted); callers that need
them sorted sort them.

The draw is ``logit_std * rng.standard_normal((n_rows, n_keys))``, which takes the
same values from the stream as ``rng.normal(0, logit_std, (n_rows, n_keys))``.
"""

from __future__ import annotations

import numpy as np

from theory.seeding import generator, root_sequence

#: Keys of a ViT-B/16 row at 224 px: 14 x 14 patches plus the class token.
VIT_KEYS = 197
#: Standard deviation of the Gaussian logits of a ViT-like row.
LOGIT_STD = 2.0


def softmax_gaussian_rows(
    rng: np.random.Generator, n_rows: int, n_keys: int, logit_std: float = LOGIT_STD
) -> np.ndarray:
    """``n_rows`` rows softmax(logit_std * z), z ~ N(0, I), drawn from ``rng``: shape (n_rows, n_keys)."""
    logits = logit_std * rng.standard_normal((n_rows, n_keys))
    weights = np.exp(logits - logits.max(axis=1, keepdims=True))
    return weights / weights.sum(axis=1, keepdims=True)


def vit_like_row(seed: int = 0, n_keys: int = VIT_KEYS, logit_std: float = LOGIT_STD) -> np.ndarray:
    """One ViT-like row, (n_keys,), from a generator seeded by ``SeedSequence(seed)``."""
    return softmax_gaussian_rows(generator(root_sequence(seed)), 1, n_keys, logit_std)[0]
