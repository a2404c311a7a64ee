"""Exact and symbolic theory of DropKey (Li et al., CVPR 2023).

Numeric API (the contract other packages call):

- :func:`expected_attention` -- E[w] under DropKey, exact.
- :func:`smoothing_coefficients` -- c with E[w] = c * p.
- :func:`attention_variance` -- Var[w] under DropKey, exact.
- :func:`sampled_expected_attention` -- the Monte-Carlo check (sampled masks).
- :func:`dropout_expected_attention`, :func:`dropout_attention_variance` -- the
  same for post-softmax (inverted) attention dropout.

The exact functions take one row (N,), any batch (..., N) or a torch tensor (a
float64 tensor comes back, on its device); :mod:`theory.integral` documents the
batched method and its memory bound (``workspace_bytes``, default
:data:`MAX_WORKSPACE_BYTES`), docs/theory_numerics.md its numerics.

Symbolic derivations live in :mod:`theory.derivations` (imported lazily: sympy is slow to load).
"""

from theory.conventions import ALL_DROPPED_CONVENTIONS
from theory.enumeration import ENUMERATE_MAX_KEYS
from theory.integral import MAX_WORKSPACE_BYTES
from theory.sampling import SampledAttention, sampled_expected_attention
from theory.smoothing import (
    AUTO_ENUMERATE_MAX_KEYS,
    METHODS,
    attention_variance,
    dropout_attention_variance,
    dropout_expected_attention,
    expected_attention,
    smoothing_coefficients,
)
from theory.validation import ROW_SUM_TOLERANCE

__all__ = [
    "ALL_DROPPED_CONVENTIONS",
    "AUTO_ENUMERATE_MAX_KEYS",
    "ENUMERATE_MAX_KEYS",
    "MAX_WORKSPACE_BYTES",
    "METHODS",
    "ROW_SUM_TOLERANCE",
    "SampledAttention",
    "attention_variance",
    "dropout_attention_variance",
    "dropout_expected_attention",
    "expected_attention",
    "sampled_expected_attention",
    "smoothing_coefficients",
]
