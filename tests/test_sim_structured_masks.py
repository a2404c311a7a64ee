"""Monte-Carlo study of structured masks (simulations.structured_masks).

Statistical tolerance: 5 standard errors throughout. The drop fraction of every
row and the keep rate of every key are compared with their exact values (r, and
(1 - gamma)^coverage from dropkey.masks) within 5 SE; independent DropKey's
Monte-Carlo coefficients are compared with theory.smoothing_coefficients within
5 SE on the keys whose CLT approximation is reliable (num_samples / CV^2 >= 25,
CV from the exact moments). Seeds are fixed, so every run checks the same draws.
"""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

import theory
from dropkey.masks import block_keep_mask, cross_keep_mask, dropkey_keep_mask
from dropkey.storage import to_jsonable
from reports import claims as registry
from reports.evidence import Evidence
from reports.figures import study_figures
from simulations import structured_masks
from simulations.cli import main as simulate
from simulations.common import check_tidy
from simulations.structured_masks import (
    COLUMNS,
    KEY_COLUMNS,
    StructuredMasksConfig,
    keep_masks,
    weights_from_keep,
)

TINY = StructuredMasksConfig(
    grids=((5, 5),),
    drop_ratios=(0.1, 0.5),
    rows_per_shape=2,
    num_samples=4000,
    seed=7,
)


@pytest.fixture(scope="module")
def frame() -> pd.DataFrame:
    return structured_masks.run(TINY)


@pytest.fixture(scope="module")
def summary(frame: pd.DataFrame) -> dict:
    return structured_masks.summarise(frame)


def test_frame_is_tidy_with_named_columns(frame):
    assert tuple(frame.columns) == COLUMNS
    check_tidy(frame, KEY_COLUMNS)
    n_keys = 1 + 5 * 5
    variants = 1 + len(TINY.structured)
    assert len(frame) == variants * len(TINY.drop_ratios) * len(TINY.shapes) * TINY.rows_per_shape * n_keys
    assert set(frame["variant"]) == {"dropkey", "block", "cross"}
    assert frame[["p", "c_dropkey", "c_eff", "c_eff_se", "w_mean", "w_var", "drop_fraction"]].notna().all().all()
    assert frame["c_eff_se"].ge(0).all() and frame["w_var"].ge(0).all()
    # one probability vector per row, the same rows for every variant and ratio
    sums = frame.groupby(["grid", "shape", "row", "variant", "drop_ratio"])["p"].sum()
    np.testing.assert_allclose(sums.to_numpy(), 1.0, rtol=1e-12)
    assert frame.groupby(["shape", "row", "key"])["p"].nunique().eq(1).all()
    # under the uniform convention every weight vector sums to 1, so the expectations do too
    w_sums = frame.groupby(["grid", "shape", "row", "variant", "drop_ratio"])["w_mean"].sum()
    np.testing.assert_allclose(w_sums.to_numpy(), 1.0, rtol=1e-9)


def test_drop_fraction_is_calibrated(frame, summary):
    """Every row's empirical drop fraction within 5 SE of r; every key's keep rate within 5 SE of its exact marginal."""
    rows = frame.groupby(["grid", "shape", "row", "variant", "drop_ratio"]).first().reset_index()
    z = (rows["drop_fraction"] - rows["drop_ratio"]) / rows["drop_fraction_se"]
    assert np.all(np.abs(z) < 5), rows.loc[np.abs(z) >= 5]
    assert np.all(np.abs(frame["keep_rate_z"]) < 5)
    assert summary["calibration_max_abs_z"] < 5 and summary["keep_rate_max_abs_z"] < 5
    # the exact marginals average to 1 - r over the keys (calibrated mean, prefix at 1 - r)
    mean_keep = frame.groupby(["variant", "drop_ratio", "shape", "row"])["keep_prob"].mean().reset_index()
    np.testing.assert_allclose(mean_keep["keep_prob"], 1.0 - mean_keep["drop_ratio"], rtol=1e-9)


def test_calibration_check_detects_a_wrong_ratio(frame):
    """Negative control: against r + 0.05 the drop fractions are far outside 5 SE."""
    rows = frame.groupby(["grid", "shape", "row", "variant", "drop_ratio"]).first().reset_index()
    z = (rows["drop_fraction"] - (rows["drop_ratio"] + 0.05)) / rows["drop_fraction_se"]
    assert np.all(z < -5)


def test_independent_dropkey_matches_theory_within_five_standard_errors(frame, summary):
    """Independent DropKey's Monte-Carlo c_eff within 5 SE of theory.smoothing_coefficients (CLT-reliable keys)."""
    dropkey = frame[frame["variant"] == "dropkey"]
    reliable = dropkey["clt_reliable"].to_numpy(dtype=bool)
    assert reliable.mean() > 0.9
    assert np.all(np.abs(dropkey["z_vs_dropkey"].to_numpy()[reliable]) < 5)
    assert summary["dropkey_mc_check"]["fraction_within_5se_reliable"] == 1.0
    # the exact column is the theory's coefficient for the row, under the study's convention
    one = dropkey[(dropkey["shape"] == "local") & (dropkey["row"] == 0) & (dropkey["drop_ratio"] == 0.5)]
    exact = theory.smoothing_coefficients(one["p"].to_numpy(), 0.5, all_dropped="uniform")
    np.testing.assert_allclose(one["c_dropkey"].to_numpy(), exact, rtol=1e-12)
    # for independent masks the conditional coefficient is c_eff itself (P(kept) = 1 - r)
    np.testing.assert_allclose(dropkey["c_conditional"], dropkey["c_eff"], rtol=1e-12)


def test_masks_are_the_library_masks():
    """keep_masks draws exactly dropkey.masks' masks from the same generator state."""
    shape = (2, 50, 26)
    for variant, reference in (
        ("dropkey", lambda g: dropkey_keep_mask(shape, 0.3, generator=g)),
        ("block", lambda g: block_keep_mask(shape, 0.3, grid=(5, 5), num_prefix_tokens=1, side=3, generator=g)),
        ("cross", lambda g: cross_keep_mask(shape, 0.3, grid=(5, 5), num_prefix_tokens=1, arm=1, generator=g)),
    ):
        ours = keep_masks(variant, shape, 0.3, grid=(5, 5), config=TINY, generator_=torch.Generator().manual_seed(3))
        assert torch.equal(ours, reference(torch.Generator().manual_seed(3))), variant


@pytest.mark.parametrize(("convention", "expected"), [("uniform", 0.25), ("zero", 0.0), ("undropped", None)])
def test_weights_follow_the_all_dropped_convention(convention, expected):
    p = torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=torch.float64)
    kept = torch.tensor([[True, False, True, False], [False, False, False, False]])
    weights = weights_from_keep(kept, p, convention)
    assert weights.dtype == torch.float64
    torch.testing.assert_close(weights[0], torch.tensor([0.4, 0.0, 0.2, 0.0], dtype=torch.float64) / 0.6)
    torch.testing.assert_close(weights[1], p if expected is None else torch.full_like(p, expected))


def test_local_rows_peak_at_the_query_and_decay_with_distance():
    config = dataclasses.replace(TINY, local_logit_noise=0.0, cls_logit=-50.0)
    rows = structured_masks.make_rows("local", (5, 5), config, np.random.default_rng(0))
    ys, xs = structured_masks.patch_positions((5, 5), 1)
    for row in rows:
        top = int(np.argmax(row))
        distance2 = (ys[1:] - ys[top]) ** 2 + (xs[1:] - xs[top]) ** 2
        order = np.argsort(distance2, kind="stable")
        assert np.all(np.diff(row[1:][order]) <= 1e-15)


def test_summary_has_one_cell_per_variant_grid_shape_ratio(summary):
    assert len(summary["cells"]) == 3 * len(TINY.shapes) * len(TINY.drop_ratios)
    for cell in summary["cells"].values():
        assert cell["smooths_vs_dropkey"] in ("reference", "more", "less", "same")
        assert cell["rows"] == TINY.rows_per_shape
        assert -1.0 <= cell["spearman_rho"] <= 1.0
        assert 0.0 <= cell["violation_fraction"] <= 1.0
        assert cell["variance_ratio"] > 0
    # the DropKey cells compare the sampler with its own exact values: no monotonicity violation
    for cell in summary["cells"].values():
        if cell["variant"] == "dropkey":
            assert cell["violation_fraction"] == 0.0
            assert abs(cell["peak_ratio_minus_dropkey"]) < 5 * cell["peak_ratio_minus_dropkey_se"] + 1e-12


def test_same_seed_same_frame_different_seed_different_frame():
    small = dataclasses.replace(TINY, drop_ratios=(0.3,), rows_per_shape=1, num_samples=200)
    first = structured_masks.run(small)
    pd.testing.assert_frame_equal(first, structured_masks.run(small))
    other = structured_masks.run(dataclasses.replace(small, seed=small.seed + 1))
    assert not np.array_equal(first["c_eff"].to_numpy(), other["c_eff"].to_numpy())
    assert not np.array_equal(first["p"].to_numpy(), other["p"].to_numpy())


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("grids", ()),
        ("grids", [(5, 5)]),
        ("grids", ((5,),)),
        ("grids", ((0, 5),)),
        ("grids", ((1, 1),)),
        ("grids", ((65, 2),)),
        ("num_prefix_tokens", -1),
        ("num_prefix_tokens", 9),
        ("shapes", ("flat",)),
        ("structured", ("dropkey",)),
        ("structured", ("block", "block")),
        ("drop_ratios", (0.0,)),
        ("drop_ratios", (1.0,)),
        ("drop_ratios", (math.nan,)),
        ("rows_per_shape", 0),
        ("num_samples", 5),
        ("num_samples", 100.5),
        ("block_side", 0),
        ("cross_arm", 8),
        ("logit_std", 0.0),
        ("local_sigma", -1.0),
        ("local_logit_noise", -0.1),
        ("cls_logit", math.inf),
        ("all_dropped", "nan"),
        ("min_effective_samples", 0.0),
        ("seed", -1),
        ("seed", True),
    ],
)
def test_invalid_config_raises_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        dataclasses.replace(TINY, **{field: value})


def test_quick_and_full_configs_are_valid():
    quick, full = StructuredMasksConfig.quick(), StructuredMasksConfig.full()
    assert quick.grids == ((8, 8),)
    assert set(full.grids) == {(8, 8), (14, 14)}
    assert quick.num_samples <= full.num_samples


def test_cli_writes_results_summary_and_config(tmp_path, monkeypatch, capsys):
    tiny = dataclasses.replace(TINY, drop_ratios=(0.5,), rows_per_shape=1, num_samples=200)
    monkeypatch.setattr(StructuredMasksConfig, "quick", classmethod(lambda cls: tiny))
    assert simulate(["structured_masks", "--seed", "3", "--out", str(tmp_path)]) == 0
    written = pd.read_csv(tmp_path / "results.csv")
    assert tuple(written.columns) == COLUMNS
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert "block,5x5,local,r=0.5" in summary["cells"]
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["study"] == "structured_masks" and config["size"] == "quick"
    assert config["config"]["seed"] == 3 and json.loads((tmp_path / "provenance.json").read_text())["seed"] == 3
    assert "relative change" in capsys.readouterr().out


# --- the report: claim rule and figures ---------------------------------------------------------------


def test_relative_change_is_paired_by_row_against_dropkeys_own_noise(frame):
    """Per structured cell, one value per attention row: (TV to DropKey - DropKey's own MC TV) / DropKey's smoothing."""
    changes = structured_masks.relative_change_by_row(frame)
    per_row = structured_masks.per_row_metrics(frame)
    structured = per_row[per_row["variant"] != "dropkey"]
    assert set(changes) == {f"{v},{g},{s},r={r:g}" for v, g, s, r in
                            structured[["variant", "grid", "shape", "drop_ratio"]].drop_duplicates().to_numpy()}
    name = next(iter(changes))
    variant, grid, shape, r = name.split(",")[0], name.split(",")[1], name.split(",")[2], float(name.split("=")[-1])
    rows = per_row[(per_row["grid"] == grid) & (per_row["shape"] == shape) & (per_row["drop_ratio"] == r)]
    mine, reference = rows[rows["variant"] == variant], rows[rows["variant"] == "dropkey"]
    expected = (
        mine["tv_to_dropkey"].to_numpy() - reference["tv_to_dropkey"].to_numpy()
    ) / mine["dropkey_smoothing_tv"].to_numpy()
    np.testing.assert_allclose(changes[name], expected, rtol=1e-12)
    with pytest.raises(ValueError, match="independent-DropKey"):
        structured_masks.relative_change_by_row(frame[frame["variant"] != "dropkey"])


def test_claim_is_judged_from_the_study_results(frame, summary):
    claim = registry.claim("structured-masks-smoothing")
    assert claim.measured_by == ("structured_masks",)
    assert registry.assess(claim, Evidence()).status == "not yet measured"
    cached = to_jsonable(summary)  # as read back from the report cache
    verdict = registry.assess(
        claim, Evidence(summaries={"structured_masks": cached}, frames={"structured_masks": frame})
    )
    assert verdict.status in ("confirmed", "partly", "contradicted", "inconclusive")
    assert {f.label for f in verdict.findings} == set(structured_masks.relative_change_by_row(frame))


def test_figures_render_from_the_cached_results(frame, summary, tmp_path):
    path = tmp_path / "results.csv"
    frame.to_csv(path, index=False, float_format="%.12g")
    figures = study_figures("structured_masks", pd.read_csv(path), json.loads(json.dumps(to_jsonable(summary))))
    assert [figure.slug for figure in figures] == ["c-versus-p", "peak-ratio", "decomposition"]
    for figure in figures:
        assert len(figure.data) > 0
        assert figure.markup.startswith("<svg" if figure.kind == "svg" else "<img")
