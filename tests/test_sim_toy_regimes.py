"""The regime map of the toy (simulations.toy_regimes) and its exact expected losses (simulations.toy_exact).

Statistical tolerance: 5 standard errors (the Monte-Carlo check of the enumerated
expected loss, fixed seed). Everything else is exact: enumeration against closed
forms and theory.expected_attention (1e-12), the vanishing per-mask gradient at a
free-values optimum (rounding), determinism, the toy's trajectories reproduced bit
for bit. Seeds are fixed.
"""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.optimize import linprog

import theory
from dropkey.storage import to_jsonable
from simulations import toy_optimisation, toy_regimes
from simulations.cli import main as simulate
from simulations.common import check_tidy
from simulations.toy_exact import (
    dropout_free_values_minimum,
    enumerated_expected_loss,
    enumerated_weights,
    expected_loss,
    gradient_noise,
)
from simulations.toy_optimisation import training_gradients, training_weights
from simulations.toy_regimes import (
    CELL_COLUMNS,
    COLUMNS,
    KEY_COLUMNS,
    REGIMES,
    REGULARISERS,
    ToyRegimesConfig,
    peak_differences,
)
from theory.seeding import child_sequences

TINY = ToyRegimesConfig(
    n_problems=12,
    n_keys=5,
    dim=3,
    checkpoints=(2, 6),
    drop_ratios=(0.2, 0.4),
    logit_lr_multipliers=(1.0, 5.0),
    fixed_value_offsets=(0.0, 1.5),
    probe_masks=4,
    seed=11,
)


def _random_problem(seed: int, b: int = 6, n: int = 6, d: int = 3, logit_std: float = 1.0):
    generator = torch.Generator().manual_seed(seed)

    def normal(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    return logit_std * normal(b, n), normal(b, n, d), normal(b, d)


@pytest.fixture(scope="module")
def frame() -> pd.DataFrame:
    return toy_regimes.run(TINY)


# --- config --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("n_problems", 1),
        ("n_keys", 1),
        ("n_keys", 13),
        ("dim", 1),
        ("checkpoints", ()),
        ("checkpoints", (0,)),
        ("checkpoints", (50, 20)),
        ("checkpoints", (5, 5)),
        ("drop_ratios", (1.0,)),
        ("logit_lr_multipliers", (0.0,)),
        ("regimes", ("free_sampled", "bogus")),
        ("learning_rate", 0.0),
        ("fixed_learning_rate", -1.0),
        ("target_norm", 0.0),
        ("logit_init_std", -0.1),
        ("fixed_value_std", 0.0),
        ("fixed_value_offsets", (-1.0,)),
        ("dirichlet_alpha", 0.0),
        ("outside_margin", 0.0),
        ("probe_masks", 1),
        ("seed", -1),
    ],
)
def test_invalid_config_raises_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        dataclasses.replace(TINY, **{field: value})


def test_quick_and_full_are_valid_and_ordered():
    quick, full = ToyRegimesConfig.quick(), ToyRegimesConfig.full()
    assert quick.n_problems <= full.n_problems and quick.checkpoints[-1] <= full.checkpoints[-1]


# --- exact expected losses -------------------------------------------------------------------------


def test_enumerated_dropkey_loss_matches_monte_carlo_within_5_se():
    """Fixed seed; 200,000 sampled masks per problem, the toy's training weights."""
    logits, values, target = _random_problem(0)
    r, samples = 0.4, 200_000
    exact = enumerated_expected_loss("dropkey", logits, values, target, r)
    keep = (
        torch.rand((samples,) + tuple(logits.shape), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        >= r
    )
    weights = training_weights("dropkey", logits.expand_as(keep), keep, r)
    loss = 0.5 * ((torch.einsum("sbn,bnd->sbd", weights, values) - target) ** 2).sum(-1)
    se = loss.std(0) / math.sqrt(samples)
    assert torch.all((loss.mean(0) - exact).abs() < 5 * se)


@pytest.mark.parametrize("r", [0.1, 0.5])
def test_enumerated_mean_weights_equal_the_theory(r):
    logits, _, _ = _random_problem(2, b=5, n=7, logit_std=2.0)
    weights, probability = enumerated_weights("dropkey", logits, r)
    assert torch.isclose(probability.sum(), torch.tensor(1.0, dtype=torch.float64), atol=1e-14)
    mean = torch.einsum("m,bmn->bn", probability, weights).numpy()
    p = torch.softmax(logits, -1).numpy()
    np.testing.assert_allclose(mean, theory.expected_attention(p, r, all_dropped="uniform"), rtol=0, atol=1e-12)


@pytest.mark.parametrize("regulariser", ["dropkey", "dropout"])
@pytest.mark.parametrize("r", [0.1, 0.6])
def test_training_objective_equals_enumeration_with_its_gradients(regulariser, r):
    """expected_loss (closed form for dropout, matrix form for DropKey) = the sum over every mask."""
    logits, values, target = (x.requires_grad_(True) for x in _random_problem(3, logit_std=3.0))
    fast = expected_loss(regulariser, logits, values, target, r)
    reference = enumerated_expected_loss(regulariser, logits, values, target, r)
    torch.testing.assert_close(fast, reference, rtol=0, atol=1e-12)
    gradients = torch.autograd.grad(fast.sum(), (logits, values))
    reference_gradients = torch.autograd.grad(reference.sum(), (logits, values))
    for mine, theirs in zip(gradients, reference_gradients, strict=True):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-11)


def test_none_objective_is_the_clean_loss():
    logits, values, target = _random_problem(4)
    output = torch.einsum("bn,bnd->bd", torch.softmax(logits, -1), values)
    torch.testing.assert_close(
        expected_loss("none", logits, values, target, 0.3), 0.5 * ((output - target) ** 2).sum(-1)
    )


# --- the free-values optima --------------------------------------------------------------------------


def test_dropkey_per_mask_gradient_vanishes_at_the_free_values_optimum_dropout_does_not():
    """All v_j = y: every DropKey mask outputs y (zero gradient up to rounding); dropout's output is
    y sum b p / (1-r)."""
    logits, _, target = _random_problem(5, b=50)
    values = target[:, None, :].expand(-1, logits.shape[1], -1).clone()
    keep = torch.rand(logits.shape, generator=torch.Generator().manual_seed(6), dtype=torch.float64) >= 0.3
    keep[0] = False  # an all-dropped row (uniform weights) is an optimum too
    dropkey = training_gradients("dropkey", logits, values, target, keep, 0.3)
    dropout = training_gradients("dropout", logits, values, target, keep, 0.3)
    assert max(float(g.abs().max()) for g in dropkey) < 1e-14
    # Dropout: d/dv_j = w_j (c - 1) y with c = sum_j b_j p_j / (1 - r) != 1, on every row that keeps a key.
    kept = keep.any(-1)
    assert float(dropout[1].flatten(1).norm(dim=-1)[kept].min()) > 1e-3
    probes = (
        torch.rand((16,) + tuple(logits.shape), generator=torch.Generator().manual_seed(7), dtype=torch.float64) >= 0.3
    )
    assert float(gradient_noise("dropkey", logits, values, target, probes, 0.3).max()) < 1e-28
    assert float(gradient_noise("dropout", logits, values, target, probes, 0.3).min()) > 1e-6
    assert float(expected_loss("dropkey", logits, values, target, 0.3).abs().max()) < 1e-14


@pytest.mark.parametrize("r", [0.1, 0.3])
def test_dropout_free_values_minimum_is_the_same_for_every_p(r):
    """At v_j = y / ((N + k) p_j) dropout's exact E[L] is M^2 k / (2 (N + k)) and stationary, for any p."""
    logits, _, target = _random_problem(8, b=20, logit_std=1.5)
    n, k = logits.shape[1], r / (1 - r)
    p = torch.softmax(logits, -1)
    values = (target[:, None, :] / ((n + k) * p[:, :, None])).requires_grad_(True)
    logits.requires_grad_(True)
    loss = expected_loss("dropout", logits, values, target, r)
    minimum = dropout_free_values_minimum(r, n, 1.0) * (target**2).sum(-1)
    torch.testing.assert_close(loss, minimum, rtol=1e-12, atol=0)
    for gradient in torch.autograd.grad(loss.sum(), (logits, values)):
        assert float(gradient.abs().max()) < 1e-12
    probes = torch.rand((16,) + tuple(p.shape), generator=torch.Generator().manual_seed(9), dtype=torch.float64) >= r
    assert float(gradient_noise("dropout", logits.detach(), values.detach(), target, probes, r).min()) > 1e-6


# --- the fixed-values problems ------------------------------------------------------------------------


def test_fixed_problems_place_targets_inside_and_outside_and_pair_the_offsets():
    problems = toy_regimes._fixed_problems(TINY, child_sequences(TINY.seed, 5)[3])
    assert set(problems) == {(t, o) for t in ("inside", "outside") for o in TINY.fixed_value_offsets}
    low, high = TINY.fixed_value_offsets
    shift = problems["inside", high][1] - problems["inside", low][1]  # the same offset vector for every key
    torch.testing.assert_close(shift, shift[:, :1, :].expand_as(shift))
    torch.testing.assert_close(shift.norm(dim=-1), torch.full(shift.shape[:2], high - low, dtype=torch.float64))
    for (placement, _), (target, values) in problems.items():
        # y is in the hull iff some lambda >= 0 with sum 1 has sum_j lambda_j v_j = y (a linear program).
        for y, v in zip(target.numpy(), values.numpy(), strict=True):
            equalities = np.vstack([v.T, np.ones(len(v))])
            feasible = linprog(np.zeros(len(v)), A_eq=equalities, b_eq=np.append(y, 1.0), bounds=(0, None)).status == 0
            assert feasible == (placement == "inside")


# --- the run ------------------------------------------------------------------------------------------


def test_tiny_run_has_every_cell_and_regulariser_with_finite_values(frame):
    assert tuple(frame.columns) == COLUMNS
    check_tidy(frame, KEY_COLUMNS)
    assert np.isfinite(frame.select_dtypes("number").drop(columns="logit_lr_multiplier").to_numpy()).all()
    settings = {
        "free_sampled": len(TINY.logit_lr_multipliers),
        "fixed_exact": 2 * len(TINY.fixed_value_offsets),
        "free_exact": len(TINY.logit_lr_multipliers),
    }
    cells = frame.groupby(list(CELL_COLUMNS)).ngroups
    assert cells == sum(settings.values()) * len(TINY.drop_ratios) * len(TINY.checkpoints)
    assert set(frame["regime"]) == set(REGIMES)
    for _, group in frame.groupby(list(CELL_COLUMNS)):
        assert sorted(group["regulariser"].unique()) == sorted(REGULARISERS)
        assert len(group) == len(REGULARISERS) * TINY.n_problems
    fixed = frame[frame["regime"] == "fixed_exact"]
    assert np.isinf(fixed["logit_lr_multiplier"]).all()
    assert (frame.loc[frame["regulariser"] == "none", "grad_noise"] == 0).all()


def test_free_sampled_reproduces_the_toy_trajectories_bit_for_bit():
    config = dataclasses.replace(TINY, regimes=("free_sampled",), logit_lr_multipliers=(20.0,), checkpoints=(7,))
    toy = toy_regimes.matching_toy_config(
        config, regularisers=REGULARISERS, covariance_samples=2, logit_lr_multiplier=20.0
    )
    mine = toy_regimes.run(config)
    theirs = toy_optimisation.run(toy)
    theirs = theirs[theirs["step"] == 7]
    for regulariser in REGULARISERS:
        for r in config.drop_ratios:
            a = mine[(mine["regulariser"] == regulariser) & (mine["drop_ratio"] == r)].sort_values("problem")
            match = theirs["regulariser"] == regulariser
            match &= theirs["drop_ratio"] == (0.0 if regulariser == "none" else r)
            b = theirs[match].sort_values("problem")
            np.testing.assert_array_equal(a["peak"].to_numpy(), b["peak_weight"].to_numpy())
            np.testing.assert_array_equal(a["clean_loss"].to_numpy(), b["loss"].to_numpy())


def test_same_seed_same_frame_different_seed_different_frame(frame):
    pd.testing.assert_frame_equal(frame, toy_regimes.run(TINY))
    small = dataclasses.replace(TINY, regimes=("fixed_exact",), checkpoints=(3,))
    other = toy_regimes.run(dataclasses.replace(small, seed=small.seed + 1))
    assert not np.allclose(toy_regimes.run(small)["peak"].to_numpy(), other["peak"].to_numpy())


# --- summary ---------------------------------------------------------------------------------------------


def test_peak_differences_pair_problems_per_cell(frame):
    differences = peak_differences(frame)
    assert len(differences) == frame.groupby(list(CELL_COLUMNS)).ngroups
    assert all(d.shape == (TINY.n_problems,) for d in differences.values())
    label = "fixed values offset 1.5, target outside hull, exact loss, r=0.4, step 6"
    assert label in differences
    assert "free values, sampled masks, logit lr x5, r=0.2, step 2" in differences
    assert "free values, exact loss, logit lr x1, r=0.4, step 6" in differences
    cell = frame[
        (frame["regime"] == "fixed_exact")
        & (frame["target"] == "outside")
        & (frame["value_offset"] == 1.5)
        & (frame["drop_ratio"] == 0.4)
        & (frame["step"] == 6)
    ]
    peak = {g: part.sort_values("problem")["peak"].to_numpy() for g, part in cell.groupby("regulariser")}
    np.testing.assert_array_equal(differences[label], peak["dropout"] - peak["dropkey"])
    with pytest.raises(ValueError, match="dropkey"):
        peak_differences(frame[frame["regulariser"] != "dropkey"])


def test_summary_has_paired_statistics_per_cell_and_is_json_ready(frame):
    summary = toy_regimes.summarise(frame)
    differences = peak_differences(frame)
    assert list(summary["cells"]) == list(differences)
    for label, entry in summary["cells"].items():
        stats = entry["peak_dropout_minus_dropkey"]
        assert stats["n"] == TINY.n_problems
        assert stats["mean"] == pytest.approx(differences[label].mean(), abs=1e-15)
        assert stats["ci_low"] <= stats["mean"] <= stats["ci_high"]
        assert set(entry["means"]) == set(REGULARISERS)
    assert summary["dropout_free_values_minimum"]["r=0.2"] == pytest.approx(0.5 * 0.25 / (TINY.n_keys + 0.25))
    json.dumps(to_jsonable(summary), allow_nan=False)


def test_prose_is_present():
    for text in (toy_regimes.QUESTION, toy_regimes.METHOD, toy_regimes.EXPLANATION):
        assert 2 <= text.count(". ") + 1 and len(text) > 200


def test_cli_writes_results_summary_and_config(tmp_path, monkeypatch, capsys):
    tiny = dataclasses.replace(TINY, n_problems=4, checkpoints=(2,), drop_ratios=(0.3,))
    monkeypatch.setattr(ToyRegimesConfig, "quick", classmethod(lambda cls: tiny))
    assert simulate(["toy_regimes", "--out", str(tmp_path), "--seed", "3"]) == 0
    assert tuple(pd.read_csv(tmp_path / "results.csv").columns) == COLUMNS
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["cells"]
    assert json.loads((tmp_path / "config.json").read_text())["config"]["seed"] == 3
    assert "peak(dropout) - peak(dropkey)" in capsys.readouterr().out


def test_figures_are_deterministic_svg_with_small_tables(frame):
    summary = toy_regimes.summarise(frame)
    figures = toy_regimes.STUDY.figures(frame, summary)
    assert [figure.slug for figure in figures] == ["regime-map", "peak-by-length", "gradient-noise"]
    assert all(figure.kind == "svg" and figure.markup.startswith("<svg") for figure in figures)
    assert len(figures[0].data) == len(summary["cells"])
    assert all(len(figure.data) < len(frame) / 4 for figure in figures)
    again = toy_regimes.STUDY.figures(frame, summary)
    assert [figure.markup for figure in figures] == [figure.markup for figure in again]


def test_exact_losses_reject_bad_arguments_naming_them():
    logits, values, target = _random_problem(10)
    with pytest.raises(ValueError, match="regulariser"):
        expected_loss("dropattention", logits, values, target, 0.3)
    with pytest.raises(ValueError, match="drop_ratio"):
        enumerated_expected_loss("dropkey", logits, values, target, 1.0)
    with pytest.raises(ValueError, match="N"):
        expected_loss("dropkey", torch.zeros(2, 13, dtype=torch.float64), torch.zeros(2, 13, 3), target[:2], 0.3)
    with pytest.raises(ValueError, match="keep"):
        gradient_noise("dropout", logits, values, target, torch.ones((1,) + tuple(logits.shape), dtype=torch.bool), 0.3)
