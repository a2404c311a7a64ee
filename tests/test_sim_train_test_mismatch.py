"""Train/test mismatch and Monte-Carlo inference (simulations.train_test_mismatch).

Statistical tolerance: 5 standard errors (the fitted slope against -1/2 with the
fit's SE; the distance decomposition with the SE over problems). Seeds are fixed.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pandas as pd
import pytest

from simulations import train_test_mismatch
from simulations.cli import main as simulate
from simulations.common import check_tidy, fit_line
from simulations.train_test_mismatch import COLUMNS, KEY_COLUMNS, TrainTestMismatchConfig

TINY = TrainTestMismatchConfig(
    ns=(4, 16),
    drop_ratios=(0.1, 0.5, 0.9),  # r = 0.9 makes the all-dropped convention matter at N = 4
    shapes=("power_law", "vit_like"),
    n_problems=150,
    seed=9,
)


@pytest.fixture(scope="module")
def frame() -> pd.DataFrame:
    return train_test_mismatch.run(TINY)


@pytest.fixture(scope="module")
def summary(frame: pd.DataFrame) -> dict:
    return train_test_mismatch.summarise(frame)


def test_frame_is_tidy_with_named_columns(frame):
    assert tuple(frame.columns) == COLUMNS
    check_tidy(frame, KEY_COLUMNS)
    cells = len(TINY.ns) * len(TINY.drop_ratios) * len(TINY.shapes)
    assert len(frame) == cells * TINY.n_problems * len(TINY.ks)
    assert (frame[["dist_to_train", "dist_to_test", "gap"]] >= 0).all().all()


def test_mc_inference_error_falls_as_one_over_root_k(summary):
    """Every cell's slope of log RMS distance vs log K is -1/2 within 5 fit SEs."""
    for name, entry in summary["slopes"].items():
        assert abs(entry["slope"] + 0.5) < 5 * entry["slope_se"], name
    assert abs(summary["pooled_slope"] + 0.5) < 5 * summary["pooled_slope_se"]


def test_slope_check_can_fail():
    """Negative control: RMS that stops falling (a floor, as for the distance to o_test) is rejected."""
    ks = np.array([1, 2, 4, 8, 16, 32, 64])
    rms = np.sqrt(0.5**2 + 1.0 / ks)
    fit = fit_line(np.log(ks), np.log(rms), np.full(ks.size, 0.01))
    assert abs(fit["slope"] + 0.5) > 5 * fit["slope_se"]


def test_gap_grows_with_the_drop_ratio(summary):
    for n in TINY.ns:
        low = summary["relative_gap"][f"r=0.1,N={n}"]["median_relative_gap"]
        high = summary["relative_gap"][f"r=0.5,N={n}"]["median_relative_gap"]
        assert 0 < low < high


def test_distance_to_test_decomposes_into_gap_and_sampling_error(frame):
    """E||o_K - o_test||^2 = gap^2 + E||o_K - E_train||^2 (the cross term has mean zero)."""
    cross = frame["dist_to_test"] ** 2 - frame["gap"] ** 2 - frame["dist_to_train"] ** 2
    for _, group in frame.assign(cross=cross).groupby(["shape", "n_keys", "drop_ratio", "k"]):
        se = group["cross"].std(ddof=1) / np.sqrt(len(group))
        assert abs(group["cross"].mean()) < 5 * se + 1e-12


def test_same_seed_same_frame_different_seed_different_frame():
    small = dataclasses.replace(TINY, ns=(4,), drop_ratios=(0.5,), n_problems=5, ks=(1, 2))
    first = train_test_mismatch.run(small)
    pd.testing.assert_frame_equal(first, train_test_mismatch.run(small))
    other = train_test_mismatch.run(dataclasses.replace(small, seed=small.seed + 1))
    assert not np.array_equal(first["dist_to_train"].to_numpy(), other["dist_to_train"].to_numpy())


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("ns", (0,)),
        ("drop_ratios", (1.5,)),
        ("shapes", ("triangle",)),
        ("n_problems", 1),
        ("dim", 0),
        ("ks", (0, 1)),
        ("ks", (4,)),
        ("all_dropped", "NaN"),
        ("logit_std", 0.0),
        ("seed", "0"),
    ],
)
def test_invalid_config_raises_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        dataclasses.replace(TINY, **{field: value})


def test_cli_writes_results_summary_and_config(tmp_path, monkeypatch, capsys):
    tiny = dataclasses.replace(TINY, ns=(4,), drop_ratios=(0.5,), n_problems=5, ks=(1, 2, 4))
    monkeypatch.setattr(TrainTestMismatchConfig, "quick", classmethod(lambda cls: tiny))
    assert simulate(["train_test_mismatch", "--out", str(tmp_path), "--seed", "2"]) == 0
    assert tuple(pd.read_csv(tmp_path / "results.csv").columns) == COLUMNS
    assert "pooled_slope" in json.loads((tmp_path / "summary.json").read_text())
    assert json.loads((tmp_path / "config.json").read_text())["config"]["seed"] == 2
    assert "slope" in capsys.readouterr().out
