"""The registry of every claim the suite checks, and the rule that turns measured numbers into a verdict.

Each :class:`Claim` names where the paper makes it, the derivations and studies
that measure it, the tests that guard the measuring code, and its verdict rule:
``measure(evidence) -> numbers`` picks the numbers, ``rule(numbers) -> Verdict``
decides, so a rule can be tested on synthetic numbers. ``rule_in_words`` states
the same rule for the reader; verdicts follow from the numbers only.

Statuses: "confirmed", "partly", "not reproduced", "not yet measured".

Caveat policy (the theory flagged two imprecisions): a flagged imprecision that
does not change the claim's conclusion in the paper's setting (Eq. 11 omits
mu_t - mu_s, which is zero for softmax weights since p > 0) leaves a verdict
"confirmed" and is named in the reason; an imprecision that limits where the
claim's formula holds (the DropKey beta-gradient form is exact to leading order
in M only) makes the verdict "partly" when the measured error of that formula
exceeds the tolerance stated in the rule.

Real-ViT claims read the experiments' ``results/<scale>/<experiment>/measurements.csv``
(:mod:`dropkey.experiments`; columns ``claim_id, quantity, value, standard_error, n, scale,
experiment``; accuracies in percentage points). Each claim is judged at the largest scale
measured (full > medium > quick) and its key number names that scale and the number of
seeds. Until a claim's quantities are there it is "not yet measured".
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

STATUSES = ("confirmed", "partly", "not reproduced", "not yet measured")
VIT_SCALES = ("quick", "medium", "full")  # smallest to largest; a claim is judged at the largest measured
VIT_MEASUREMENTS = "measurements.csv"  # in results/<scale>/<experiment>/
VIT_PREFIX = "vit_"  # 'measured_by' names of real-ViT experiments: vit_<experiment>


@dataclass(frozen=True)
class Verdict:
    status: str
    key_number: str
    reason: str

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {self.status!r}")


@dataclass(frozen=True)
class Measurement:
    """One real-ViT quantity: a value, its standard error over seeds (NaN if unknown), n and scale."""

    value: float
    standard_error: float = math.nan
    n: int = 0
    scale: str = ""


@dataclass(frozen=True)
class Evidence:
    """Everything a claim may be measured from."""

    summaries: Mapping[str, dict] = field(default_factory=dict)  # study -> summary.json
    frames: Mapping[str, pd.DataFrame] = field(default_factory=dict)  # study -> results.csv
    derivations: Mapping[str, dict] = field(default_factory=dict)  # key -> derivation record
    vit: Mapping[str, Mapping[str, Measurement]] = field(default_factory=dict)  # claim -> quantity -> value


@dataclass(frozen=True)
class Claim:
    id: str
    statement: str
    source: str
    theory: tuple[str, ...]  # derivation keys (theory.derivations)
    measured_by: tuple[str, ...]  # study names, or vit_<experiment> for real-ViT experiments
    tests: tuple[str, ...]  # pytest node ids
    rule_in_words: str
    measure: Callable[[Evidence], dict[str, Any]]
    rule: Callable[[dict[str, Any]], Verdict]


# --- small helpers ----------------------------------------------------------------------------


def fmt(value: float | None, digits: int = 3) -> str:
    """A number with ``digits`` significant digits ("n/a" for None/NaN)."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:.{digits}g}"


def _not_measured(reason: str) -> Verdict:
    return Verdict("not yet measured", "—", reason)


def _derivation_statuses(evidence: Evidence, keys: tuple[str, ...]) -> dict[str, str]:
    return {key: evidence.derivations[key]["status"] if key in evidence.derivations else "missing" for key in keys}


def _theory_gate(statuses: Mapping[str, str]) -> Verdict | None:
    """A verdict forced by the derivations alone (refuted, failed, missing), else None."""
    refuted = sorted(key for key, status in statuses.items() if status == "refuted")
    if refuted:
        return Verdict("not reproduced", f"refuted: {', '.join(refuted)}", "the derivation refutes the statement as printed")
    missing = sorted(key for key, status in statuses.items() if status == "missing")
    if missing:
        return _not_measured(f"theory not run in this build ({', '.join(missing)})")
    unknown = sorted(key for key, status in statuses.items() if status not in ("proved", "checked"))
    if unknown:
        return _not_measured(f"derivation check failed: {', '.join(unknown)}")
    return None


def _theory_phrase(statuses: Mapping[str, str]) -> str:
    return ", ".join(f"{key} {status}" for key, status in sorted(statuses.items()))


def _significance(value: float, se: float, z: float = 2.0) -> int:
    """+1 if value > z SE, -1 if value < -z SE, else 0 (SE NaN counts as 0: not significant)."""
    if not math.isfinite(se) or se <= 0:
        return 0
    return 1 if value > z * se else (-1 if value < -z * se else 0)


# --- measures: pick numbers out of the evidence -----------------------------------------------


def _measure_theory(*keys: str, study: str | None = None, extra: Callable[[Evidence], dict] | None = None):
    def measure(evidence: Evidence) -> dict[str, Any]:
        numbers: dict[str, Any] = {"derivations": _derivation_statuses(evidence, keys)}
        if extra is not None and (study is None or study in evidence.summaries):
            numbers.update(extra(evidence))
        return numbers

    return measure


def _coverage(evidence: Evidence) -> dict[str, Any]:
    summary = evidence.summaries["coefficients"]
    return {
        "coverage": summary["coverage_clt_reliable"],
        "nominal": summary["nominal_coverage"],
        "coverage_se": summary["coverage_clt_reliable_se_conservative"],
    }


def _row_groups(frame: pd.DataFrame):
    """Rows of the coefficients study (first repeat), one group per (N, shape, r, convention)."""
    first = frame[frame["repeat"] == frame["repeat"].min()]
    return first.sort_values("key").groupby(["n_keys", "shape", "drop_ratio", "all_dropped"], sort=True)


def _order_counts(evidence: Evidence) -> dict[str, Any]:
    """Exact c and E[w] = c p on every row of the coefficients study: count order violations."""
    c_violations = w_violations = max_violations = entropy_violations = pairs = rows = 0
    for _, group in _row_groups(evidence.frames["coefficients"]):
        p = group["p"].to_numpy()
        c = group["c_exact"].to_numpy()
        w = c * p
        strictly = p[:-1] > p[1:] * (1 + 1e-9)  # adjacent keys with strictly decreasing p
        pairs += int(strictly.sum())
        c_violations += int((c[:-1] >= c[1:])[strictly].sum())
        w_violations += int((w[:-1] <= w[1:])[strictly].sum())
        q = w / w.sum()
        max_violations += int(q.max() > p.max() * (1 + 1e-12))
        entropy = lambda x: float(-(x[x > 0] * np.log(x[x > 0])).sum())  # noqa: E731
        entropy_violations += int(entropy(q) < entropy(p) - 1e-12)
        rows += 1
    return {
        "pairs": pairs,
        "rows": rows,
        "c_order_violations": c_violations,
        "w_order_violations": w_violations,
        "max_violations": max_violations,
        "entropy_violations": entropy_violations,
    }


def _toy_comparisons(evidence: Evidence) -> dict[str, Any]:
    comparisons = evidence.summaries["toy_optimisation"]["paired_comparisons"]
    return {
        "dropout_minus_dropkey": {
            name: (entry["peak_dropout_minus_dropkey"]["mean"], entry["peak_dropout_minus_dropkey"]["se"])
            for name, entry in sorted(comparisons.items())
        },
        "dropkey_minus_none": {
            name: (entry["peak_dropkey_minus_none"]["mean"], entry["peak_dropkey_minus_none"]["se"])
            for name, entry in sorted(comparisons.items())
            if "peak_dropkey_minus_none" in entry
        },
    }


#: One fraction per link of the chain (a: sum p beta < M, b: beta-gradient order, c: beta gap grows,
#: d: Eq. 11 has the target term's sign, e: Eq. 11 < 0 and the logit gap grows), plus the joint fraction.
CHAIN_LINKS = (
    "a_sum_p_beta_below_m",
    "b_grad_beta_top_below_second",
    "c_beta_gap_grows_next",
    "d_total_has_target_term_sign",
    "e_eq11_negative",
    "e_logit_gap_grows_next",
)


def _toy_links(evidence: Evidence) -> dict[str, Any]:
    far = evidence.summaries["toy_optimisation"]["links"]["none"]["far_from_optimum"]
    return {
        "links_far": {key: far[key] for key in CHAIN_LINKS},
        "chain_all_links": far["chain_all_links"],
        "n_far": far.get("n_records", 0),
    }


def _damping(evidence: Evidence) -> dict[str, Any]:
    summary = evidence.summaries["gradient_damping"]
    far = {name: cell for name, cell in summary["cells"].items() if name.startswith("beta_mean=0,")}

    def prefer_exact(cell: dict, exact: str, monte_carlo: str) -> float:
        """The exact (enumerated) number where the study has it, else the Monte-Carlo one."""
        return cell[exact] if cell.get(exact) is not None else cell[monte_carlo]

    damped = [prefer_exact(cell, "fraction_exact_below_undamped", "fraction_mc_below_undamped") for cell in far.values()]
    errors = [
        prefer_exact(cell, "median_abs_ratio_error_first_order_vs_exact", "median_abs_ratio_error_first_order_vs_mc")
        for cell in far.values()
    ]
    return {
        "far_cells": len(far),
        "min_fraction_damped_far": min(damped, default=None),
        "max_first_order_error_far": max(errors, default=None),
        "fraction_anti_damped_5se": summary["overall_fraction_mc_above_undamped_5se"],
    }


def _alignment(evidence: Evidence) -> dict[str, Any]:
    summary = evidence.summaries["train_test_mismatch"]
    slopes = summary["slopes"]
    open_cells = sorted(
        name for name, entry in slopes.items() if entry["smallest_k_closer_to_train_than_plain_inference"] is None
    )
    return {
        "pooled_slope": summary["pooled_slope"],
        "pooled_slope_se": summary["pooled_slope_se"],
        "cells": len(slopes),
        "cells_not_closed": open_cells,
    }


def _structured_masks(evidence: Evidence) -> dict[str, Any]:
    """Per structured cell: the first-moment change relative to DropKey's own smoothing, and the direction."""
    summary = evidence.summaries["structured_masks"]
    cells = {name: cell for name, cell in summary["cells"].items() if cell["variant"] != "dropkey"}
    return {
        "relative_change": {name: cell["relative_change"] for name, cell in sorted(cells.items())},
        "tv_to_dropkey": {name: cell["tv_to_dropkey"] for name, cell in sorted(cells.items())},
        "smooths_vs_dropkey": {name: cell["smooths_vs_dropkey"] for name, cell in sorted(cells.items())},
    }


def _measure_vit(*quantities: str):
    def measure(evidence: Evidence, claim_id: str) -> dict[str, Any]:
        found = evidence.vit.get(claim_id, {})
        return {quantity: found.get(quantity) for quantity in quantities}

    return measure


# --- rules: numbers -> verdict ------------------------------------------------------------------


def rule_eq3(numbers: dict) -> Verdict:
    statuses = numbers["derivations"]
    gate = _theory_gate(statuses)
    if gate is not None:
        return gate
    if "coverage" not in numbers:
        return Verdict("confirmed", _theory_phrase(statuses), "derivation holds; Monte-Carlo cross-check not run")
    deviation = (numbers["coverage"] - numbers["nominal"]) / numbers["coverage_se"]
    key = f"{_theory_phrase(statuses)}; MC coverage {fmt(numbers['coverage'], 4)} (nominal {numbers['nominal']})"
    if abs(deviation) <= 3:
        return Verdict("confirmed", key, f"proved; Monte-Carlo intervals cover the exact c_j at the nominal rate ({deviation:+.1f} SE)")
    return Verdict("partly", key, f"proved, but Monte-Carlo coverage deviates by {deviation:+.1f} SE (> 3)")


def rule_eq4(numbers: dict) -> Verdict:
    statuses = numbers["derivations"]
    gate = _theory_gate(statuses)
    if gate is not None:
        return gate
    if "c_order_violations" not in numbers:
        return Verdict("confirmed", _theory_phrase(statuses), "proved; numeric scan not run")
    key = f"{numbers['c_order_violations']} violations of c_s < c_t in {numbers['pairs']} adjacent pairs"
    if numbers["c_order_violations"] > 0:
        return Verdict("not reproduced", key, "exact coefficients violate the inequality on the study's rows")
    return Verdict("confirmed", key, f"proved ({_theory_phrase(statuses)}) and no violation on the study's rows")


def rule_order(numbers: dict) -> Verdict:
    statuses = numbers["derivations"]
    gate = _theory_gate(statuses)
    if gate is not None:
        return gate
    if "w_order_violations" not in numbers:
        return Verdict("confirmed", _theory_phrase(statuses), "proved; numeric scan not run")
    violations = numbers["w_order_violations"] + numbers["max_violations"] + numbers["entropy_violations"]
    key = f"{violations} violations (order, max, entropy) on {numbers['rows']} rows"
    if violations:
        return Verdict("not reproduced", key, "exact E[w] breaks order or majorisation on the study's rows")
    return Verdict("confirmed", key, "proved; order kept, max down and entropy up on every row")


def rule_dropout(numbers: dict) -> Verdict:
    statuses = numbers["derivations"]
    gate = _theory_gate(statuses)
    if gate is not None:
        return gate
    return Verdict("confirmed", _theory_phrase(statuses), "E[w_j] = p_j exactly: c_j = 1 for every key")


def _per_ratio(pairs: Mapping[str, tuple[float, float]], z: float = 3.0) -> tuple[list[int], str]:
    signs = [_significance(mean, se, z) for mean, se in pairs.values()]
    text = "; ".join(f"{name}: {mean:+.3f} ± {se:.3f}" for name, (mean, se) in pairs.items())
    return signs, text


def rule_dropkey_vs_dropout(numbers: dict) -> Verdict:
    pairs = numbers.get("dropout_minus_dropkey")
    if not pairs:
        return _not_measured("toy optimisation not run")
    signs, text = _per_ratio(pairs)
    key = f"peak(dropout) − peak(DropKey) {text}"
    if all(sign > 0 for sign in signs):
        return Verdict("confirmed", key, "DropKey ends with lower peaks than dropout at every r (> 3 SE)")
    if all(sign < 0 for sign in signs):
        return Verdict("not reproduced", key, "post-softmax dropout smooths the toy attention MORE than DropKey at every r (> 3 SE)")
    return Verdict("partly", key, "the ordering depends on r or is within 3 SE")


def rule_peak_shrinkage(numbers: dict) -> Verdict:
    pairs = numbers.get("dropkey_minus_none")
    if not pairs:
        return _not_measured("toy optimisation (with 'none' and 'dropkey') not run")
    signs, text = _per_ratio(pairs)
    key = f"peak(DropKey) − peak(none) {text}"
    if all(sign < 0 for sign in signs):
        return Verdict("confirmed", key, "DropKey lowers the final peak weight at every r (> 3 SE)")
    if any(sign < 0 for sign in signs):
        return Verdict("partly", key, "DropKey lowers the peak at some r only")
    return Verdict("not reproduced", key, "DropKey does not lower the final peak weight at any r")


def rule_chain(numbers: dict) -> Verdict:
    statuses = numbers["derivations"]
    gate = _theory_gate(statuses)
    if gate is not None:
        return gate
    caveat = "Eq. 11 as printed omits mu_t − mu_s (zero for softmax weights, p > 0)"
    links = numbers.get("links_far")
    if not links:
        return Verdict("confirmed", _theory_phrase(statuses), f"derivations hold; toy study not run; caveat: {caveat}")
    weakest = min(links, key=links.get)
    key = (
        f"all links hold jointly in {100 * numbers['chain_all_links']:.0f}% of far-from-optimum records; "
        f"weakest link {weakest} {100 * links[weakest]:.0f}%"
    )
    if links[weakest] > 0.5:
        return Verdict("confirmed", key, f"derivations hold and every link holds in most far records; caveat: {caveat}")
    return Verdict("partly", key, f"derivations hold, but link {weakest} fails in most far records; caveat: {caveat}")


def rule_damping(numbers: dict) -> Verdict:
    statuses = numbers["derivations"]
    gate = _theory_gate(statuses)
    if gate is not None:
        return gate
    if numbers.get("min_fraction_damped_far") is None:
        return _not_measured("gradient-damping study not run")
    damped, error = numbers["min_fraction_damped_far"], numbers["max_first_order_error_far"]
    key = f"damped in ≥ {100 * damped:.0f}% of far rows at every r; first-order ratio error ≤ {100 * error:.1f}%"
    if numbers["fraction_anti_damped_5se"] > 0.05 or damped < 0.5:
        return Verdict("not reproduced", key, "the top key's gradient ratio is not damped in most rows")
    if damped >= 0.9 and error <= 0.05:
        return Verdict("confirmed", key, "damped as predicted; the first-order form is within 5% (leading order in M)")
    return Verdict("partly", key, "damping is real, but the first-order form c_s p_s/(c_t p_t) misses the exact ratio by > 5% (it is exact to leading order in M only)")


def rule_alignment(numbers: dict) -> Verdict:
    if "pooled_slope" not in numbers:
        return _not_measured("train/test mismatch study not run")
    slope, se = numbers["pooled_slope"], numbers["pooled_slope_se"]
    closed = numbers["cells"] - len(numbers["cells_not_closed"])
    key = f"RMS slope {slope:.3f} ± {se:.3f} (−0.5 expected); gap closed in {closed}/{numbers['cells']} cells"
    if abs(slope + 0.5) > max(3 * se, 0.02):
        return Verdict("not reproduced", key, "MC inference does not converge to E_train[o] at rate K^-1/2")
    if closed >= 0.9 * numbers["cells"]:
        return Verdict("confirmed", key, "K^-1/2 convergence; MC inference beats plain inference within the K grid in ≥ 90% of cells")
    return Verdict(
        "partly",
        key,
        "K^-1/2 convergence holds, but within the K grid MC inference is not closer than plain inference in: "
        + ", ".join(numbers["cells_not_closed"]),
    )


#: Tolerance of the structured-masks rule (fixed before the study was first run): the structured
#: expected attention may differ from DropKey's by at most 10% of DropKey's own smoothing (TV distance).
STRUCTURED_TOLERANCE = 0.10


def rule_structured_masks(numbers: dict) -> Verdict:
    changes = numbers.get("relative_change")
    if not changes:
        return _not_measured("structured-masks study not run")
    within = sorted(name for name, value in changes.items() if value is not None and value <= STRUCTURED_TOLERANCE)
    outside = sorted(name for name in changes if name not in within)
    worst = max(changes, key=lambda name: -math.inf if changes[name] is None else changes[name])
    directions = Counter(numbers.get("smooths_vs_dropkey", {}).values())
    key = (
        f"first-moment change within {STRUCTURED_TOLERANCE:.0%} of DropKey's smoothing in {len(within)}/{len(changes)} "
        f"cells; worst {worst} {fmt(changes[worst])}; smooths more/same/less than DropKey in "
        f"{directions.get('more', 0)}/{directions.get('same', 0)}/{directions.get('less', 0)} cells"
    )
    if not outside:
        return Verdict("confirmed", key, "correlated masks leave DropKey's smoothing coefficients unchanged (within tolerance)")
    if within:
        return Verdict("partly", key, "structure changes the first moment in some cells: " + ", ".join(outside))
    return Verdict("not reproduced", key, "structure changes the first moment beyond tolerance in every cell")


def _scale_label(measurements: list[Measurement]) -> str:
    scales = sorted({m.scale for m in measurements if m.scale}, key=lambda x: VIT_SCALES.index(x) if x in VIT_SCALES else -1)
    seeds = sorted({m.n for m in measurements if m.n})
    label = "/".join(scales) or "unknown scale"
    return f"[{label} scale, n = {'/'.join(str(n) for n in seeds) or '?'} seeds] "


def _missing_vit(quantities: tuple[str, ...], numbers: dict) -> Verdict | None:
    missing = [q for q in quantities if numbers.get(q) is None]
    if missing:
        return _not_measured(
            f"no real-ViT result yet for {', '.join(missing)} (run `dropkey-lab experiment ...`; results/<scale>/)"
        )
    return None


DIRECTIONS = ("up", "down", "no-gain")


def _vit_sign_rule(directions: Mapping[str, str]):
    """Rule for real-ViT differences at 2 SE; per quantity the claimed direction: 'up' (significantly
    > 0), 'down' (< 0) or 'no-gain' (not significantly > 0). All as claimed: confirmed; some: partly;
    none: not reproduced."""
    for quantity, want in directions.items():
        if want not in DIRECTIONS:
            raise ValueError(f"direction of {quantity!r} must be one of {DIRECTIONS}, got {want!r}")
    quantities = tuple(directions)

    def rule(numbers: dict) -> Verdict:
        gate = _missing_vit(quantities, numbers)
        if gate is not None:
            return gate
        good = []
        for quantity, want in directions.items():
            sign = _significance(numbers[quantity].value, numbers[quantity].standard_error)
            good.append({"up": sign > 0, "down": sign < 0, "no-gain": sign <= 0}[want])
        key = _scale_label([numbers[q] for q in quantities]) + "; ".join(
            f"{q} {numbers[q].value:+.3g} ± {fmt(numbers[q].standard_error, 2)}" for q in quantities
        )
        if all(good):
            return Verdict("confirmed", key, "as claimed, at 2 SE")
        if any(good):
            return Verdict("partly", key, "holds for some of the comparisons only (2 SE)")
        if set(directions.values()) == {"no-gain"}:
            return Verdict("not reproduced", key, "contradicted at 2 SE: structure helps")
        return Verdict("not reproduced", key, "no significant effect in the claimed direction (2 SE)")

    return rule


def rule_collapse(numbers: dict) -> Verdict:
    gate = _missing_vit(("top_blocks_similarity_plain",), numbers)
    if gate is not None:
        return gate
    measurement = numbers["top_blocks_similarity_plain"]
    key = (f"{_scale_label([measurement])}top-block cross-layer similarity of the deepest plain ViT "
           f"{measurement.value:.3f} ± {fmt(measurement.standard_error, 2)}")
    if measurement.value >= 0.9:
        return Verdict("confirmed", key, "top blocks' attention maps are near-identical (≥ 0.9)")
    if measurement.value >= 0.7:
        return Verdict("partly", key, "similar but below DeepViT's near-identity (0.7-0.9)")
    return Verdict("not reproduced", key, "no collapse (< 0.7)")


# --- the registry -------------------------------------------------------------------------------


def _vit_claim(claim_id: str, statement: str, source: str, experiment: str, directions: Mapping[str, str],
               words: str, tests: tuple[str, ...], rule: Callable[[dict[str, Any]], Verdict] | None = None) -> Claim:
    """A claim measured by real-ViT experiment ``experiment``; ``directions``: quantity -> claimed direction."""
    measure = _measure_vit(*directions)
    return Claim(
        claim_id, statement, source, (), (VIT_PREFIX + experiment,), tests, words,
        lambda evidence: measure(evidence, claim_id), rule or _vit_sign_rule(directions),
    )


CLAIMS: tuple[Claim, ...] = (
    Claim(
        "eq3-expected-output",
        "Under DropKey the expected output is E[o] = Σ c_j p_j v_j with c_j = (1−r) E[1/(p_j + S_−j)].",
        "Eq. 3",
        ("expected-output", "row-sum"),
        ("theory", "coefficients"),
        (
            "tests/test_derivations.py::test_expected_output_at_n4",
            "tests/test_theory_properties.py::test_enumeration_equals_integral",
            "tests/test_theory_properties.py::test_monte_carlo_agrees_within_five_standard_errors",
            "tests/test_sim_coefficients.py::test_coverage_is_nominal_where_the_clt_applies",
        ),
        "not reproduced if a derivation is refuted; confirmed if proved and Monte-Carlo coverage (CLT-reliable "
        "intervals) is within 3 conservative SE of nominal; partly if proved but coverage is off.",
        _measure_theory("expected-output", "row-sum", study="coefficients", extra=_coverage),
        rule_eq3,
    ),
    Claim(
        "eq4-smoothing",
        "Larger attention weights get smaller smoothing coefficients: p_s > p_t ⇒ c_s < c_t.",
        "Eq. 4",
        ("smoothing-gap",),
        ("theory", "coefficients"),
        (
            "tests/test_theory_properties.py::test_coefficients_strictly_decrease_in_p",
            "tests/test_derivations.py::test_smoothing_gap_and_order_at_n4",
        ),
        "confirmed if proved and no adjacent pair of keys on the study's rows violates c_s < c_t; "
        "not reproduced if refuted or any violation.",
        _measure_theory("smoothing-gap", study="coefficients", extra=_order_counts),
        rule_eq4,
    ),
    Claim(
        "order-majorisation",
        "DropKey keeps the order of the weights, compresses their ratios, and E[w]/ΣE[w] is majorised by p.",
        "ours (beyond the paper)",
        ("order-preservation", "ratio-compression", "majorisation"),
        ("theory", "coefficients"),
        (
            "tests/test_theory_properties.py::test_order_is_preserved_and_ratios_are_compressed",
            "tests/test_theory_properties.py::test_normalised_expectation_is_majorised_by_p",
        ),
        "confirmed if all three are proved and no row of the study breaks order, max(q) ≤ max(p) or "
        "entropy(q) ≥ entropy(p); not reproduced if refuted or any violation.",
        _measure_theory("order-preservation", "ratio-compression", "majorisation", study="coefficients", extra=_order_counts),
        rule_order,
    ),
    Claim(
        "dropout-no-smoothing",
        "Attention dropout after the softmax has no first-moment smoothing: E[w_j] = p_j (c_j = 1).",
        "Sec. 3 (what to drop: contrast with post-softmax dropout)",
        ("dropout-moments",),
        ("theory",),
        (
            "tests/test_theory_api.py::test_post_softmax_dropout_has_no_first_moment_smoothing",
            "tests/test_functional.py::test_post_softmax_dropout_is_unbiased_and_plain_in_eval",
        ),
        "confirmed if the derivation is proved; not reproduced if refuted.",
        _measure_theory("dropout-moments"),
        rule_dropout,
    ),
    Claim(
        "dropkey-vs-dropout-optimisation",
        "Implied: in training, DropKey smooths attention more than post-softmax dropout (lower final peaks).",
        "Sec. 3 (what to drop), as implied by the contrast with dropout",
        ("dropout-moments",),
        ("toy_optimisation",),
        ("tests/test_sim_toy_optimisation.py::test_dropkey_smooths_the_toy_and_dropout_smooths_it_more",),
        "paired toy comparison at each r: confirmed if peak(dropout) − peak(DropKey) > 3 SE at every r; "
        "not reproduced if < −3 SE at every r; partly otherwise.",
        lambda evidence: _toy_comparisons(evidence) if "toy_optimisation" in evidence.summaries else {},
        rule_dropkey_vs_dropout,
    ),
    Claim(
        "gradient-chain",
        "Eqs. 5-11: far from the optimum, p_s > p_t makes β_s outgrow β_t and then p_s outgrow p_t (rich get richer).",
        "Eqs. 5-11",
        ("lagrangian-gradients", "gradient-difference"),
        ("theory", "toy_optimisation"),
        (
            "tests/test_derivations.py::test_gradient_difference_reports_the_missing_multipliers",
            "tests/test_sim_toy_optimisation.py::test_rich_get_richer_links_far_from_the_optimum",
        ),
        "confirmed if both derivations hold and, without regulariser, every link of the chain holds in > 50% of "
        "the toy records far from the optimum; partly if some link holds in ≤ 50%; the Eq. 11 omission "
        "(mu_t − mu_s, zero for softmax weights) is a caveat, not a demotion.",
        _measure_theory(
            "lagrangian-gradients", "gradient-difference", study="toy_optimisation", extra=_toy_links
        ),
        rule_chain,
    ),
    Claim(
        "gradient-damping",
        "Under DropKey the β-update ratio shrinks from p_s/p_t to c_s p_s/(c_t p_t): the loop is damped.",
        "Eqs. 5-11 (with Eq. 4)",
        ("dropkey-gradient", "ratio-compression"),
        ("theory", "gradient_damping"),
        (
            "tests/test_sim_gradient_damping.py::test_ratio_is_damped_below_p_ratio",
            "tests/test_sim_gradient_damping.py::test_first_order_prediction_is_close_far_from_the_optimum",
            "tests/test_sim_gradient_damping.py::test_monte_carlo_agrees_with_exact_enumeration",
        ),
        "far from the optimum (beta_mean = 0): confirmed if ≥ 90% of rows are damped at every r and the paper's "
        "first-order ratio is within 5% (median) of the exact one at every r; not reproduced if < 50% damped or "
        "> 5% of rows significantly anti-damped; partly otherwise (the form is exact to leading order in M only).",
        _measure_theory("dropkey-gradient", "ratio-compression", study="gradient_damping", extra=_damping),
        rule_damping,
    ),
    Claim(
        "toy-peak-shrinkage",
        "DropKey shrinks attention peaks in optimisation (toy objective of Eq. 5).",
        "Sec. 3 (DropKey penalises high attention weights)",
        ("smoothing-gap",),
        ("toy_optimisation",),
        ("tests/test_sim_toy_optimisation.py::test_dropkey_smooths_the_toy_and_dropout_smooths_it_more",),
        "paired toy comparison: confirmed if peak(DropKey) − peak(none) < −3 SE at every r; partly at some r; "
        "not reproduced at none.",
        lambda evidence: _toy_comparisons(evidence) if "toy_optimisation" in evidence.summaries else {},
        rule_peak_shrinkage,
    ),
    Claim(
        "mc-inference-alignment",
        "Monte-Carlo inference (K masked passes) converges to the training expectation at rate K^-1/2, closing "
        "the train/test gap that plain inference leaves.",
        "ours (beyond the paper)",
        (),
        ("train_test_mismatch",),
        (
            "tests/test_sim_train_test_mismatch.py::test_mc_inference_error_falls_as_one_over_root_k",
            "tests/test_sim_train_test_mismatch.py::test_gap_grows_with_the_drop_ratio",
        ),
        "not reproduced if the pooled log-RMS slope differs from −0.5 by more than max(3 SE, 0.02); confirmed if "
        "not and, in ≥ 90% of cells, some K of the grid brings MC inference closer to E_train[o] than plain "
        "inference; partly otherwise.",
        lambda evidence: _alignment(evidence) if "train_test_mismatch" in evidence.summaries else {},
        rule_alignment,
    ),
    Claim(
        "structured-masks-smoothing",
        "At the same drop ratio, correlated masks (DropKey-Block, DropKey-Cross) smooth attention like independent "
        "DropKey: their effective coefficients c_eff = E[w]/p match DropKey's c (structure changes nothing in the "
        "first moment).",
        "THEORY-NOTES section 4; the paper's DropKey-Block / DropKey-Cross comparison (Sec. 3, structured dropout)",
        (),
        ("structured_masks",),
        (
            "tests/test_sim_structured_masks.py::test_drop_fraction_is_calibrated",
            "tests/test_sim_structured_masks.py::test_independent_dropkey_matches_theory_within_five_standard_errors",
            "tests/test_sim_structured_masks.py::test_structured_rule_gives_the_stated_status",
        ),
        "rule fixed before the study was run: per (variant, grid, row shape, r) cell, the total-variation distance "
        "between the structured variant's expected attention E[w] and independent DropKey's exact one, minus "
        "DropKey's own Monte-Carlo noise floor, divided by DropKey's smoothing TV(E_DropKey[w], p); confirmed if "
        "this relative change is ≤ 10% in every cell, partly if in some cells, not reproduced if in none.",
        lambda evidence: _structured_masks(evidence) if "structured_masks" in evidence.summaries else {},
        rule_structured_masks,
    ),
    _vit_claim(
        "vit-attention-peaks",
        "Trained with DropKey, a real ViT's attention has lower peak weights and higher entropy than without "
        "a regulariser (DropKey penalises high attention weights).",
        "Sec. 3 (DropKey penalises high attention weights, Eq. 4, in training dynamics)",
        "attention_dynamics",
        {"peak_dropkey_minus_none": "down", "entropy_dropkey_minus_none": "up"},
        "final-epoch attention (eval mode, mean over blocks and heads), paired by seed: confirmed if "
        "peak(DropKey) − peak(none) < −2 SE and entropy(DropKey) − entropy(none) > 2 SE; partly if one; "
        "not reproduced if neither.",
        ("tests/test_experiments.py::test_quick_experiments_measure_every_claim",
         "tests/test_experiments.py::test_paired_difference_and_its_standard_error"),
    ),
    _vit_claim(
        "vit-accuracy",
        "DropKey improves ViT top-1 accuracy over no attention dropout and over post-softmax dropout.",
        "Sec. 4 (experiments; small-data regime, Fig. 4)",
        "accuracy",
        {"top1_dropkey_minus_none": "up", "top1_dropkey_minus_dropout": "up"},
        "paired by seed: confirmed if both differences exceed 2 SE; partly if one; not reproduced if none.",
        ("tests/test_models.py::test_every_named_config_runs_and_trains",
         "tests/test_experiments.py::test_quick_experiments_measure_every_claim"),
    ),
    _vit_claim(
        "vit-schedule",
        "A drop ratio decreasing with depth beats a constant one at the same mean ratio.",
        "Sec. 3 (how to schedule the drop ratio)",
        "schedules",
        {"top1_decreasing_minus_constant": "up"},
        "paired by seed: confirmed if top-1(decreasing) − top-1(constant) > 2 SE; not reproduced otherwise.",
        (
            "tests/test_schedules.py::test_linear_decreasing_is_the_papers_shape",
            "tests/test_schedules.py::test_named_schedules_share_the_mean",
            "tests/test_experiments.py::test_schedule_arms_share_the_mean_ratio",
        ),
    ),
    _vit_claim(
        "vit-alignment",
        "Aligning training and inference — Monte-Carlo inference with DropKey masks, or training the last epochs "
        "without DropKey — improves top-1 over plain inference of a DropKey-trained ViT.",
        "THEORY-NOTES section 4 (train/test mismatch: the paper's alignment options)",
        "alignment",
        {"top1_mc_minus_plain": "up", "top1_finetune_minus_plain": "up"},
        "paired by seed: confirmed if both top-1(MC, largest K) − top-1(plain) and top-1(fine-tuned) − "
        "top-1(plain) exceed 2 SE; partly if one; not reproduced if none.",
        ("tests/test_inference.py::test_average_of_probabilities_and_logits",
         "tests/test_train.py::test_final_epochs_without_drop_switch_the_regulariser_off"),
    ),
    _vit_claim(
        "vit-structured",
        "Structured DropKey (block, cross) brings no gain over plain DropKey.",
        "Sec. 3 (structured dropout is not essential for ViT)",
        "structured",
        {"top1_block_minus_dropkey": "no-gain", "top1_cross_minus_dropkey": "no-gain"},
        "paired by seed: confirmed if neither variant beats DropKey by more than 2 SE; partly if one does; "
        "not reproduced if both.",
        (
            "tests/test_masks.py::test_structured_masks_drop_the_documented_footprints",
            "tests/test_modules.py::test_structured_drops_are_spatially_clustered",
        ),
    ),
    _vit_claim(
        "deepvit-collapse",
        "Deep plain ViTs show attention collapse: the top blocks' attention maps are near-identical.",
        "DeepViT Sec. 3 (attention collapse, cross-layer similarity figure)",
        "collapse",
        {"top_blocks_similarity_plain": "level"},
        "mean cross-layer cosine similarity of attention columns over adjacent pairs of the top blocks, deepest "
        "plain ViT of the sweep: confirmed if ≥ 0.9, partly if in [0.7, 0.9), not reproduced if < 0.7.",
        (
            "tests/test_diagnostics.py::test_column_similarity_is_deepvits_definition",
            "tests/test_diagnostics.py::test_recorder_similarity_frame_over_blocks",
            "tests/test_experiments.py::test_top_blocks",
        ),
        rule=rule_collapse,
    ),
    _vit_claim(
        "deepvit-reattention",
        "Re-attention lowers the cross-layer similarity of the top blocks' attention maps.",
        "DeepViT Sec. 4 (Re-attention)",
        "collapse",
        {"similarity_reattention_minus_plain": "down", "similarity_softmax_reattention_minus_plain": "down"},
        "deepest ViT of the sweep, paired by seed, on the maps that multiply V (DeepViT's definition) and on the "
        "softmax weights before mixing (like for like: Re-attention's BatchNorm makes its maps signed, which alone "
        "lowers their cosine): confirmed if both fall by more than 2 SE; partly if one; not reproduced if neither.",
        ("tests/test_reattention.py::test_conv_bn_matches_einsum_then_batchnorm_in_training",
         "tests/test_diagnostics.py::test_recorder_similarity_frame_over_blocks",
         "tests/test_experiments.py::test_quick_experiments_measure_every_claim"),
    ),
    _vit_claim(
        "dropkey-collapse",
        "DropKey also reduces attention collapse: lower top-block cross-layer similarity than a plain ViT, and "
        "lower than Re-attention alone when the two are combined.",
        "ours (no paper measures this)",
        "collapse",
        {"similarity_dropkey_minus_plain": "down", "similarity_softmax_both_minus_reattention": "down"},
        "deepest ViT of the sweep, paired by seed: confirmed if similarity(DropKey) − similarity(plain) and "
        "similarity(DropKey + Re-attention) − similarity(Re-attention) (softmax weights, like for like) are both "
        "< −2 SE; partly if one; not reproduced if none.",
        ("tests/test_experiments.py::test_quick_experiments_measure_every_claim",),
    ),
)

REQUIRED_CLAIM_IDS = tuple(claim.id for claim in CLAIMS)


def claim(claim_id: str) -> Claim:
    for candidate in CLAIMS:
        if candidate.id == claim_id:
            return candidate
    raise ValueError(f"unknown claim {claim_id!r}; known: {REQUIRED_CLAIM_IDS}")


def assess(target: Claim, evidence: Evidence) -> Verdict:
    """The claim's verdict on this evidence; a summary lacking a key means 'not yet measured'."""
    try:
        numbers = target.measure(evidence)
    except (KeyError, TypeError) as error:
        log.warning("claim %s: evidence incomplete (%r)", target.id, error)
        return _not_measured(f"measured numbers incomplete: {error!r}")
    return target.rule(numbers)


def load_vit_measurements(results_dir: Path) -> dict[str, dict[str, Measurement]]:
    """Real-ViT measurements from ``results_dir/<scale>/<experiment>/measurements.csv``; {} if none.

    Per claim, the quantities of the largest scale that measured that claim (full > medium > quick).
    """
    table: dict[str, dict[str, Measurement]] = {}
    for scale in reversed(VIT_SCALES):
        for path in sorted(Path(results_dir).glob(f"{scale}/*/{VIT_MEASUREMENTS}")):
            if not (path.parent / "provenance.json").is_file():
                log.warning("skipping %s: its result folder is incomplete (no provenance.json)", path)
                continue
            frame = pd.read_csv(path)
            for claim_id, rows in frame.groupby("claim_id", sort=True):
                if claim_id in table and any(m.scale != scale for m in table[claim_id].values()):
                    continue  # already measured at a larger scale
                found = table.setdefault(str(claim_id), {})
                for record in rows.to_dict("records"):
                    se = record.get("standard_error")
                    se = math.nan if se is None or pd.isna(se) else float(se)
                    found[str(record["quantity"])] = Measurement(float(record["value"]), se, int(record["n"]), scale)
            log.info("read real-ViT measurements from %s", path)
    return table
