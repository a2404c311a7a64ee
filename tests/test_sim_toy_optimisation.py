"""The toy objective of docs/theory.md section 3 (simulations.toy_optimisation).

Statistical tolerance: 5 standard errors (paired differences across problems,
Monte-Carlo expectations over masks). Deterministic consequences (links (a) and
(b) of the chain far from the optimum, DropAttention = DropKey for one query)
are checked exactly. Seeds are fixed.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pandas as pd
import pytest
import torch

from simulations import toy_optimisation
from simulations.cli import main as simulate
from simulations.common import check_tidy
from simulations.toy_optimisation import (
    COLUMNS,
    KEY_COLUMNS,
    ToyOptimisationConfig,
    expected_loss_parts,
    record_steps,
    training_weights,
)

TINY = ToyOptimisationConfig(
    n_problems=160,
    steps=250,
    n_records=16,
    drop_ratios=(0.3,),
    covariance_samples=300,
    seed=7,
)


@pytest.fixture(scope="module")
def frame() -> pd.DataFrame:
    return toy_optimisation.run(TINY)


@pytest.fixture(scope="module")
def summary(frame: pd.DataFrame) -> dict:
    return toy_optimisation.summarise(frame)


def test_frame_is_tidy_with_named_columns(frame):
    assert tuple(frame.columns) == COLUMNS
    check_tidy(frame, KEY_COLUMNS)
    runs = 1 + 3 * len(TINY.drop_ratios)
    assert len(frame) == runs * TINY.n_problems * TINY.n_records
    final = frame[(frame["step"] == TINY.steps) & (frame["regulariser"] != "none")]
    assert final["dropkey_expected_loss"].notna().all()
    assert frame.loc[frame["step"] < TINY.steps, "dropkey_expected_loss"].isna().all()


def test_no_regulariser_reaches_low_loss(summary):
    assert summary["none_final_loss"]["median"] < 1e-10
    assert summary["none_final_loss"]["fraction_below_1e-6"] > 0.99


def test_dropattention_coincides_with_dropkey_for_one_query(summary):
    assert summary["dropattention_max_abs_diff_final_peak_vs_dropkey"] < 1e-9


def test_dropkey_smooths_the_toy_and_dropout_smooths_it_more(summary):
    """Measured, paired over problems: peak(none) > peak(DropKey) > peak(dropout), each by > 5 SE."""
    entry = summary["paired_comparisons"]["r=0.3"]
    dropkey_vs_none = entry["peak_dropkey_minus_none"]
    dropout_vs_dropkey = entry["peak_dropout_minus_dropkey"]
    assert dropkey_vs_none["mean"] < -5 * dropkey_vs_none["se"]
    assert dropout_vs_dropkey["mean"] < -5 * dropout_vs_dropkey["se"]
    assert entry["entropy_dropout_minus_dropkey"]["mean"] > 5 * entry["entropy_dropout_minus_dropkey"]["se"]


def test_dropkey_penalty_nearly_vanishes_at_its_final_state(summary):
    """The diagonal variance is large, but the cross-covariance cancels it (values align with y)."""
    final = summary["final"]["dropkey@0.3"]
    diagonal = final["dropkey_variance_diagonal"]["mean"]
    total = diagonal + final["dropkey_variance_cross"]["mean"]
    assert diagonal > 10 * total > 0
    # The dropout penalty at DropKey's final state is far larger than DropKey's own.
    assert summary["paired_comparisons"]["r=0.3"]["dropkey_state_dropout_penalty"]["mean"] > 10 * total


def test_rich_get_richer_links_far_from_the_optimum(summary):
    links = summary["links"]["none"]["far_from_optimum"]
    assert summary["links"]["none"]["n_far_records"] > TINY.n_problems
    assert links["a_sum_p_beta_below_m"] == 1.0
    assert links["b_grad_beta_top_below_second"] == 1.0
    assert links["c_beta_gap_grows_next"] > 0.95
    assert links["d_total_has_target_term_sign"] > 0.9
    assert links["e_eq11_negative"] > 0.6


def test_expected_loss_parts_match_brute_force_monte_carlo():
    rng = np.random.default_rng(3)
    batch, n, d, r = 6, 5, 3, 0.4
    logits = rng.normal(size=(batch, n))
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    values = rng.normal(size=(batch, n, d))
    target = rng.normal(size=(batch, d))
    parts = expected_loss_parts(p, values, target, r, num_samples=4000, rng=np.random.default_rng(4))
    samples = 100_000
    kept = rng.random((samples, batch, n)) >= r
    for name, weights in [
        ("dropkey", np.where(kept.any(-1, keepdims=True), kept * p, 1.0)),
        ("dropout", kept * p / (1 - r)),
    ]:
        if name == "dropkey":
            weights = weights / weights.sum(-1, keepdims=True)
        loss = 0.5 * ((np.einsum("sbn,bnd->sbd", weights, values) - target) ** 2).sum(-1)
        mean, se = loss.mean(0), loss.std(0, ddof=1) / np.sqrt(samples)
        error = np.sqrt(se**2 + (parts["dropkey_variance_cross_se"] ** 2 if name == "dropkey" else 0))
        assert np.all(np.abs(parts[f"{name}_expected_loss"] - mean) < 5 * error), name


def test_training_weights_of_the_regularisers():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(4000, 6, generator=generator, dtype=torch.float64)
    keep = torch.rand(4000, 6, generator=generator, dtype=torch.float64) >= 0.5
    keep[0] = False  # an all-dropped row
    dropkey = training_weights("dropkey", logits, keep, 0.5)
    torch.testing.assert_close(dropkey, training_weights("dropattention", logits, keep, 0.5))
    torch.testing.assert_close(dropkey[0], torch.full((6,), 1 / 6, dtype=torch.float64))
    assert torch.isfinite(dropkey).all()
    torch.testing.assert_close(dropkey.sum(-1), torch.ones(4000, dtype=torch.float64))
    dropout = training_weights("dropout", logits, keep, 0.5)
    torch.testing.assert_close(dropout, torch.softmax(logits, -1) * keep * 2.0)


def test_record_steps_start_at_zero_end_at_last_and_resolve_early_steps():
    steps = record_steps(400, 30)
    assert len(steps) == 30 and steps[0] == 0 and steps[-1] == 400
    assert np.all(np.diff(steps) > 0)
    assert list(steps[:6]) == [0, 1, 2, 3, 4, 5]


def test_same_seed_same_frame_different_seed_different_frame():
    small = dataclasses.replace(TINY, n_problems=8, steps=20, n_records=5, covariance_samples=20)
    first = toy_optimisation.run(small)
    pd.testing.assert_frame_equal(first, toy_optimisation.run(small))
    other = toy_optimisation.run(dataclasses.replace(small, seed=small.seed + 1))
    assert not np.allclose(first["loss"].to_numpy(), other["loss"].to_numpy())


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("n_problems", 1),
        ("n_keys", 1),
        ("dim", 1),
        ("steps", 0),
        ("n_records", 1),
        ("n_records", 10_000),
        ("learning_rate", 0.0),
        ("logit_lr_multiplier", -1.0),
        ("drop_ratios", (1.0,)),
        ("drop_ratios", (0.3, 0.3)),
        ("regularisers", ("dropblock",)),
        ("target_norm", 0.0),
        ("value_init_std", -0.1),
        ("covariance_samples", 1),
        ("far_fraction", 0.0),
        ("seed", -5),
    ],
)
def test_invalid_config_raises_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        dataclasses.replace(TINY, **{field: value})


def test_cli_writes_results_summary_and_config(tmp_path, monkeypatch, capsys):
    tiny = dataclasses.replace(TINY, n_problems=8, steps=20, n_records=5, covariance_samples=20)
    monkeypatch.setattr(ToyOptimisationConfig, "quick", classmethod(lambda cls: tiny))
    assert simulate(["toy_optimisation", "--out", str(tmp_path), "--seed", "4"]) == 0
    assert tuple(pd.read_csv(tmp_path / "results.csv").columns) == COLUMNS
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert "paired_comparisons" in summary
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["config"]["seed"] == 4 and json.loads((tmp_path / "provenance.json").read_text())["git_commit"]
    assert "peak" in capsys.readouterr().out
