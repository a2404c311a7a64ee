"""The real-ViT claims added by issue 17, driven by synthetic per-seed tables to every outcome.

Each table is what an experiment's ``per_seed.csv`` holds (quantity, group, layer, seed, value); the
claims read it through :class:`reports.evidence.ExperimentEvidence`, exactly as from a result folder.
The values are hand-made, so each outcome is known in advance from the registered smallest effect.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from reports import claims as registry
from reports.evidence import Evidence, EvidenceError, ExperimentEvidence


def _evidence(experiment: str, rows: list[tuple[str, str, float]], scale: str = "small_data") -> Evidence:
    """Evidence of one experiment from (quantity, group, value) rows: seeds numbered per (quantity, group)."""
    table = pd.DataFrame(rows, columns=["quantity", "group", "value"])
    table["seed"] = table.groupby(["quantity", "group"]).cumcount()
    table["layer"], table["covariate"] = -1, np.nan
    headline = table[table["group"] == ""].reset_index(drop=True)
    found = ExperimentEvidence(experiment, scale, Path("synthetic"), headline, table.reset_index(drop=True))
    return Evidence(experiments={experiment: found})


def _values(centre: float, spread: float, n: int) -> list[float]:
    """n values with mean ``centre`` and a fixed, symmetric spread (deterministic)."""
    return list(centre + spread * np.linspace(-1.0, 1.0, n))


E_PEAK = 0.01 / registry.MECHANISM_STEPS
E_ENTROPY = 0.02 / registry.MECHANISM_STEPS


def _mechanism(peak: list[float], entropy: list[float], cells=("none run, epoch 100, r=0.1",)) -> Evidence:
    rows = [(q, cell, v) for cell in cells for q, values in (("peak_step_dropkey_minus_none", peak),
                                                            ("entropy_step_dropkey_minus_none", entropy))
            for v in values]
    return _evidence("gradient_mechanism", rows)


@pytest.mark.parametrize("peak, entropy, status", [
    (_values(-10 * E_PEAK, 0.1 * E_PEAK, 16), _values(10 * E_ENTROPY, 0.1 * E_ENTROPY, 16), "confirmed"),  # tight
    (_values(+10 * E_PEAK, 0.1 * E_PEAK, 16), _values(-10 * E_ENTROPY, 0.1 * E_ENTROPY, 16), "contradicted"),
    (_values(0.0, 100 * E_PEAK, 16), _values(0.0, 100 * E_ENTROPY, 16), "inconclusive"),  # noisy
    (_values(-10 * E_PEAK, 0.1 * E_PEAK, 16), _values(-10 * E_ENTROPY, 0.1 * E_ENTROPY, 16), "partly"),
    ([-10 * E_PEAK], [10 * E_ENTROPY], "not yet measured"),  # n = 1: no interval
])
def test_gradient_mechanism_claim_reaches_every_outcome(peak, entropy, status):
    verdict = registry.assess(registry.claim("vit-gradient-mechanism"), _mechanism(peak, entropy))
    assert verdict.status == status, verdict


def test_gradient_mechanism_claim_reads_every_cell_and_refuses_nan():
    cells = ("none run, epoch 50, r=0.1", "dropkey run, epoch 50, r=0.1")
    evidence = _mechanism(_values(-10 * E_PEAK, 0.1 * E_PEAK, 4), _values(10 * E_ENTROPY, 0.1 * E_ENTROPY, 4), cells)
    verdict = registry.assess(registry.claim("vit-gradient-mechanism"), evidence)
    assert verdict.status == "confirmed" and len(verdict.findings) == 4
    assert verdict.key_number.startswith("[small_data scale, 2 cells, n = 4 mask passes]")
    with_nan = _mechanism([np.nan] * 4, [np.nan] * 4)
    assert registry.assess(registry.claim("vit-gradient-mechanism"), with_nan).status == "not yet measured"


def test_a_result_written_before_a_claims_quantities_leaves_it_not_yet_measured():
    old = _evidence("accuracy", [("top1_dropkey_minus_none", "", v) for v in (1.0, 2.0, 3.0)], scale="medium")
    verdict = registry.assess(registry.claim("vit-generalisation-gap"), old)
    assert verdict.status == "not yet measured" and "predates" in verdict.reason
    # some of a claim's quantities but not all: a broken result, never silently "not yet measured"
    half = _evidence("attention_dynamics", [("train_peak_dropkey_minus_none", "", v) for v in (0.02, 0.03, 0.025)])
    with pytest.raises(EvidenceError, match="train_expected_peak_dropkey_minus_learned_none"):
        registry.assess(registry.claim("vit-compensation"), half)


@pytest.mark.parametrize("sharper, expected_vs_plain, status", [
    (_values(0.05, 0.001, 12), _values(0.0, 0.001, 12), "confirmed"),  # sharper p, E[w] matches the plain p
    (_values(0.05, 0.001, 12), _values(0.05, 0.001, 12), "partly"),  # sharper, but E[w] not within 0.01
    (_values(-0.05, 0.001, 12), _values(0.05, 0.001, 12), "contradicted"),
    (_values(0.0, 0.5, 12), _values(0.0, 0.5, 12), "inconclusive"),
])
def test_compensation_claim_reaches_every_outcome(sharper, expected_vs_plain, status):
    rows = [("train_peak_dropkey_minus_none", "", v) for v in sharper]
    rows += [("train_expected_peak_dropkey_minus_learned_none", "", v) for v in expected_vs_plain]
    verdict = registry.assess(registry.claim("vit-compensation"), _evidence("attention_dynamics", rows))
    assert verdict.status == status, verdict


@pytest.mark.parametrize("gap, status", [
    (_values(-2.0, 0.1, 12), "confirmed"), (_values(2.0, 0.1, 12), "contradicted"),
    (_values(0.0, 0.1, 12), "contradicted"),  # a narrowing of 0.5 pp or more is ruled out
    (_values(0.0, 10.0, 12), "inconclusive"), ([-2.0], "not yet measured"),
])
def test_generalisation_gap_claim_reaches_every_outcome(gap, status):
    evidence = _evidence("accuracy", [("gap_dropkey_minus_none", "", v) for v in gap])
    assert registry.assess(registry.claim("vit-generalisation-gap"), evidence).status == status


@pytest.mark.parametrize("centre, negligible", [(0.25, True), (2.0, False)])
def test_a_confirmed_effect_smaller_than_what_matters_says_so(centre, negligible):
    """vit-alignment (up, 0.5 pp): +0.25 with a tight interval is confirmed by the registered rule (ci_low > 0
    is tried first), and its text says the whole interval lies inside ±0.5 pp; +2.0 says nothing of the kind."""
    rows = [(q, "", v) for q in ("top1_mc_minus_plain", "top1_finetune_minus_plain") for v in _values(centre, 0.05, 12)]
    verdict = registry.assess(registry.claim("vit-alignment"), _evidence("alignment", rows))
    assert verdict.status == "confirmed"
    for finding in verdict.findings:
        assert ("negligible: the whole interval lies within ±0.5 pp" in finding.text()) == negligible


def _sweep(centres: tuple[float, ...], spread: float, n: int) -> Evidence:
    names = [f"top1_dropkey_r{r:g}_minus_none" for r in registry.SENSITIVITY_RATIOS]
    return _evidence("drop_ratio", [(q, "", v) for q, c in zip(names, centres, strict=True)
                                    for v in _values(c, spread, n)])


@pytest.mark.parametrize("centres, spread, n, status", [
    ((2.0, 2.0, 2.0, 2.0), 0.1, 6, "confirmed"),  # tight gains at every ratio
    ((2.0, 2.0, 2.0, -2.0), 0.1, 6, "partly"),  # one ratio hurts
    ((-2.0, -2.0, -2.0, -2.0), 0.1, 6, "contradicted"),
    ((0.0, 0.0, 0.0, 0.0), 10.0, 6, "inconclusive"),  # noisy
    ((2.0, 2.0, 2.0, 2.0), 0.1, 1, "not yet measured"),  # n = 1: no interval
    ((np.nan,) * 4, 0.1, 6, "not yet measured"),
])
def test_drop_ratio_claim_reaches_every_outcome(centres, spread, n, status):
    verdict = registry.assess(registry.claim("vit-drop-ratio"), _sweep(centres, spread, n))
    assert verdict.status == status, verdict


@pytest.mark.parametrize("claim_id, quantity, values, status", [
    ("deepvit-depth-saturation", "top1_plain_deepest_minus_next", _values(-1.0, 0.1, 3), "confirmed"),  # no gain
    ("deepvit-depth-saturation", "top1_plain_deepest_minus_next", _values(2.0, 0.1, 3), "contradicted"),  # gains
    ("deepvit-depth-saturation", "top1_plain_deepest_minus_next", _values(0.0, 10.0, 3), "inconclusive"),
    ("deepvit-depth-saturation", "top1_plain_deepest_minus_next", [-1.0], "not yet measured"),
    ("deepvit-depth-saturation", "top1_plain_deepest_minus_next", [np.nan] * 3, "not yet measured"),
    ("deepvit-reattention-accuracy", "top1_reattention_minus_plain", _values(2.0, 0.1, 3), "confirmed"),
    ("deepvit-reattention-accuracy", "top1_reattention_minus_plain", _values(-2.0, 0.1, 3), "contradicted"),
    ("deepvit-reattention-accuracy", "top1_reattention_minus_plain", _values(0.0, 10.0, 3), "inconclusive"),
    ("deepvit-reattention-accuracy", "top1_reattention_minus_plain", [2.0], "not yet measured"),
    ("deepvit-reattention-accuracy", "top1_reattention_minus_plain", [np.nan] * 3, "not yet measured"),
])
def test_deepvit_accuracy_claims_reach_every_outcome(claim_id, quantity, values, status):
    evidence = _evidence("collapse", [(quantity, "", v) for v in values])
    assert registry.assess(registry.claim(claim_id), evidence).status == status
