"""Expected beta-gradient ratio under DropKey (simulations.gradient_damping).

Statistical tolerance: 5 standard errors (Monte-Carlo means against exact
enumeration; the measured ratio against p_s / p_t with the delta-method SE).
Seeds are fixed.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pandas as pd
import pytest

from simulations import gradient_damping
from simulations.cli import main as simulate
from simulations.common import check_tidy
from simulations.gradient_damping import COLUMNS, KEY_COLUMNS, GradientDampingConfig, exact_gradients

TINY = GradientDampingConfig(
    ns=(8,),
    rows_per_cell=30,
    drop_ratios=(0.3, 0.7),
    beta_means=(0.0, 0.5),
    num_samples=4000,
    seed=5,
)


@pytest.fixture(scope="module")
def frame() -> pd.DataFrame:
    return gradient_damping.run(TINY)


@pytest.fixture(scope="module")
def summary(frame: pd.DataFrame) -> dict:
    return gradient_damping.summarise(frame)


def test_frame_is_tidy_with_named_columns(frame):
    assert tuple(frame.columns) == COLUMNS
    check_tidy(frame, KEY_COLUMNS)
    assert len(frame) == len(TINY.shapes) * len(TINY.drop_ratios) * len(TINY.beta_means) * TINY.rows_per_cell
    assert frame["ratio_exact"].notna().all()  # N = 8 is enumerated


def test_monte_carlo_agrees_with_exact_enumeration(frame):
    for column in ("top", "second"):
        z = (frame[f"grad_{column}_mc"] - frame[f"grad_{column}_exact"]) / frame[f"grad_{column}_mc_se"]
        assert z.abs().max() < 5


def test_ratio_is_damped_below_p_ratio(summary, frame):
    """Far from the optimum the measured ratio is below p_s/p_t, never above it by 5 SE."""
    assert summary["overall_fraction_mc_above_undamped_5se"] == 0.0
    for r in TINY.drop_ratios:
        cell = summary["cells"][f"beta_mean=0,r={r:g}"]
        assert cell["median_damping_mc"] < 1.0
        assert cell["median_damping_exact"] < 1.0
        assert cell["fraction_exact_below_undamped"] > 0.9
    # Stronger dropping damps more.
    low, high = (summary["cells"][f"beta_mean=0,r={r:g}"]["median_damping_exact"] for r in (0.3, 0.7))
    assert high < low
    # Pooled over rows the measured ratio sits well below the undamped one.
    far = frame[frame["beta_mean"] == 0.0]
    deficit = (far["ratio_mc"] - far["ratio_undamped"]) / far["ratio_undamped"]
    assert deficit.mean() < -5 * deficit.std(ddof=1) / np.sqrt(len(deficit))


def test_first_order_prediction_is_close_far_from_the_optimum(summary):
    """c_s p_s / (c_t p_t) is within 10% of the exact ratio (median over rows) when |beta| << M."""
    for r in TINY.drop_ratios:
        cell = summary["cells"][f"beta_mean=0,r={r:g}"]
        assert cell["median_abs_ratio_error_first_order_vs_exact"] < 0.1
    near = summary["cells"]["beta_mean=0.5,r=0.7"]["median_abs_ratio_error_first_order_vs_exact"]
    far = summary["cells"]["beta_mean=0,r=0.7"]["median_abs_ratio_error_first_order_vs_exact"]
    assert near > far  # the first-order formula degrades toward the optimum


def test_exact_gradients_reduce_to_the_undropped_gradient_as_r_goes_to_zero():
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(6), size=4)
    beta = rng.normal(size=(4, 6))
    exact = exact_gradients(p, beta, 1.0, 1e-9, "uniform")
    expected = p * ((p * beta).sum(1, keepdims=True) - 1.0)
    np.testing.assert_allclose(exact, expected, rtol=1e-6, atol=1e-9)


def test_same_seed_same_frame_different_seed_different_frame():
    small = dataclasses.replace(TINY, rows_per_cell=3, drop_ratios=(0.5,), beta_means=(0.0,), num_samples=100)
    first = gradient_damping.run(small)
    pd.testing.assert_frame_equal(first, gradient_damping.run(small))
    other = gradient_damping.run(dataclasses.replace(small, seed=small.seed + 1))
    assert not np.array_equal(first["ratio_mc"].to_numpy(), other["ratio_mc"].to_numpy())


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("ns", (1,)),
        ("shapes", ("flat",)),
        ("rows_per_cell", 0),
        ("drop_ratios", (0.0,)),
        ("beta_means", (float("inf"),)),
        ("beta_std", -1.0),
        ("target_norm", 0.0),
        ("num_samples", 5),
        ("enumerate_max_keys", 17),
        ("all_dropped", "nan"),
        ("seed", 1.5),
    ],
)
def test_invalid_config_raises_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        dataclasses.replace(TINY, **{field: value})


def test_cli_writes_results_summary_and_config(tmp_path, monkeypatch, capsys):
    tiny = dataclasses.replace(TINY, rows_per_cell=3, drop_ratios=(0.5,), beta_means=(0.0,), num_samples=100)
    monkeypatch.setattr(GradientDampingConfig, "quick", classmethod(lambda cls: tiny))
    assert simulate(["gradient_damping", "--out", str(tmp_path)]) == 0
    assert tuple(pd.read_csv(tmp_path / "results.csv").columns) == COLUMNS
    assert "cells" in json.loads((tmp_path / "summary.json").read_text())
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["config"]["seed"] == TINY.seed and (tmp_path / "provenance.json").is_file()
    assert "ratio/undamped" in capsys.readouterr().out
