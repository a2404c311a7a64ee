"""Symbolic derivations of the DropKey theory (docs/theory.md sections 1-3), each proved or refuted.

One module per derivation. Each exposes the derived sympy objects as public
functions and a ``check_...()`` returning a :class:`Derivation`; the package
re-exports the checks and the main forms, never a name that shadows a module:

- :mod:`.expected_output` -- E[o] = sum_j c_j p_j v_j, closed form == integral form (Eq. 3).
- :mod:`.row_sum` -- sum_j c_j p_j = 1 - r^N (zero convention).
- :mod:`.smoothing_gap` -- c_s - c_t = r(1-r) int (...) < 0 for p_s > p_t (Eq. 4).
- :mod:`.order` -- order preservation and ratio compression of E[w].
- :mod:`.majorisation` -- E[w]/sum E[w] is majorised by p (max down, entropy up).
- :mod:`.dropout` -- post-softmax inverted dropout: E[w_j] = p_j, Var[w_j] = r/(1-r) p_j^2.
- :mod:`.lagrangian` -- gradients (7), (8), (10) and the difference (11).
- :mod:`.dropkey_gradient` -- the expected beta-gradient under DropKey.

:func:`verify_all` runs every check in that order; a check that raises is
reported as ``status="failed"``, never silently dropped.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from theory.derivations.dropkey_gradient import check_dropkey_gradient
from theory.derivations.dropout import check_dropout_moments
from theory.derivations.expected_output import (
    check_expected_output,
    expected_output_closed_form,
    expected_output_integral_form,
    smoothing_coefficient_closed_form,
    smoothing_coefficient_integral_form,
)
from theory.derivations.lagrangian import check_gradient_difference, check_lagrangian_gradients, lagrangian_gradients
from theory.derivations.majorisation import check_majorisation
from theory.derivations.order import check_order_preservation, check_ratio_compression
from theory.derivations.result import STATUSES, Derivation
from theory.derivations.row_sum import check_row_sum, expected_row_sum
from theory.derivations.smoothing_gap import check_smoothing_gap, smoothing_gap_integral_form

log = logging.getLogger(__name__)

#: (key, check) in the order verify_all runs them.
CHECKS: tuple[tuple[str, Callable[..., Derivation]], ...] = (
    ("expected-output", check_expected_output),
    ("row-sum", check_row_sum),
    ("smoothing-gap", check_smoothing_gap),
    ("order-preservation", check_order_preservation),
    ("ratio-compression", check_ratio_compression),
    ("majorisation", check_majorisation),
    ("dropout-moments", check_dropout_moments),
    ("lagrangian-gradients", check_lagrangian_gradients),
    ("gradient-difference", check_gradient_difference),
    ("dropkey-gradient", check_dropkey_gradient),
)


def verify_all(*, seed: int = 0) -> list[Derivation]:
    """Run every derivation's check; ``seed`` fixes the random rows of the numeric cross-checks."""
    results = []
    for key, check in CHECKS:
        started = time.perf_counter()
        try:
            result = check(seed=seed)
        except Exception as error:  # a broken check is a reportable failure, not a crash
            log.exception("derivation %s raised", key)
            result = Derivation(
                key, key, "the check raised before reaching a verdict", "failed", False, {},
                f"{type(error).__name__}: {error}",
            )
        log.info("%s: %s in %.2f s", key, result.status, time.perf_counter() - started)
        results.append(result)
    return results


__all__ = [
    "CHECKS",
    "STATUSES",
    "Derivation",
    "check_dropkey_gradient",
    "check_dropout_moments",
    "check_expected_output",
    "check_gradient_difference",
    "check_lagrangian_gradients",
    "check_majorisation",
    "check_order_preservation",
    "check_ratio_compression",
    "check_row_sum",
    "check_smoothing_gap",
    "expected_output_closed_form",
    "expected_output_integral_form",
    "expected_row_sum",
    "lagrangian_gradients",
    "smoothing_coefficient_closed_form",
    "smoothing_coefficient_integral_form",
    "smoothing_gap_integral_form",
    "verify_all",
]
