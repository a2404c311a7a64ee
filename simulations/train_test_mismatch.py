"""Train/test mismatch of DropKey and Monte-Carlo inference as a remedy.

Training sees the masked output o = sum_j w_j v_j, whose expectation is
E_train[o] = sum_j E[w_j] v_j = sum_j c_j p_j v_j (exact, theory.expected_attention),
while plain inference uses o_test = sum_j p_j v_j. The gap
E_train[o] - o_test = sum_j (c_j - 1) p_j v_j is measured as a function of the
drop ratio r and the row length N (absolute and relative to ||o_test||).

Monte-Carlo inference averages K masked outputs, o_K = (1/K) sum_k o^(k). Because
E[o_K] = E_train[o] exactly, E||o_K - E_train[o]||^2 = tr Cov(o) / K, so the RMS
distance to E_train[o] falls as K^(-1/2), while the distance to o_test tends to
the gap. Each K uses fresh masks (independent of the other K), and the slope of
log RMS distance against log K is fitted by weighted least squares with the
standard error of each log-RMS point (delta method over problems).

Problems: rows of the named shapes (vit_like rows random per problem), values
v_j ~ N(0, I_d) independent per problem. All-dropped rows follow ``all_dropped``
(both in E_train[o] and in the masks).

Tidy output: one row per (shape, n_keys, drop_ratio, problem, k) with the two
distances of that Monte-Carlo inference; the per-problem gap columns (gap,
relative_gap, norm_test) repeat across k (they do not depend on k).
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
    concat_frames,
    fit_line,
    frame_from_columns,
    sample_dropkey_weights,
    vit_like_rows,
)
from simulations.registry import Study
from theory.checks import check_choice, check_drop_ratio, check_int, check_real, check_seed, check_tuple
from theory.conventions import check_all_dropped
from theory.seeding import child_sequences, generator

log = logging.getLogger(__name__)

#: The question this study answers and how (the first paragraphs of its report page).
QUESTION = (
    "How far is plain inference from the training expectation of a DropKey layer, and does averaging K "
    "masked passes (Monte-Carlo inference) close the gap?"
)
METHOD = (
    "For random rows and values, the training expectation E_train[o] is computed exactly and compared "
    "with plain inference and with the mean of K masked passes; the slope of the RMS error against K "
    "checks the inference code against the central-limit rate K^-1/2."
)

KEY_COLUMNS = ("shape", "n_keys", "drop_ratio", "problem", "k")
COLUMNS = KEY_COLUMNS + ("dist_to_train", "dist_to_test", "gap", "relative_gap", "norm_test")


@dataclass(frozen=True)
class TrainTestMismatchConfig:
    """Grid and sizes of the mismatch study.

    ns: row lengths N in [1, 4096].  drop_ratios in (0, 1).  shapes: row shapes.
    n_problems (>= 2): problems per (shape, N, r).  dim d in [1, 4096].  ks:
    Monte-Carlo inference sample counts (>= 1; at least 2 distinct for the fit).
    all_dropped: convention.  peak_mass in (0, 1), power_exponent in [0, 10],
    logit_std in (0, 20]: row-shape parameters.
    """

    ns: tuple[int, ...] = (4, 16, 65, 197)
    drop_ratios: tuple[float, ...] = (0.05, 0.1, 0.3, 0.5, 0.7, 0.9)
    shapes: tuple[str, ...] = ("peaked", "power_law", "vit_like")
    n_problems: int = 400
    dim: int = 8
    ks: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
    all_dropped: str = "uniform"
    peak_mass: float = 0.9
    power_exponent: float = 1.0
    logit_std: float = 2.0
    seed: int = 0

    def __post_init__(self) -> None:
        check_tuple(self.ns, "ns", lambda v, n: check_int(v, n, 1, 4096))
        check_tuple(self.drop_ratios, "drop_ratios", lambda v, n: check_drop_ratio(v, n, allow_zero=False))
        check_tuple(self.shapes, "shapes", lambda v, n: check_choice(v, n, ROW_SHAPES))
        check_int(self.n_problems, "n_problems", 2)
        check_int(self.dim, "dim", 1, 4096)
        check_tuple(self.ks, "ks", lambda v, n: check_int(v, n, 1, 1_000_000))
        if len(self.ks) < 2:
            raise ValueError(f"ks must hold at least 2 distinct sample counts, got {self.ks!r}")
        check_all_dropped(self.all_dropped)
        check_real(self.peak_mass, "peak_mass", 0.0, 1.0, low_open=True, high_open=True)
        check_real(self.power_exponent, "power_exponent", 0.0, 10.0)
        check_real(self.logit_std, "logit_std", 0.0, 20.0, low_open=True)
        check_seed(self.seed)

    @classmethod
    def quick(cls) -> TrainTestMismatchConfig:
        """N in (4, 16, 65), r in (0.1, 0.3, 0.5, 0.9), 100 problems per cell."""
        return cls(ns=(4, 16, 65), drop_ratios=(0.1, 0.3, 0.5, 0.9), n_problems=100)

    @classmethod
    def full(cls) -> TrainTestMismatchConfig:
        """N up to 197, six drop ratios, 400 problems per cell."""
        return cls()


def _rows(config: TrainTestMismatchConfig, shape: str, n: int, rng: np.random.Generator) -> np.ndarray:
    if shape == "vit_like":
        return vit_like_rows(rng, config.n_problems, n, config.logit_std)
    row = attention_row(
        shape, n, peak_mass=config.peak_mass, power_exponent=config.power_exponent, logit_std=config.logit_std
    )
    return np.tile(row, (config.n_problems, 1))


def _expected_weights(p: np.ndarray, r: float, all_dropped: str, identical_rows: bool) -> np.ndarray:
    """E[w] per row; identical rows are computed once (the integral is the slow part)."""
    if identical_rows:
        return np.tile(theory.expected_attention(p[0], r, all_dropped=all_dropped), (p.shape[0], 1))
    return theory.expected_attention(p, r, all_dropped=all_dropped)


def run(config: TrainTestMismatchConfig, *, progress: bool = False) -> pd.DataFrame:
    """One row per Monte-Carlo inference (see the module docstring)."""
    cells = list(itertools.product(config.shapes, config.ns))
    rows_root, values_root, masks_root = child_sequences(config.seed, 3)
    row_children = rows_root.spawn(len(cells))
    value_children = values_root.spawn(len(cells))
    mask_children = masks_root.spawn(len(cells) * len(config.drop_ratios))
    ks = np.array(sorted(config.ks))
    frames = []
    jobs = [(c, cell, i, r) for c, cell in enumerate(cells) for i, r in enumerate(config.drop_ratios)]
    for cell_index, (shape, n), ratio_index, r in tqdm(jobs, desc="train_test_mismatch", disable=not progress):
        p = _rows(config, shape, n, generator(row_children[cell_index]))
        values = generator(value_children[cell_index]).normal(size=(config.n_problems, n, config.dim))
        expected = _expected_weights(p, r, config.all_dropped, identical_rows=shape != "vit_like")
        train = np.einsum("rn,rnd->rd", expected, values)
        test = np.einsum("rn,rnd->rd", p, values)
        gap = np.linalg.norm(train - test, axis=1)
        norm_test = np.linalg.norm(test, axis=1)
        relative = np.divide(gap, norm_test, out=np.full_like(gap, np.nan), where=norm_test > 0)
        rng = generator(mask_children[cell_index * len(config.drop_ratios) + ratio_index])
        dist_train = np.empty((ks.size, config.n_problems))
        dist_test = np.empty((ks.size, config.n_problems))
        for index, k in enumerate(ks):  # fresh masks for every K
            weights = sample_dropkey_weights(p, r, int(k), rng, config.all_dropped)  # (K, R, N)
            inference = np.einsum("krn,rnd->rd", weights, values) / k
            dist_train[index] = np.linalg.norm(inference - train, axis=1)
            dist_test[index] = np.linalg.norm(inference - test, axis=1)
        problems = config.n_problems
        frames.append(
            frame_from_columns(
                {
                    "shape": np.full((ks.size, problems), shape, dtype=object),
                    "n_keys": np.full((ks.size, problems), n),
                    "drop_ratio": np.full((ks.size, problems), r),
                    "problem": np.tile(np.arange(problems), ks.size),
                    "k": np.repeat(ks, problems),
                    "dist_to_train": dist_train,
                    "dist_to_test": dist_test,
                    "gap": np.tile(gap, ks.size),
                    "relative_gap": np.tile(relative, ks.size),
                    "norm_test": np.tile(norm_test, ks.size),
                }
            )
        )
    return concat_frames(frames)


def fit_rms_slope(group: pd.DataFrame, column: str = "dist_to_train") -> dict[str, float]:
    """WLS fit of log RMS distance on log K; each point's SE by the delta method over problems."""
    ks, log_rms, sigma = [], [], []
    for k, at_k in group.groupby("k", sort=True):
        squared = at_k[column].to_numpy() ** 2
        mean_square = squared.mean()
        ks.append(k)
        log_rms.append(0.5 * math.log(mean_square))
        sigma.append(0.5 * squared.std(ddof=1) / math.sqrt(squared.size) / mean_square)
    fit = fit_line(np.log(ks), np.array(log_rms), np.array(sigma))
    fit["rms_by_k"] = {int(k): float(math.exp(value)) for k, value in zip(ks, log_rms, strict=True)}
    return fit


def summarise(frame: pd.DataFrame) -> dict:
    """Relative gap by (r, N); MC-inference RMS slopes per cell and pooled; crossover K."""
    check_tidy(frame, KEY_COLUMNS)
    per_problem = frame[frame["k"] == frame["k"].min()]
    gap_table = {}
    for (r, n), group in per_problem.groupby(["drop_ratio", "n_keys"], sort=True):
        gap_table[f"r={r:g},N={n}"] = {
            "median_relative_gap": float(group["relative_gap"].median()),
            "mean_relative_gap": float(group["relative_gap"].mean()),
            "rms_gap": float(np.sqrt((group["gap"] ** 2).mean())),
        }
    by_shape = {}
    for (shape, r, n), group in per_problem.groupby(["shape", "drop_ratio", "n_keys"], sort=True):
        by_shape[f"{shape},r={r:g},N={n}"] = float(group["relative_gap"].median())
    slopes = {}
    deviations = []
    for (shape, n, r), group in frame.groupby(["shape", "n_keys", "drop_ratio"], sort=True):
        fit = fit_rms_slope(group)
        rms_gap = float(np.sqrt((group.loc[group["k"] == group["k"].min(), "gap"] ** 2).mean()))
        closer = [k for k, rms in fit["rms_by_k"].items() if rms < rms_gap]
        test_fit = fit_rms_slope(group, "dist_to_test")
        deviation = (fit["slope"] + 0.5) / fit["slope_se"]
        deviations.append(deviation)
        slopes[f"{shape},N={n},r={r:g}"] = {
            "slope": fit["slope"],
            "slope_se": fit["slope_se"],
            "slope_se_residual": fit["slope_se_residual"],
            "deviation_from_minus_half_in_se": deviation,
            "rms_to_train_by_k": fit["rms_by_k"],
            "rms_to_test_by_k": test_fit["rms_by_k"],
            "rms_gap": rms_gap,
            "smallest_k_closer_to_train_than_plain_inference": min(closer) if closer else None,
        }
    pooled_slopes = np.array([entry["slope"] for entry in slopes.values()])
    pooled_se = np.array([entry["slope_se"] for entry in slopes.values()])
    weights = 1.0 / pooled_se**2
    pooled = float((weights * pooled_slopes).sum() / weights.sum())
    pooled_error = float(math.sqrt(1.0 / weights.sum()))
    deviations = np.array(deviations)
    return {
        "relative_gap": gap_table,
        "median_relative_gap_by_shape": by_shape,
        "slopes": slopes,
        "pooled_slope": pooled,
        "pooled_slope_se": pooled_error,
        "pooled_slope_deviation_in_se": (pooled + 0.5) / pooled_error,
        "max_abs_slope_deviation_in_se": float(np.abs(deviations).max()),
        "mean_squared_slope_deviation": float(np.mean(deviations**2)),
        "n_cells": len(slopes),
    }


def _headline(summary: dict) -> list[str]:
    lines = [
        f"pooled MC-inference slope {summary['pooled_slope']:.4f} +- {summary['pooled_slope_se']:.4f} "
        f"(expected -0.5); max |deviation| {summary['max_abs_slope_deviation_in_se']:.2f} SE "
        f"over {summary['n_cells']} cells"
    ]
    for name, entry in summary["relative_gap"].items():
        lines.append(f"{name}: median relative gap {entry['median_relative_gap']:.4f}")
    return lines


STUDY = Study(
    name="train_test_mismatch",
    title="Train/test mismatch and Monte-Carlo inference",
    config_class=TrainTestMismatchConfig,
    run=run,
    summarise=summarise,
    question=QUESTION,
    method=METHOD,
    page="simulations.pages.train_test_mismatch",
    headline=_headline,
    rank=40,
)
