"""Monte-Carlo study of the smoothing coefficients c_j (simulations.coefficients).

Statistical tolerance: 5 standard errors throughout. Coverage is compared with
the nominal 0.95 using the SE grouped by row (the SD over rows of each row's
covered fraction: intervals of one row share masks, so counting intervals would
understate the SE), the same SE the eq3 claim's decision uses. Seeds are fixed,
so every run checks the same draws.
"""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pandas as pd
import pytest

import theory
from reports.statistics import paired_decision
from simulations import coefficients
from simulations.cli import main as simulate
from simulations.coefficients import COLUMNS, KEY_COLUMNS, CoefficientsConfig, batched_weight_moments, coverage_by_row
from simulations.common import binomial_standard_error, check_tidy
from theory.seeding import generator

TINY = CoefficientsConfig(
    ns=(4, 16),
    drop_ratios=(0.1, 0.5, 0.9),
    num_samples=2000,
    num_repeats=6,
    seed=11,
)


@pytest.fixture(scope="module")
def frame() -> pd.DataFrame:
    return coefficients.run(TINY)


@pytest.fixture(scope="module")
def summary(frame: pd.DataFrame) -> dict:
    return coefficients.summarise(frame)


def test_frame_is_tidy_with_named_columns(frame):
    assert tuple(frame.columns) == COLUMNS
    check_tidy(frame, KEY_COLUMNS)
    cells = len(TINY.drop_ratios) * len(TINY.shapes) * len(TINY.conventions)
    assert len(frame) == cells * TINY.num_repeats * sum(TINY.ns)
    assert frame["c_standard_error"].ge(0).all()
    assert frame[["c_exact", "c_estimate", "z"]].notna().all().all()


def test_coverage_is_nominal_where_the_clt_applies(frame, summary):
    """Coverage of the sample-SE intervals within 5 SE of 0.95, the SE grouped by row (rows are the
    independent unit; the claim's decision uses the same per-row fractions)."""
    by_row = coverage_by_row(frame)
    se = by_row.std(ddof=1) / np.sqrt(by_row.size)
    assert summary["coverage_clt_reliable_se"] == pytest.approx(se)
    assert summary["n_clt_reliable_intervals"] > 0.9 * summary["n_intervals"]
    assert abs(by_row.mean() - 0.95) < 5 * se
    decision = paired_decision(by_row - 0.95, direction="equal", smallest_effect=0.025)
    assert decision.outcome == "confirmed", decision.describe()
    # The exact variance (theory.attention_variance) standardises the errors: mean z^2 ~ 1.
    assert abs(summary["coverage_with_exact_se"] - 0.95) < 5 * binomial_standard_error(
        0.95, summary["n_independent_groups"]
    )


def test_coverage_check_detects_a_wrong_theory(frame):
    """Negative control: with c = 1 (no smoothing, dropout's coefficient) coverage collapses."""
    wrong = frame.assign(covered=((frame["c_estimate"] - 1.0) / frame["c_standard_error"]).abs() <= 1.959964)
    by_row = coverage_by_row(wrong, reliable_only=False)
    assert by_row.mean() < 0.95 - 5 * by_row.std(ddof=1) / np.sqrt(by_row.size)
    assert paired_decision(by_row - 0.95, direction="equal", smallest_effect=0.025).outcome == "contradicted"


def test_batched_sampler_matches_theory_sampler_draw_for_draw():
    p = np.array([0.5, 0.25, 0.125, 0.0625, 0.0625])
    for convention in ("zero", "uniform", "undropped"):
        sequence = np.random.SeedSequence(2024)
        mean, se = batched_weight_moments(
            p, 0.6, num_samples=3000, num_repeats=1, rng=generator(sequence), all_dropped=convention
        )
        reference = theory.sampled_expected_attention(
            p, 0.6, num_samples=3000, seed=np.random.SeedSequence(2024), all_dropped=convention
        )
        np.testing.assert_allclose(mean[0], reference.mean, rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(se[0], reference.standard_error, rtol=1e-9, atol=1e-15)


def test_estimates_agree_with_exact_within_five_standard_errors():
    """A well-sampled row: every pooled estimate within 5 SE of the exact c_j."""
    p = np.array([0.4, 0.3, 0.2, 0.1])
    mean, se = batched_weight_moments(
        p, 0.3, num_samples=20000, num_repeats=4, rng=generator(np.random.SeedSequence(5)), all_dropped="zero"
    )
    pooled = mean.mean(axis=0)
    pooled_se = np.sqrt((se**2).sum(axis=0)) / mean.shape[0]
    exact = theory.expected_attention(p, 0.3)
    assert np.all(np.abs(pooled - exact) < 5 * pooled_se)


def test_same_seed_same_frame_different_seed_different_frame():
    small = dataclasses.replace(TINY, ns=(4,), drop_ratios=(0.5,), num_samples=200, num_repeats=2)
    first = coefficients.run(small)
    pd.testing.assert_frame_equal(first, coefficients.run(small))
    other = coefficients.run(dataclasses.replace(small, seed=small.seed + 1))
    assert not np.array_equal(first["c_estimate"].to_numpy(), other["c_estimate"].to_numpy())


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("ns", (0,)),
        ("ns", [4, 16]),
        ("ns", ()),
        ("drop_ratios", (0.0,)),
        ("drop_ratios", (1.0,)),
        ("drop_ratios", (math.nan,)),
        ("shapes", ("gaussian",)),
        ("conventions", ("nan",)),
        ("num_samples", 1),
        ("num_samples", 10.5),
        ("num_repeats", 0),
        ("confidence", 1.0),
        ("min_effective_samples", 0.0),
        ("peak_mass", 1.0),
        ("logit_std", -1.0),
        ("seed", -1),
        ("seed", True),
    ],
)
def test_invalid_config_raises_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        dataclasses.replace(TINY, **{field: value})


def test_quick_and_full_configs_are_valid():
    assert CoefficientsConfig.quick().ns != CoefficientsConfig.full().ns
    assert set(CoefficientsConfig.full().ns) == {4, 16, 65, 197}


def test_cli_writes_results_summary_and_config(tmp_path, monkeypatch, capsys):
    tiny = dataclasses.replace(TINY, ns=(4,), drop_ratios=(0.5,), num_samples=100, num_repeats=2)
    monkeypatch.setattr(CoefficientsConfig, "quick", classmethod(lambda cls: tiny))
    assert simulate(["coefficients", "--seed", "3", "--out", str(tmp_path)]) == 0
    written = pd.read_csv(tmp_path / "results.csv")
    assert tuple(written.columns) == COLUMNS
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert 0.0 <= summary["coverage"] <= 1.0
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["config"]["seed"] == 3
    assert json.loads((tmp_path / "provenance.json").read_text())["seed"] == 3
    assert "coverage" in capsys.readouterr().out


# --- shared helpers of simulations.common and theory.seeding (used by every study) -----------


def test_child_seeds_come_from_seedsequence_spawn_and_do_not_depend_on_count():
    from theory.seeding import child_sequences

    few, many = child_sequences(5, 2), child_sequences(5, 10)
    assert [c.spawn_key for c in few] == [(0,), (1,)]
    assert few[1].generate_state(4).tolist() == many[1].generate_state(4).tolist()
    assert few[0].generate_state(4).tolist() != few[1].generate_state(4).tolist()


@pytest.mark.parametrize("shape", ["flat", "peaked", "power_law", "vit_like"])
def test_attention_rows_are_sorted_probability_vectors(shape):
    from simulations.common import attention_row

    row = attention_row(shape, 16, np.random.default_rng(0))
    assert row.shape == (16,) and np.all(row > 0)
    assert abs(row.sum() - 1.0) < 1e-12 and np.all(np.diff(row) <= 0)


def test_check_tidy_rejects_duplicate_observations():
    duplicated = pd.DataFrame({"a": [1, 1], "b": [2, 2], "value": [0.1, 0.2]})
    with pytest.raises(ValueError, match="duplicate"):
        check_tidy(duplicated, ["a", "b"])
    with pytest.raises(ValueError, match="lacks"):
        check_tidy(duplicated, ["c"])
