"""Damping of the rich-get-richer loop: the expected beta-gradient ratio under DropKey.

Under DropKey the training loss is L = 1/2 || sum_j w_j v_j - y ||^2 with the
masked weights w, so the gradient with respect to beta_j = v_j . e is

    g_j = dL/dbeta_j = w_j (sum_k w_k beta_k - M).

docs/theory.md section 3 predicts, to first order, E[g_j] = E[w_j] (sum p beta - M)
= c_j p_j (sum p beta - M), so the ratio of the top two keys s, t (by p) shrinks
from the undamped p_s / p_t to c_s p_s / (c_t p_t). The exact expectation is
E[w_j sum_k w_k beta_k] - M E[w_j], which involves the mixed moments
E[w_j w_k] that the first-order formula drops. This study measures the ratio
E[g_s] / E[g_t] by Monte-Carlo over masks (all rows of a cell and all masks in
one array operation), computes it exactly by enumerating all 2^N masks when
N <= ``enumerate_max_keys``, and compares both with the two predictions.

Rows: attention rows of the named shapes (vit_like rows are random); beta_j ~
N(beta_mean, beta_std^2) per key, M = ``target_norm``. beta_mean = 0 is the
'far from optimum' regime of the paper's argument (|beta| << M); larger
beta_mean moves toward the optimum, where sum p beta - M -> 0 and the first-order
formula loses accuracy. All-dropped rows follow ``all_dropped``.

Tidy output: one row per (shape, n_keys, beta_mean, drop_ratio, row).
"""

from __future__ import annotations

import itertools
import logging
import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
from tqdm import tqdm

import theory
from simulations.common import (
    ROW_SHAPES,
    attention_row,
    check_tidy,
    chunk_sizes,
    concat_frames,
    frame_from_columns,
    vit_like_rows,
)
from simulations.registry import Study
from theory.checks import check_choice, check_drop_ratio, check_int, check_real, check_seed, check_tuple
from theory.conventions import check_all_dropped, renormalise_kept
from theory.seeding import child_sequences, generator

log = logging.getLogger(__name__)

#: The question this study answers and how (the first paragraphs of its report page).
QUESTION = (
    "Does DropKey damp the rich-get-richer loop: is the expected beta-gradient ratio of the two "
    "most-attended keys below the undamped p_s/p_t, and how close is the paper's first-order form c_s "
    "p_s/(c_t p_t)?"
)
METHOD = (
    "For random attention rows and values far from (and nearer to) the optimum, the expected gradients "
    "are computed exactly by enumerating all 2^N masks (by Monte-Carlo where N is large); each row's "
    "ratio is compared with p_s/p_t (the log ratio is the paired difference, rows the unit) and with the "
    "first-order prediction."
)

KEY_COLUMNS = ("shape", "n_keys", "beta_mean", "drop_ratio", "row")
COLUMNS = KEY_COLUMNS + (
    "p_top",
    "p_second",
    "sum_p_beta_minus_m",
    "c_top",
    "c_second",
    "ratio_undamped",
    "ratio_first_order",
    "ratio_mc",
    "ratio_mc_se",
    "ratio_exact",
    "grad_top_mc",
    "grad_top_mc_se",
    "grad_second_mc",
    "grad_second_mc_se",
    "grad_top_first_order",
    "grad_second_first_order",
    "grad_top_exact",
    "grad_second_exact",
)


@dataclass(frozen=True)
class GradientDampingConfig:
    """Grid and sizes of the gradient-damping study.

    ns: row lengths N in [2, 4096].  shapes: row shapes (not 'flat': its top two
    keys tie).  rows_per_cell (>= 1): rows (each with its own beta, and its own p
    for vit_like).  drop_ratios in (0, 1).  beta_means: real numbers in [-10, 10];
    beta_std in [0, 10]; target_norm M in (0, 100].  num_samples (>= 10): masks per
    row.  enumerate_max_keys in [0, 16]: exact enumeration for N up to this.
    all_dropped: convention.  peak_mass in (0, 1), power_exponent in [0, 10],
    logit_std in (0, 20]: row-shape parameters.
    """

    ns: tuple[int, ...] = (8, 16, 65)
    shapes: tuple[str, ...] = ("peaked", "power_law", "vit_like")
    rows_per_cell: int = 100
    drop_ratios: tuple[float, ...] = (0.05, 0.1, 0.3, 0.5, 0.7, 0.9)
    beta_means: tuple[float, ...] = (0.0, 0.5, 0.9)
    beta_std: float = 0.1
    target_norm: float = 1.0
    num_samples: int = 10000
    enumerate_max_keys: int = 12
    all_dropped: str = "uniform"
    peak_mass: float = 0.5
    power_exponent: float = 1.0
    logit_std: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        check_tuple(self.ns, "ns", lambda v, n: check_int(v, n, 2, 4096))
        check_tuple(
            self.shapes, "shapes", lambda v, n: check_choice(v, n, tuple(s for s in ROW_SHAPES if s != "flat"))
        )
        check_int(self.rows_per_cell, "rows_per_cell", 1)
        check_tuple(self.drop_ratios, "drop_ratios", lambda v, n: check_drop_ratio(v, n, allow_zero=False))
        check_tuple(self.beta_means, "beta_means", lambda v, n: check_real(v, n, -10.0, 10.0))
        check_real(self.beta_std, "beta_std", 0.0, 10.0)
        check_real(self.target_norm, "target_norm", 0.0, 100.0, low_open=True)
        check_int(self.num_samples, "num_samples", 10)
        check_int(self.enumerate_max_keys, "enumerate_max_keys", 0, 16)
        check_all_dropped(self.all_dropped)
        check_real(self.peak_mass, "peak_mass", 0.0, 1.0, low_open=True, high_open=True)
        check_real(self.power_exponent, "power_exponent", 0.0, 10.0)
        check_real(self.logit_std, "logit_std", 0.0, 20.0, low_open=True)
        check_seed(self.seed)

    @classmethod
    def quick(cls) -> GradientDampingConfig:
        """N = 8 (exact enumeration), 50 rows per cell, 4000 masks: a few seconds."""
        return cls(
            ns=(8,),
            rows_per_cell=50,
            drop_ratios=(0.1, 0.3, 0.5, 0.7),
            beta_means=(0.0, 0.5),
            num_samples=4000,
        )

    @classmethod
    def full(cls) -> GradientDampingConfig:
        """N in (8, 16, 65), six drop ratios, three beta regimes, 10000 masks per row (minutes)."""
        return cls()


def _rows(config: GradientDampingConfig, shape: str, n: int, rng: np.random.Generator) -> np.ndarray:
    if shape == "vit_like":
        return vit_like_rows(rng, config.rows_per_cell, n, config.logit_std)
    row = attention_row(
        shape, n, peak_mass=config.peak_mass, power_exponent=config.power_exponent, logit_std=config.logit_std
    )
    return np.tile(row, (config.rows_per_cell, 1))


def _gradients(weights: np.ndarray, beta: np.ndarray, m: float) -> np.ndarray:
    """g_j = w_j (sum_k w_k beta_k - M) for weights (..., R, N) and beta (R, N)."""
    return weights * ((weights * beta).sum(-1, keepdims=True) - m)


def monte_carlo_gradients(
    p: np.ndarray,
    beta: np.ndarray,
    m: float,
    drop_ratio: float,
    pair: tuple[np.ndarray, np.ndarray],
    *,
    num_samples: int,
    rng: np.random.Generator,
    all_dropped: str,
) -> dict[str, np.ndarray]:
    """Sample means of g_s and g_t per row, their SEs and the delta-method SE of their ratio."""
    rows = np.arange(p.shape[0])
    s, t = pair
    sums = np.zeros((5, p.shape[0]))  # g_s, g_t, g_s^2, g_t^2, g_s g_t
    for size in chunk_sizes(num_samples, p.size):
        kept = rng.random((size,) + p.shape) >= drop_ratio
        gradient = _gradients(renormalise_kept(p, kept, all_dropped, present=p > 0), beta, m)
        g_s, g_t = gradient[:, rows, s], gradient[:, rows, t]
        sums += np.stack([g_s.sum(0), g_t.sum(0), (g_s**2).sum(0), (g_t**2).sum(0), (g_s * g_t).sum(0)])
    n = num_samples
    mean_s, mean_t = sums[0] / n, sums[1] / n
    correction = n / (n - 1)
    var_s = np.maximum(sums[2] / n - mean_s**2, 0.0) * correction
    var_t = np.maximum(sums[3] / n - mean_t**2, 0.0) * correction
    cov = (sums[4] / n - mean_s * mean_t) * correction
    ratio = mean_s / mean_t
    # Delta method for a ratio of correlated means.
    ratio_var = (var_s - 2 * ratio * cov + ratio**2 * var_t) / (n * mean_t**2)
    return {
        "grad_top_mc": mean_s,
        "grad_second_mc": mean_t,
        "grad_top_mc_se": np.sqrt(var_s / n),
        "grad_second_mc_se": np.sqrt(var_t / n),
        "ratio_mc": ratio,
        "ratio_mc_se": np.sqrt(np.maximum(ratio_var, 0.0)),
    }


def exact_gradients(
    p: np.ndarray, beta: np.ndarray, m: float, drop_ratio: float, all_dropped: str
) -> np.ndarray:
    """E[g] (R, N) by enumerating all 2^N keep masks (small N only)."""
    n = p.shape[1]
    masks = np.array(list(itertools.product((False, True), repeat=n)))  # (2^N, N)
    kept_count = masks.sum(1)
    probability = (1.0 - drop_ratio) ** kept_count * drop_ratio ** (n - kept_count)  # (2^N,)
    weights = renormalise_kept(p[None], masks[:, None, :], all_dropped, present=p[None] > 0)  # (2^N, R, N)
    return np.einsum("k,krn->rn", probability, _gradients(weights, beta, m))


def run(config: GradientDampingConfig, *, progress: bool = False) -> pd.DataFrame:
    """One row per attention row and drop ratio (see the module docstring)."""
    cells = list(itertools.product(config.shapes, config.ns, config.beta_means))
    rows_root, beta_root, masks_root = child_sequences(config.seed, 3)
    row_children = rows_root.spawn(len(cells))
    beta_children = beta_root.spawn(len(cells))
    mask_children = masks_root.spawn(len(cells) * len(config.drop_ratios))
    m = config.target_norm
    frames = []
    jobs = [
        (cell_index, cell, ratio_index, r)
        for cell_index, cell in enumerate(cells)
        for ratio_index, r in enumerate(config.drop_ratios)
    ]
    for cell_index, (shape, n, beta_mean), ratio_index, r in tqdm(
        jobs, desc="gradient_damping", disable=not progress
    ):
        p = _rows(config, shape, n, generator(row_children[cell_index]))
        beta = generator(beta_children[cell_index]).normal(beta_mean, config.beta_std, size=p.shape)
        index = np.arange(p.shape[0])
        top2 = np.argsort(-p, axis=1, kind="stable")[:, :2]
        pair = (top2[:, 0], top2[:, 1])
        expected_w = theory.expected_attention(p, r, all_dropped=config.all_dropped)
        coefficients = expected_w / p
        gap = (p * beta).sum(1) - m
        first_order = expected_w * gap[:, None]
        rng = generator(mask_children[cell_index * len(config.drop_ratios) + ratio_index])
        mc = monte_carlo_gradients(
            p, beta, m, r, pair, num_samples=config.num_samples, rng=rng, all_dropped=config.all_dropped
        )
        if n <= config.enumerate_max_keys:
            exact = exact_gradients(p, beta, m, r, config.all_dropped)
            exact_s, exact_t = exact[index, pair[0]], exact[index, pair[1]]
        else:
            exact_s = exact_t = np.full(p.shape[0], np.nan)
        p_s, p_t = p[index, pair[0]], p[index, pair[1]]
        c_s, c_t = coefficients[index, pair[0]], coefficients[index, pair[1]]
        columns = {
            "shape": np.full(p.shape[0], shape, dtype=object),
            "n_keys": np.full(p.shape[0], n),
            "beta_mean": np.full(p.shape[0], beta_mean),
            "drop_ratio": np.full(p.shape[0], r),
            "row": index,
            "p_top": p_s,
            "p_second": p_t,
            "sum_p_beta_minus_m": gap,
            "c_top": c_s,
            "c_second": c_t,
            "ratio_undamped": p_s / p_t,
            "ratio_first_order": (c_s * p_s) / (c_t * p_t),
            "ratio_exact": exact_s / exact_t,
            "grad_top_first_order": first_order[index, pair[0]],
            "grad_second_first_order": first_order[index, pair[1]],
            "grad_top_exact": exact_s,
            "grad_second_exact": exact_t,
        }
        columns.update(mc)
        frames.append(frame_from_columns({name: columns[name] for name in COLUMNS}))
    return concat_frames(frames)


def _median(values: pd.Series) -> float:
    array = values.to_numpy(dtype=np.float64)
    array = array[np.isfinite(array)]
    return float(np.median(array)) if array.size else math.nan


def log_damping_by_row(frame: pd.DataFrame, beta_mean: float = 0.0) -> dict[str, np.ndarray]:
    """Per drop ratio ("r=0.1") at ``beta_mean``: each row's log(ratio / ratio_undamped) (rows in key order).

    The ratio is the exact (enumerated) one where the row has it, else the Monte-Carlo one; < 0 is
    damping. A non-positive Monte-Carlo ratio (sampling noise on a tiny gradient) has no log: NaN.
    """
    check_tidy(frame, KEY_COLUMNS)
    cells = frame[frame["beta_mean"] == beta_mean].sort_values(list(KEY_COLUMNS), kind="stable")
    if not len(cells):
        raise ValueError(f"the frame has no rows at beta_mean={beta_mean:g}")
    result = {}
    for r, group in cells.groupby("drop_ratio", sort=True):
        ratio = group["ratio_exact"].where(group["ratio_exact"].notna(), group["ratio_mc"]).to_numpy(np.float64)
        undamped = group["ratio_undamped"].to_numpy(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            value = np.where((ratio > 0) & (undamped > 0), np.log(ratio / undamped), np.nan)
        result[f"r={r:g}"] = value
    return result


def summarise(frame: pd.DataFrame) -> dict:
    """Per (beta_mean, drop_ratio), and per shape and N: measured vs predicted ratios.

    'damping' is a ratio divided by the undamped p_s/p_t (1 = no damping); the
    first-order error is ratio_first_order / ratio_exact - 1 (or / ratio_mc - 1).
    Medians are taken over rows; pooled medians mix shapes, so compare methods
    through the per-row errors, not through differences of pooled medians.
    """
    check_tidy(frame, KEY_COLUMNS)
    frame = frame.assign(
        damping_mc=frame["ratio_mc"] / frame["ratio_undamped"],
        damping_exact=frame["ratio_exact"] / frame["ratio_undamped"],
        damping_first_order=frame["ratio_first_order"] / frame["ratio_undamped"],
        ratio_error_first_order=frame["ratio_first_order"] / frame["ratio_exact"] - 1.0,
        ratio_error_first_order_mc=frame["ratio_first_order"] / frame["ratio_mc"] - 1.0,
        grad_error_first_order=(frame["grad_top_first_order"] - frame["grad_top_exact"])
        / frame["grad_top_exact"].abs(),
        z_mc_vs_exact=(frame["grad_top_mc"] - frame["grad_top_exact"]) / frame["grad_top_mc_se"],
        mc_below_undamped_5se=frame["ratio_mc"] + 5 * frame["ratio_mc_se"] < frame["ratio_undamped"],
        mc_above_undamped_5se=frame["ratio_mc"] - 5 * frame["ratio_mc_se"] > frame["ratio_undamped"],
        first_order_within_5se=(frame["ratio_mc"] - frame["ratio_first_order"]).abs()
        <= 5 * frame["ratio_mc_se"],
    )
    cells = {}
    for (beta_mean, r), group in frame.groupby(["beta_mean", "drop_ratio"], sort=True):
        has_exact = group["ratio_exact"].notna()
        exact = group[has_exact]
        cells[f"beta_mean={beta_mean:g},r={r:g}"] = {
            "n_rows": int(len(group)),
            "median_ratio_undamped": _median(group["ratio_undamped"]),
            "median_ratio_mc": _median(group["ratio_mc"]),
            "median_ratio_first_order": _median(group["ratio_first_order"]),
            "median_damping_mc": _median(group["damping_mc"]),
            "median_damping_first_order": _median(group["damping_first_order"]),
            "median_damping_exact": _median(group["damping_exact"]),
            "fraction_mc_below_undamped": float((group["ratio_mc"] < group["ratio_undamped"]).mean()),
            "fraction_mc_below_undamped_5se": float(group["mc_below_undamped_5se"].mean()),
            "fraction_mc_above_undamped_5se": float(group["mc_above_undamped_5se"].mean()),
            "fraction_exact_below_undamped": float(
                (exact["ratio_exact"] < exact["ratio_undamped"]).mean()
            )
            if len(exact)
            else None,
            "fraction_first_order_within_5se_of_mc": float(group["first_order_within_5se"].mean()),
            "median_abs_ratio_error_first_order_vs_exact": _median(exact["ratio_error_first_order"].abs())
            if len(exact)
            else None,
            "max_abs_ratio_error_first_order_vs_exact": float(exact["ratio_error_first_order"].abs().max())
            if len(exact)
            else None,
            "median_abs_ratio_error_first_order_vs_mc": _median(group["ratio_error_first_order_mc"].abs()),
            "median_signed_ratio_error_first_order_vs_mc": _median(group["ratio_error_first_order_mc"]),
            "median_abs_grad_error_first_order_vs_exact": _median(exact["grad_error_first_order"].abs())
            if len(exact)
            else None,
            "median_sum_p_beta_minus_m": _median(group["sum_p_beta_minus_m"]),
        }
    by_shape = {}
    for (shape, n, beta_mean, r), group in frame.groupby(
        ["shape", "n_keys", "beta_mean", "drop_ratio"], sort=True
    ):
        by_shape[f"{shape},N={n},beta_mean={beta_mean:g},r={r:g}"] = {
            "median_ratio_undamped": _median(group["ratio_undamped"]),
            "median_damping_mc": _median(group["damping_mc"]),
            "median_damping_first_order": _median(group["damping_first_order"]),
            "median_signed_ratio_error_first_order_vs_mc": _median(group["ratio_error_first_order_mc"]),
            "median_abs_ratio_error_first_order_vs_mc": _median(group["ratio_error_first_order_mc"].abs()),
        }
    z = frame["z_mc_vs_exact"].to_numpy(dtype=np.float64)
    z = z[np.isfinite(z)]
    return {
        "cells": cells,
        "cells_by_shape": by_shape,
        "n_rows": int(len(frame)),
        "n_rows_with_exact": int(frame["ratio_exact"].notna().sum()),
        "mc_vs_exact_max_abs_z": float(np.abs(z).max()) if z.size else None,
        "mc_vs_exact_mean_z_squared": float(np.mean(z**2)) if z.size else None,
        "overall_fraction_mc_below_undamped_5se": float(frame["mc_below_undamped_5se"].mean()),
        "overall_fraction_mc_above_undamped_5se": float(frame["mc_above_undamped_5se"].mean()),
    }


def _headline(summary: dict) -> list[str]:
    lines = []
    for name, cell in summary["cells"].items():
        lines.append(
            f"{name}: ratio/undamped mc {cell['median_damping_mc']:.3f}, first-order "
            f"{cell['median_damping_first_order']:.3f}; first-order ratio error (median) "
            f"{cell['median_abs_ratio_error_first_order_vs_mc']:.2e}"
        )
    lines.append(f"MC vs exact enumeration: mean z^2 {summary['mc_vs_exact_mean_z_squared']}")
    return lines


STUDY = Study(
    name="gradient_damping",
    title="Damping of the rich-get-richer loop",
    config_class=GradientDampingConfig,
    run=run,
    summarise=summarise,
    question=QUESTION,
    method=METHOD,
    page="simulations.pages.gradient_damping",
    headline=_headline,
    rank=20,
)
