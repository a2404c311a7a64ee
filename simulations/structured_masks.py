"""Structured masks: effective smoothing coefficients of DropKey-Block and DropKey-Cross.

DropKey-Block and DropKey-Cross (docs/theory.md section 4) drop keys in spatial
clusters on the patch grid (a ``side x side`` square, or a plus of arm ``arm``,
around every seed patch; masks from :mod:`dropkey.masks`, seed rate calibrated
so that the expected dropped fraction equals the drop ratio r). Their keep
indicators are correlated, so the exact DropKey coefficients c_j of
docs/theory.md section 2 (independent masks) no longer apply. This study measures,
by Monte-Carlo, the *effective* coefficients

    c_eff_j = E[w_j] / p_j,    w = b p / sum(b p),

under Block and Cross masks, against independent DropKey at the same r: its exact
c_j (:func:`theory.smoothing_coefficients`) and its own Monte-Carlo estimate (the
sanity check of the sampler). All-dropped convention: ``uniform`` by default
(weights 1/N, the official code's fp32 behaviour); an all-dropped row has
probability <= r^N for DropKey and is as negligible for the structured masks on
these grids, so the convention does not move the numbers.

Rows (keys = ``num_prefix_tokens`` class tokens followed by the H x W patches,
row-major, timm's layout; positions matter, so rows are *not* sorted):

- ``vit_like``: softmax of i.i.d. N(0, logit_std^2) logits (no spatial structure);
- ``local``: a spatially smooth row around a random query patch (y_q, x_q),
  logit_j = -((y_j - y_q)^2 + (x_j - x_q)^2) / (2 sigma^2) + N(0, noise^2),
  the class token's logit ``cls_logit`` (+ noise): the case where clustered drops
  should matter most (a block can remove most of the attended mass at once).

Per (grid, variant, r) one mask array of shape (rows, samples, N) is drawn for
all rows of both shapes in one call of the mask function (chunked over samples
to bound memory); weights are computed in torch float64. The config, rows, masks
and moments are in :mod:`simulations.structured_sampling` (re-exported here).

Two effects move c_eff away from c, and the study separates them exactly:

    c_eff_j = [P(b_j = 1) / (1 - r)] * c_cond_j,   c_cond_j = (1 - r) E[1 / (p_j + S_-j) | b_j = 1].

The first factor is *marginal*: the masks' seed rate is calibrated on the mean
only, so border patches are kept more often than interior ones (and prefix
tokens, dropped independently, at 1 - r); ``keep_prob`` is the exact marginal
from :func:`dropkey.masks.coverage_counts`. The second is the *correlation*
effect (neighbours of a kept key are more likely kept, and whole neighbourhoods
go at once); for independent DropKey c_cond = c exactly.

Measured per (grid, shape, row, variant, r, key): p, exact DropKey c_j, c_eff and
its standard error (sample sd / sqrt(S) / p_j), z = (c_eff - c_DropKey) / SE,
mean and variance of w_j (and DropKey's exact variance), the key's exact and
empirical keep rates (with z), c_cond, and (repeated over the keys of a row) the
row's empirical drop fraction with its SE. Intervals for
tiny keys can be unreliable (rare masks that keep a tiny key almost alone carry
most of E[w_j]; see :mod:`simulations.coefficients`): ``clt_reliable`` flags keys
with num_samples / CV^2 >= min_effective_samples, CV from DropKey's *exact*
moments (for the structured variants a proxy: their tails are heavier).

Summary per (variant, grid, shape, r): mean and median |c_eff - c_DropKey| over
reliable keys (the mean is dominated by tiny far keys of local rows, which a
block that removes the whole neighbourhood amplifies enormously),
the total-variation distance between the structured expected attention E[w] and
DropKey's exact one (``tv_to_dropkey``; DropKey's own Monte-Carlo value is the
noise floor), DropKey's own smoothing size TV(E_DropKey[w], p), their ratio after
subtracting the noise floor (``relative_change``), Spearman rho(c_eff, p) (with
DropKey's Monte-Carlo value as reference: the exact c gives -1, but sampling
noise on the many small keys lowers |rho| even for independent masks),
the p-weighted relative deviations sum p|c_eff - c| / sum p c and the same for
c_cond (the correlation part alone), Spearman rho of c_cond with p, the
fraction of strictly ordered pairs p_s > p_t with c_eff_s > c_eff_t by more than
5 SE (SEs combined as if independent), the peak ratio max(q)/max(p) and entropy
gain H(q) - H(p) of q = E[w] / sum E[w] (against DropKey's exact values), the
total variance sum_j Var[w_j] relative to DropKey's exact one, the calibration of
the drop fraction, and whether the variant smooths more, less or the same as
DropKey (paired peak-ratio difference beyond 3 Monte-Carlo SE).

Tidy output: one row per (grid, shape, row, variant, drop_ratio, key).
"""

from __future__ import annotations

import itertools
import logging
import math

import numpy as np
import pandas as pd
from scipy import stats
from tqdm import tqdm

import theory
from simulations.common import check_tidy, concat_frames, frame_from_columns
from simulations.registry import Study
from simulations.structured_sampling import (
    SHAPES,
    STRUCTURED,
    VARIANTS,
    Moments,
    StructuredMasksConfig,
    grid_name,
    keep_masks,
    keep_probability,
    make_rows,
    patch_positions,
    sample_moments,
    weights_from_keep,
)
from theory.conventions import entropy
from theory.seeding import child_sequences, generator

log = logging.getLogger(__name__)

#: The question this study answers and how (the first paragraphs of its report page).
QUESTION = (
    "Do correlated masks (DropKey-Block, DropKey-Cross) change the expected attention compared with "
    "independent DropKey at the same drop ratio? This is our hypothesis (that they do not), not a claim "
    "of the paper."
)
METHOD = (
    "Monte-Carlo estimates of E[w] under block and cross masks on patch grids are compared, attention row"
    " by attention row, with independent DropKey's exact E[w], beyond DropKey's own Monte-Carlo noise on "
    "the same row and in units of DropKey's own smoothing of that row."
)

#: Monotonicity violations count pairs reversed by more than this many SE.
VIOLATION_SE = 5.0
#: "more"/"less" smoothing than DropKey needs a peak-ratio difference beyond this many SE.
DIRECTION_SE = 3.0

KEY_COLUMNS = ("grid", "shape", "row", "variant", "drop_ratio", "key")
COLUMNS = KEY_COLUMNS + (
    "n_keys",
    "patch_y",
    "patch_x",
    "p",
    "c_dropkey",
    "c_eff",
    "c_eff_se",
    "z_vs_dropkey",
    "w_mean",
    "w_var",
    "w_var_dropkey",
    "keep_prob",
    "keep_rate",
    "keep_rate_z",
    "c_conditional",
    "clt_reliable",
    "drop_fraction",
    "drop_fraction_se",
)


# --- the study ---------------------------------------------------------------------------------------------


def _rows(config: StructuredMasksConfig) -> dict[tuple[tuple[int, int], str], np.ndarray]:
    """Rows of every (grid, shape); drawn from the 'rows' seed child, one grandchild per grid."""
    children = child_sequences(child_sequences(config.seed, 2)[0], len(config.grids))
    rows = {}
    for grid, child in zip(config.grids, children, strict=True):
        rng = generator(child)
        for shape in config.shapes:
            rows[(grid, shape)] = make_rows(shape, grid, config, rng)
    return rows


def run(config: StructuredMasksConfig, *, progress: bool = False) -> pd.DataFrame:
    """One row per (grid, shape, row, variant, drop_ratio, key) (see the module docstring)."""
    rows = _rows(config)
    variants = ("dropkey",) + tuple(config.structured)
    cells = list(itertools.product(config.grids, variants, config.drop_ratios))
    mask_children = child_sequences(child_sequences(config.seed, 2)[1], len(cells))
    frames = []
    for (grid, variant, r), child in tqdm(
        list(zip(cells, mask_children, strict=True)), desc="structured_masks", disable=not progress
    ):
        p = np.concatenate([rows[(grid, shape)] for shape in config.shapes])
        exact_c = theory.smoothing_coefficients(p, r, all_dropped=config.all_dropped)
        exact_var = theory.attention_variance(p, r, all_dropped=config.all_dropped)
        cv2 = exact_var / np.maximum((exact_c * p) ** 2, 1e-300)
        reliable = config.num_samples / np.maximum(cv2, 1e-300) >= config.min_effective_samples
        moments = sample_moments(variant, p, r, grid=grid, config=config, seed=child)
        keep_prob = keep_probability(variant, grid, r, config)
        keep_se = np.sqrt(keep_prob * (1.0 - keep_prob) / config.num_samples)
        difference = moments.ratio_mean - exact_c
        z = np.divide(
            difference,
            moments.ratio_se,
            out=np.where(difference == 0, 0.0, np.copysign(np.inf, difference)),
            where=moments.ratio_se > 0,
        )
        total, n = p.shape
        ys, xs = patch_positions(grid, config.num_prefix_tokens)
        per_shape = config.rows_per_shape
        frames.append(
            frame_from_columns(
                {
                    "grid": np.full((total, n), grid_name(grid), dtype=object),
                    "shape": np.repeat(np.array(config.shapes, dtype=object), per_shape * n),
                    "row": np.repeat(np.tile(np.arange(per_shape), len(config.shapes)), n),
                    "variant": np.full((total, n), variant, dtype=object),
                    "drop_ratio": np.full((total, n), r),
                    "key": np.tile(np.arange(n), total),
                    "n_keys": np.full((total, n), n),
                    "patch_y": np.tile(ys, total),
                    "patch_x": np.tile(xs, total),
                    "p": p,
                    "c_dropkey": exact_c,
                    "c_eff": moments.ratio_mean,
                    "c_eff_se": moments.ratio_se,
                    "z_vs_dropkey": z,
                    "w_mean": moments.w_mean,
                    "w_var": moments.w_var,
                    "w_var_dropkey": exact_var,
                    "keep_prob": np.tile(keep_prob, total),
                    "keep_rate": moments.keep_rate,
                    "keep_rate_z": (moments.keep_rate - keep_prob) / keep_se,
                    "c_conditional": moments.ratio_mean * (1.0 - r) / keep_prob,
                    "clt_reliable": reliable,
                    "drop_fraction": np.repeat(moments.drop_fraction, n),
                    "drop_fraction_se": np.repeat(moments.drop_fraction_se, n),
                }
            )
        )
        log.debug("cell %s %s r=%g done", grid_name(grid), variant, r)
    return concat_frames(frames)


# --- summary ------------------------------------------------------------------------------------------------


def _row_metrics(row: pd.DataFrame) -> dict[str, float]:
    """Metrics of one (grid, shape, row, variant, r) group, keys in key order."""
    p = row["p"].to_numpy()
    c = row["c_eff"].to_numpy()
    c_cond = row["c_conditional"].to_numpy()
    se = row["c_eff_se"].to_numpy()
    c_dk = row["c_dropkey"].to_numpy()
    w = row["w_mean"].to_numpy()
    w_dk = c_dk * p
    reliable = row["clt_reliable"].to_numpy(dtype=bool)
    q = w / w.sum()
    q_dk = w_dk / w_dk.sum()
    top = int(np.argmax(q))
    top_se = float(row["c_eff_se"].to_numpy()[top] * p[top] / w.sum())
    ordered = p[:, None] > p[None, :]  # pairs (s, t) with p_s > p_t
    combined = np.sqrt(se[:, None] ** 2 + se[None, :] ** 2)
    reversed_ = (c[:, None] - c[None, :]) > VIOLATION_SE * combined
    rho = stats.spearmanr(c, p).statistic if np.ptp(c) > 0 else math.nan
    rho_cond = stats.spearmanr(c_cond, p).statistic if np.ptp(c_cond) > 0 else math.nan
    return {
        "mean_abs_c_diff": float(np.abs(c - c_dk)[reliable].mean()) if reliable.any() else math.nan,
        "mean_abs_c_diff_all_keys": float(np.abs(c - c_dk).mean()),
        "median_abs_c_diff": float(np.median(np.abs(c - c_dk)[reliable])) if reliable.any() else math.nan,
        "max_abs_z_reliable": (
            float(np.abs(row["z_vs_dropkey"].to_numpy()[reliable]).max()) if reliable.any() else math.nan
        ),
        "tv_to_dropkey": float(0.5 * np.abs(w - w_dk).sum()),
        "dropkey_smoothing_tv": float(0.5 * np.abs(w_dk - p).sum()),
        "p_weighted_rel_c_diff": float((p * np.abs(c - c_dk)).sum() / w_dk.sum()),
        "p_weighted_rel_c_conditional_diff": float((p * np.abs(c_cond - c_dk)).sum() / w_dk.sum()),
        "spearman_rho": float(rho),
        "spearman_rho_conditional": float(rho_cond),
        "keep_rate_max_abs_z": float(row["keep_rate_z"].abs().max()),
        "peak_is_prefix": float(row["patch_y"].to_numpy()[top] < 0),
        "violation_fraction": float((ordered & reversed_).sum() / max(ordered.sum(), 1)),
        "peak_ratio": float(q.max() / p.max()),
        "peak_ratio_dropkey": float(q_dk.max() / p.max()),
        "peak_ratio_se": top_se / float(p.max()),
        "entropy_gain": float(entropy(q) - entropy(p)),
        "entropy_gain_dropkey": float(entropy(q_dk) - entropy(p)),
        "variance_ratio": float(row["w_var"].sum() / row["w_var_dropkey"].sum()),
        "drop_fraction": float(row["drop_fraction"].iloc[0]),
        "drop_fraction_se": float(row["drop_fraction_se"].iloc[0]),
    }


def _cell_name(variant: str, grid: str, shape: str, r: float) -> str:
    return f"{variant},{grid},{shape},r={r:g}"


def per_row_metrics(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per (grid, shape, row, variant, r): the metrics of :func:`_row_metrics`."""
    check_tidy(frame, KEY_COLUMNS)
    frame = frame.sort_values(list(KEY_COLUMNS), kind="stable")
    records = []
    for (grid, shape, row, variant, r), group in frame.groupby(
        ["grid", "shape", "row", "variant", "drop_ratio"], sort=True
    ):
        records.append(
            {"grid": grid, "shape": shape, "row": row, "variant": variant, "drop_ratio": r, **_row_metrics(group)}
        )
    return pd.DataFrame(records)


def relative_change_by_row(frame: pd.DataFrame) -> dict[str, np.ndarray]:
    """Per structured cell (variant, grid, shape, r): each row's first-moment change relative to DropKey's smoothing.

    For one attention row, (TV(E_structured[w], E_DropKey[w]) - TV(DropKey's Monte-Carlo E[w], its exact
    E[w])) / TV(E_DropKey[w], p): how far the structured variant's expected attention is from
    independent DropKey's, beyond DropKey's own Monte-Carlo noise on the same row, in units of
    DropKey's own smoothing of that row. Rows are the same attention rows for every variant, so the
    noise floor is paired by row; rows are the independent unit.
    """
    per_row = per_row_metrics(frame)
    keys = ["grid", "shape", "row", "drop_ratio"]
    reference = per_row[per_row["variant"] == "dropkey"].set_index(keys)
    if not len(reference):
        raise ValueError("the frame has no independent-DropKey rows to compare with")
    result = {}
    for (variant, grid, shape, r), group in per_row[per_row["variant"] != "dropkey"].groupby(
        ["variant", "grid", "shape", "drop_ratio"], sort=True
    ):
        floor = reference.loc[[tuple(key) for key in group[keys].to_numpy()]]
        change = (
            group["tv_to_dropkey"].to_numpy() - floor["tv_to_dropkey"].to_numpy()
        ) / group["dropkey_smoothing_tv"].to_numpy()
        result[_cell_name(variant, grid, shape, r)] = change.astype(np.float64)
    return result


def summarise(frame: pd.DataFrame) -> dict:
    """Per (variant, grid, shape, r): the comparison with DropKey; plus the sampler and calibration checks."""
    check_tidy(frame, KEY_COLUMNS)
    frame = frame.sort_values(list(KEY_COLUMNS), kind="stable")
    per_row = per_row_metrics(frame)
    cells: dict[str, dict] = {}
    for (variant, grid, shape, r), group in per_row.groupby(["variant", "grid", "shape", "drop_ratio"], sort=True):
        reference = per_row[
            (per_row["variant"] == "dropkey") & (per_row["grid"] == grid)
            & (per_row["shape"] == shape) & (per_row["drop_ratio"] == r)
        ]
        noise_floor = float(reference["tv_to_dropkey"].mean()) if len(reference) else math.nan
        tv = float(group["tv_to_dropkey"].mean())
        smoothing = float(group["dropkey_smoothing_tv"].mean())
        peak_diff = group["peak_ratio"] - group["peak_ratio_dropkey"]
        peak_diff_mean = float(peak_diff.mean())
        peak_diff_se = float(np.sqrt((group["peak_ratio_se"] ** 2).sum()) / len(group))
        if variant == "dropkey":
            direction = "reference"
        elif peak_diff_mean < -DIRECTION_SE * peak_diff_se:
            direction = "more"
        elif peak_diff_mean > DIRECTION_SE * peak_diff_se:
            direction = "less"
        else:
            direction = "same"
        fraction = float(group["drop_fraction"].mean())
        fraction_se = float(np.sqrt((group["drop_fraction_se"] ** 2).sum()) / len(group))
        cells[_cell_name(variant, grid, shape, r)] = {
            "variant": variant,
            "grid": grid,
            "shape": shape,
            "drop_ratio": float(r),
            "rows": int(len(group)),
            "mean_abs_c_diff": float(group["mean_abs_c_diff"].mean()),
            "mean_abs_c_diff_all_keys": float(group["mean_abs_c_diff_all_keys"].mean()),
            "median_abs_c_diff": float(group["median_abs_c_diff"].mean()),
            "tv_to_dropkey": tv,
            "tv_noise_floor": noise_floor,
            "dropkey_smoothing_tv": smoothing,
            "relative_change": max(tv - noise_floor, 0.0) / smoothing if smoothing > 0 else math.nan,
            "p_weighted_rel_c_diff": float(group["p_weighted_rel_c_diff"].mean()),
            "p_weighted_rel_c_conditional_diff": float(group["p_weighted_rel_c_conditional_diff"].mean()),
            "spearman_rho": float(group["spearman_rho"].mean()),
            "spearman_rho_conditional": float(group["spearman_rho_conditional"].mean()),
            "spearman_rho_max": float(group["spearman_rho"].max()),
            "spearman_rho_dropkey_mc": float(reference["spearman_rho"].mean()) if len(reference) else math.nan,
            "violation_fraction": float(group["violation_fraction"].mean()),
            "peak_ratio": float(group["peak_ratio"].mean()),
            "peak_ratio_dropkey": float(group["peak_ratio_dropkey"].mean()),
            "peak_ratio_minus_dropkey": peak_diff_mean,
            "peak_ratio_minus_dropkey_se": peak_diff_se,
            "fraction_rows_peak_is_prefix": float(group["peak_is_prefix"].mean()),
            "entropy_gain": float(group["entropy_gain"].mean()),
            "entropy_gain_dropkey": float(group["entropy_gain_dropkey"].mean()),
            "variance_ratio": float(group["variance_ratio"].mean()),
            "drop_fraction": fraction,
            "drop_fraction_se": fraction_se,
            "drop_fraction_z": (fraction - float(r)) / fraction_se if fraction_se > 0 else math.nan,
            "smooths_vs_dropkey": direction,
        }
    structured = {name: cell for name, cell in cells.items() if cell["variant"] != "dropkey"}
    dropkey = frame[frame["variant"] == "dropkey"]
    reliable = dropkey["clt_reliable"].to_numpy(dtype=bool)
    z = dropkey["z_vs_dropkey"].to_numpy()
    calibration_z = [cell["drop_fraction_z"] for cell in cells.values()]
    return {
        "cells": cells,
        "dropkey_mc_check": {
            "n_keys_checked": int(reliable.sum()),
            "n_keys_total": int(len(dropkey)),
            "max_abs_z_reliable": float(np.abs(z[reliable]).max()) if reliable.any() else None,
            "fraction_within_5se_reliable": float(np.mean(np.abs(z[reliable]) <= 5.0)) if reliable.any() else None,
            "mean_z_squared_reliable": float(np.mean(z[reliable] ** 2)) if reliable.any() else None,
        },
        "calibration_max_abs_z": float(np.nanmax(np.abs(calibration_z))),
        "keep_rate_max_abs_z": float(frame["keep_rate_z"].abs().max()),
        "n_keep_rates": int(len(frame)),
        "max_relative_change": max((cell["relative_change"] for cell in structured.values()), default=None),
        "max_tv_to_dropkey": max((cell["tv_to_dropkey"] for cell in structured.values()), default=None),
        "max_spearman_rho_structured": max((cell["spearman_rho_max"] for cell in structured.values()), default=None),
        "smooths_vs_dropkey": {name: cell["smooths_vs_dropkey"] for name, cell in structured.items()},
    }


def _headline(summary: dict) -> list[str]:
    lines = [
        f"DropKey MC vs exact: max |z| {summary['dropkey_mc_check']['max_abs_z_reliable']:.2f} on "
        f"{summary['dropkey_mc_check']['n_keys_checked']} reliable keys; drop-fraction calibration max |z| "
        f"{summary['calibration_max_abs_z']:.2f}",
        f"max relative change of the first moment vs DropKey {summary['max_relative_change']:.3f}",
    ]
    for name, cell in summary["cells"].items():
        if cell["variant"] == "dropkey":
            continue
        lines.append(
            f"{name}: TV {cell['tv_to_dropkey']:.4f} (DropKey smoothing {cell['dropkey_smoothing_tv']:.4f}, "
            f"rel {cell['relative_change']:.2f}), rho {cell['spearman_rho']:+.2f}, peak {cell['peak_ratio']:.3f} "
            f"vs {cell['peak_ratio_dropkey']:.3f}, var x{cell['variance_ratio']:.2f}, p-weighted |dc|/c "
            f"{cell['p_weighted_rel_c_diff']:.3f} (correlation part {cell['p_weighted_rel_c_conditional_diff']:.3f}) "
            f"-> {cell['smooths_vs_dropkey']}"
        )
    return lines


STUDY = Study(
    name="structured_masks",
    title="Structured masks: DropKey-Block and DropKey-Cross coefficients",
    config_class=StructuredMasksConfig,
    run=run,
    summarise=summarise,
    question=QUESTION,
    method=METHOD,
    page="simulations.pages.structured_masks",
    headline=_headline,
    rank=60,
)


__all__ = [
    "COLUMNS",
    "KEY_COLUMNS",
    "SHAPES",
    "STRUCTURED",
    "STUDY",
    "VARIANTS",
    "Moments",
    "StructuredMasksConfig",
    "grid_name",
    "keep_masks",
    "keep_probability",
    "make_rows",
    "patch_positions",
    "run",
    "sample_moments",
    "summarise",
    "weights_from_keep",
]
