"""Measures: what each claim reads from the evidence (:mod:`reports.evidence`), as numbers or paired samples.

A measure returns ``None`` when the study or experiment it reads did not run (the claim is then
"not yet measured"), and raises :class:`~reports.evidence.EvidenceError` when it ran but lacks
what the measure needs. Paired samples (:class:`~reports.evidence.Sample`) hold one difference
per independent unit -- a seed, a simulated problem, an attention row -- for
:func:`reports.statistics.paired_decision`; which unit is which is stated per claim in the
registry (:mod:`reports.claims`).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from reports.evidence import Evidence, EvidenceError, Sample
from theory.conventions import entropy

# --- the theory ---------------------------------------------------------------------------------


def derivation_statuses(evidence: Evidence, keys: tuple[str, ...]) -> dict[str, str]:
    """Status of each derivation ("missing" if the theory was not run in this build)."""
    return {key: evidence.derivations[key]["status"] if key in evidence.derivations else "missing" for key in keys}


# --- simulation studies -------------------------------------------------------------------------


def coverage_samples(evidence: Evidence) -> list[Sample] | None:
    """Per attention row of the coefficients study: the coverage of its CLT-reliable intervals minus nominal."""
    from simulations.coefficients import coverage_by_row

    if not evidence.ran("coefficients"):
        return None
    nominal = float(evidence.summary("coefficients", "nominal_coverage"))
    frame = evidence.frame("coefficients", "covered", "clt_reliable", "repeat")
    return [Sample("coverage_minus_nominal", "", coverage_by_row(frame) - nominal)]


def _row_groups(frame: pd.DataFrame):
    """Rows of the coefficients study (first repeat), one group per (N, shape, r, convention)."""
    first = frame[frame["repeat"] == frame["repeat"].min()]
    return first.sort_values("key").groupby(["n_keys", "shape", "drop_ratio", "all_dropped"], sort=True)


def order_counts(evidence: Evidence) -> dict[str, int] | None:
    """Exact c and E[w] = c p on every row of the coefficients study: count order violations (exact, no noise)."""
    if not evidence.ran("coefficients"):
        return None
    frame = evidence.frame("coefficients", "p", "c_exact", "key", "repeat")
    c_violations = w_violations = max_violations = entropy_violations = pairs = rows = 0
    for _, group in _row_groups(frame):
        p = group["p"].to_numpy()
        c = group["c_exact"].to_numpy()
        w = c * p
        strictly = p[:-1] > p[1:] * (1 + 1e-9)  # adjacent keys with strictly decreasing p
        pairs += int(strictly.sum())
        c_violations += int((c[:-1] >= c[1:])[strictly].sum())
        w_violations += int((w[:-1] <= w[1:])[strictly].sum())
        q = w / w.sum()
        max_violations += int(q.max() > p.max() * (1 + 1e-12))
        entropy_violations += int(entropy(q) < entropy(p) - 1e-12)
        rows += 1
    return {"pairs": pairs, "rows": rows, "c_order_violations": c_violations, "w_order_violations": w_violations,
            "max_violations": max_violations, "entropy_violations": entropy_violations}


def _toy_frame(evidence: Evidence) -> pd.DataFrame:
    """The toy study's frame, with the settings its helpers read (a CSV read back loses pandas attrs)."""
    frame = evidence.frame("toy_optimisation", "regulariser", "drop_ratio", "problem", "step", "peak_weight")
    frame = frame.copy()
    frame.attrs["far_fraction"] = float(evidence.summary("toy_optimisation", "far_fraction"))
    frame.attrs["target_norm"] = float(evidence.summary("toy_optimisation", "target_norm"))
    return frame


def toy_peak_samples(evidence: Evidence, regulariser_a: str, regulariser_b: str, quantity: str) -> list[Sample] | None:
    """Per r: per problem, final peak(a) - peak(b) of the toy optimisation (paired by problem)."""
    from simulations.toy_optimisation import final_differences

    if not evidence.ran("toy_optimisation"):
        return None
    try:
        differences = final_differences(_toy_frame(evidence), "peak_weight", regulariser_a, regulariser_b)
    except ValueError as error:
        raise EvidenceError(f"toy_optimisation: {error}") from None
    return [Sample(quantity, label, values) for label, values in differences.items()]


#: The links of the rich-get-richer chain, each its own quantity (toy records far from the optimum).
CHAIN_LINKS = (
    "a_sum_p_beta_below_m",
    "b_grad_beta_top_below_second",
    "c_beta_gap_grows_next",
    "d_total_has_target_term_sign",
    "e_eq11_negative",
    "e_logit_gap_grows_next",
)


def chain_samples(evidence: Evidence) -> list[Sample] | None:
    """Per link: per problem, the fraction of its far-from-optimum records where the link holds, minus 1/2."""
    from simulations.toy_optimisation import link_fractions_by_problem

    if not evidence.ran("toy_optimisation"):
        return None
    fractions = link_fractions_by_problem(_toy_frame(evidence), "none")
    return [
        Sample("link_fraction_minus_half", link, fractions[link].to_numpy(np.float64) - 0.5) for link in CHAIN_LINKS
    ]


def damping_samples(evidence: Evidence) -> list[Sample] | None:
    """Per r, far from the optimum: per attention row, log(beta-gradient ratio / undamped ratio)."""
    from simulations.gradient_damping import log_damping_by_row

    if not evidence.ran("gradient_damping"):
        return None
    frame = evidence.frame("gradient_damping", "ratio_exact", "ratio_mc", "ratio_undamped", "beta_mean")
    return [Sample("log_damping", label, values) for label, values in log_damping_by_row(frame, 0.0).items()]


def first_order_errors(evidence: Evidence) -> dict[str, float] | None:
    """Per far cell, the median |error| of the paper's first-order ratio against the exact one (no noise)."""
    if not evidence.ran("gradient_damping"):
        return None
    cells = evidence.summary("gradient_damping", "cells")
    errors = {}
    for name, cell in sorted(cells.items()):
        if name.startswith("beta_mean=0,"):
            value = cell.get("median_abs_ratio_error_first_order_vs_exact")
            if value is None:
                value = cell.get("median_abs_ratio_error_first_order_vs_mc")
            if value is None:
                raise EvidenceError(f"gradient_damping cell {name!r} has no first-order error")
            errors[name.split(",", 1)[1]] = float(value)
    if not errors:
        raise EvidenceError("gradient_damping ran without a far-from-optimum cell (beta_mean = 0)")
    return errors


def structured_samples(evidence: Evidence) -> list[Sample] | None:
    """Per structured cell: per attention row, the first-moment change relative to DropKey's own smoothing."""
    from simulations.structured_masks import relative_change_by_row

    if not evidence.ran("structured_masks"):
        return None
    frame = evidence.frame("structured_masks", "variant", "grid", "shape", "row", "p", "w_mean")
    return [Sample("relative_first_moment_change", label, values)
            for label, values in relative_change_by_row(frame).items()]


def toy_regime_samples(evidence: Evidence) -> list[Sample] | None:
    """Per cell of the toy regime map: per problem, final peak(dropout) - peak(DropKey)."""
    from simulations.toy_regimes import peak_differences

    if not evidence.ran("toy_regimes"):
        return None
    frame = evidence.frame("toy_regimes", "regulariser", "problem", "peak")
    try:
        differences = peak_differences(frame)
    except ValueError as error:
        raise EvidenceError(f"toy_regimes: {error}") from None
    return [Sample("peak_dropout_minus_dropkey", label, values) for label, values in differences.items()]


def mc_rate(evidence: Evidence) -> dict[str, object] | None:
    """The train/test-mismatch study's pooled log-RMS slope of Monte-Carlo inference against K."""
    if not evidence.ran("train_test_mismatch"):
        return None
    slopes = evidence.summary("train_test_mismatch", "slopes")
    return {
        "pooled_slope": float(evidence.summary("train_test_mismatch", "pooled_slope")),
        "pooled_slope_se": float(evidence.summary("train_test_mismatch", "pooled_slope_se")),
        "cells": len(slopes),
        "cells_not_closed": sorted(name for name, entry in slopes.items()
                                   if entry["smallest_k_closer_to_train_than_plain_inference"] is None),
    }


# --- real-ViT experiments ---------------------------------------------------------------------------


def vit_samples(evidence: Evidence, experiment: str, quantities: dict[str, bool]) -> list[Sample] | None:
    """The per-seed values of ``quantities`` (name -> with its covariate) at the experiment's largest scale.

    None (not yet measured) when the experiment has not run, or when its result records none of
    the quantities (it was written before they existed: e.g. a result without the training-image
    evaluation). A result that records some of a claim's quantities but not all is an EvidenceError
    (every claim is measured at quick scale by the tests, so a renamed quantity cannot hide here).
    """
    found = evidence.experiments.get(experiment)
    if found is None or not set(quantities) & found.recorded:
        return None
    return [found.sample(name, with_covariate=covariate) for name, covariate in quantities.items()]


def mechanism_samples(evidence: Evidence) -> list[Sample] | None:
    """Per cell (probed run, checkpoint, ratio), the per-batch differences of the mechanism's two quantities."""
    found = evidence.experiments.get("gradient_mechanism")
    if found is None:
        return None
    return [sample for name in ("peak_step_dropkey_minus_none", "entropy_step_dropkey_minus_none")
            for sample in found.cell_samples(name)]
