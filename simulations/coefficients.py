"""Monte-Carlo estimates of the smoothing coefficients c_j against their exact values.

For every cell of the grid (N keys, drop ratio r, row shape, all-dropped
convention) and every repeat, ``num_samples`` DropKey masks are drawn in one
array operation; the sample mean of w_j / p_j estimates c_j (docs/theory.md
section 2: E[w_j] = c_j p_j), its sample standard error gives a normal
confidence interval, and the interval is compared with the exact c_j from
:func:`theory.smoothing_coefficients`. If the exact theory and the sampler
agree, the intervals cover the exact value at the nominal rate (0.95) and the
z-scores (estimate - exact) / SE are standard normal.

Caveat (measured): for tiny keys at large r (e.g. a ViT-like row, p_j ~ 1e-5,
r = 0.9) most of E[w_j] comes from rare masks in which the key is kept almost
alone (w_j ~ 1). A few thousand samples then usually miss those masks, the
sample SE is far too small and the normal interval under-covers (|z| up to ~30).
Each interval is therefore flagged ``clt_reliable`` by an a-priori rule from
the exact moments (num_samples / CV^2 >= min_effective_samples), and the
z-score is also given with the exact SE from :func:`theory.attention_variance`
(``z_exact_se``), which tests the exact mean and variance together.

Tidy output: one row per interval, i.e. per (n_keys, shape, drop_ratio,
all_dropped, repeat, key). Keys are ranked by decreasing p (key 0 is the
largest weight). Each (cell, convention, repeat) uses its own masks, so
intervals of different groups are independent; the N intervals of one group
share masks and are correlated, so coverage standard errors are grouped by row
(:func:`coverage_by_row`: the SD over rows of each row's covered fraction).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats
from tqdm import tqdm

import theory
from simulations.common import ROW_SHAPES, attention_row, check_tidy, chunk_sizes, concat_frames, frame_from_columns
from simulations.registry import Study
from theory.checks import check_choice, check_drop_ratio, check_int, check_real, check_seed, check_tuple
from theory.conventions import ALL_DROPPED_CONVENTIONS, check_all_dropped, renormalise_kept
from theory.seeding import child_sequences, generator

log = logging.getLogger(__name__)

#: The question this study answers and how (the first paragraphs of its report page).
QUESTION = (
    "Do the exact smoothing coefficients c_j of Eq. 3 (E[w_j] = c_j p_j under DropKey) match what sampled"
    " DropKey masks give, and do they keep the order Eq. 4 claims?"
)
METHOD = (
    "For attention rows of four shapes, lengths N and drop ratios r, thousands of DropKey masks are drawn"
    " and c_j = E[w_j]/p_j is estimated with a 95% interval; the intervals must cover the exact c_j at "
    "the nominal rate (the standard error grouped by row, the independent unit). The exact coefficients "
    "of every row are also scanned for violations of c_s < c_t (Eq. 4), of the order of E[w], and of "
    "majorisation."
)

KEY_COLUMNS = ("n_keys", "shape", "drop_ratio", "all_dropped", "repeat", "key")
COLUMNS = KEY_COLUMNS + (
    "p",
    "c_exact",
    "c_estimate",
    "c_standard_error",
    "ci_low",
    "ci_high",
    "covered",
    "z",
    "z_exact_se",
    "effective_samples",
    "clt_reliable",
)


@dataclass(frozen=True)
class CoefficientsConfig:
    """Grid and sizes of the coefficient study.

    ns: row lengths N (>= 1).  drop_ratios: r in (0, 1).  shapes: row shapes
    (see :func:`simulations.common.attention_row`).  conventions: all-dropped
    conventions.  num_samples: masks per interval (>= 10).  num_repeats:
    independent intervals per (cell, key) (>= 1).  confidence: nominal coverage
    in (0, 1).  min_effective_samples: an interval is flagged ``clt_reliable``
    when num_samples / CV^2 >= this (CV = exact sd/mean of w_j; Cochran's rule
    of thumb n > 25 skew^2 with skew ~ CV for rare-event weights), in (0, 1e6].
    peak_mass: the dominant key's weight in the 'peaked' shape, in (0, 1).
    power_exponent: a in p_j ~ j^-a, in [0, 10].  logit_std: std of
    the Gaussian logits of the 'vit_like' shape, in (0, 20].
    """

    ns: tuple[int, ...] = (4, 16, 65, 197)
    drop_ratios: tuple[float, ...] = (0.05, 0.1, 0.3, 0.5, 0.9)
    shapes: tuple[str, ...] = ROW_SHAPES
    conventions: tuple[str, ...] = ALL_DROPPED_CONVENTIONS
    num_samples: int = 4000
    num_repeats: int = 25
    confidence: float = 0.95
    min_effective_samples: float = 25.0
    peak_mass: float = 0.9
    power_exponent: float = 1.0
    logit_std: float = 2.0
    seed: int = 0

    def __post_init__(self) -> None:
        check_tuple(self.ns, "ns", lambda v, n: check_int(v, n, 1, 4096))
        check_tuple(self.drop_ratios, "drop_ratios", lambda v, n: check_drop_ratio(v, n, allow_zero=False))
        check_tuple(self.shapes, "shapes", lambda v, n: check_choice(v, n, ROW_SHAPES))
        check_tuple(self.conventions, "conventions", lambda v, n: check_choice(v, n, ALL_DROPPED_CONVENTIONS))
        check_int(self.num_samples, "num_samples", 10)
        check_int(self.num_repeats, "num_repeats", 1)
        check_real(self.confidence, "confidence", 0.0, 1.0, low_open=True, high_open=True)
        check_real(self.min_effective_samples, "min_effective_samples", 0.0, 1e6, low_open=True)
        check_real(self.peak_mass, "peak_mass", 0.0, 1.0, low_open=True, high_open=True)
        check_real(self.power_exponent, "power_exponent", 0.0, 10.0)
        check_real(self.logit_std, "logit_std", 0.0, 20.0, low_open=True)
        check_seed(self.seed)

    @classmethod
    def quick(cls) -> CoefficientsConfig:
        """A few seconds: N up to 65, three drop ratios, 10 intervals per key."""
        return cls(ns=(4, 16, 65), drop_ratios=(0.1, 0.5, 0.9), num_samples=1000, num_repeats=10)

    @classmethod
    def full(cls) -> CoefficientsConfig:
        """The full grid of the brief: N in (4, 16, 65, 197), five drop ratios (about a minute)."""
        return cls()


def batched_weight_moments(
    p: np.ndarray,
    drop_ratio: float,
    *,
    num_samples: int,
    num_repeats: int,
    rng: np.random.Generator,
    all_dropped: str,
) -> tuple[np.ndarray, np.ndarray]:
    """Sample means and standard errors of DropKey weights, each (num_repeats, N).

    Repeats are independent batches of ``num_samples`` masks; all masks of a chunk
    of repeats are drawn in one array operation, shape (repeats, samples, N).
    Masks are ``rng.random(...) >= r`` in C order, so repeat 0 uses exactly the
    masks :func:`theory.sampled_expected_attention` draws from the same seed.
    """
    p = np.asarray(p, dtype=np.float64)
    n = p.size
    check_all_dropped(all_dropped)
    means, errors = [], []
    for size in chunk_sizes(num_repeats, num_samples * n):
        kept = rng.random((size, num_samples, n)) >= drop_ratio
        weights = renormalise_kept(p, kept, all_dropped, present=p > 0)  # a zero weight is an absent key
        mean = weights.mean(axis=1)
        variance = weights.var(axis=1, ddof=1)
        means.append(mean)
        errors.append(np.sqrt(variance / num_samples))
    return np.concatenate(means), np.concatenate(errors)


def _rows(config: CoefficientsConfig) -> dict[tuple[str, int], np.ndarray]:
    """The attention row of every (shape, N); vit-like rows come from the 'rows' seed child."""
    row_children = child_sequences(child_sequences(config.seed, 2)[0], len(config.ns))
    rows = {}
    for n, child in zip(config.ns, row_children, strict=True):
        rng = generator(child)
        for shape in config.shapes:
            rows[(shape, n)] = attention_row(
                shape,
                n,
                rng,
                peak_mass=config.peak_mass,
                power_exponent=config.power_exponent,
                logit_std=config.logit_std,
            )
    return rows


def run(config: CoefficientsConfig, *, progress: bool = False) -> pd.DataFrame:
    """One row per confidence interval for c_j (see the module docstring)."""
    rows = _rows(config)
    cells = [
        (n, shape, r, convention)
        for n in config.ns
        for shape in config.shapes
        for r in config.drop_ratios
        for convention in config.conventions
    ]
    mask_children = child_sequences(child_sequences(config.seed, 2)[1], len(cells))
    critical = float(stats.norm.ppf(0.5 + config.confidence / 2.0))
    frames = []
    for (n, shape, r, convention), child in tqdm(
        list(zip(cells, mask_children, strict=True)), desc="coefficients", disable=not progress
    ):
        p = rows[(shape, n)]
        exact = theory.smoothing_coefficients(p, r, all_dropped=convention)
        exact_sd = np.sqrt(theory.attention_variance(p, r, all_dropped=convention))
        coefficient_of_variation = exact_sd / (exact * p)
        effective = config.num_samples / np.maximum(coefficient_of_variation**2, 1e-300)
        mean_w, se_w = batched_weight_moments(
            p,
            r,
            num_samples=config.num_samples,
            num_repeats=config.num_repeats,
            rng=generator(child),
            all_dropped=convention,
        )
        estimate = mean_w / p
        error = se_w / p
        difference = estimate - exact
        z = np.divide(
            difference,
            error,
            out=np.where(difference == 0, 0.0, np.copysign(np.inf, difference)),
            where=error > 0,
        )
        exact_error = exact_sd / math.sqrt(config.num_samples) / p
        z_exact = np.divide(
            difference,
            exact_error,
            out=np.where(difference == 0, 0.0, np.copysign(np.inf, difference)),
            where=exact_error > 0,
        )
        repeats = config.num_repeats
        frames.append(
            frame_from_columns(
                {
                    "n_keys": np.full((repeats, n), n),
                    "shape": np.full((repeats, n), shape, dtype=object),
                    "drop_ratio": np.full((repeats, n), r),
                    "all_dropped": np.full((repeats, n), convention, dtype=object),
                    "repeat": np.repeat(np.arange(repeats), n),
                    "key": np.tile(np.arange(n), repeats),
                    "p": np.tile(p, repeats),
                    "c_exact": np.tile(exact, repeats),
                    "c_estimate": estimate,
                    "c_standard_error": error,
                    "ci_low": estimate - critical * error,
                    "ci_high": estimate + critical * error,
                    "covered": np.abs(z) <= critical,
                    "z": z,
                    "z_exact_se": z_exact,
                    "effective_samples": np.tile(effective, repeats),
                    "clt_reliable": np.tile(effective >= config.min_effective_samples, repeats),
                }
            )
        )
        log.debug("cell N=%d %s r=%g %s done", n, shape, r, convention)
    frame = concat_frames(frames)
    frame.attrs["confidence"] = config.confidence
    return frame


#: The independent unit of coverage: one row (cell, convention, repeat) and its own masks.
ROW_GROUP = ["n_keys", "shape", "drop_ratio", "all_dropped", "repeat"]


def coverage_by_row(frame: pd.DataFrame, *, reliable_only: bool = True) -> np.ndarray:
    """Per row group (:data:`ROW_GROUP`), the fraction of its intervals that cover the exact c_j.

    The N intervals of a row share masks and are correlated; rows are independent. So the
    coverage's standard error is the SD of these per-row fractions over sqrt(rows) -- the one
    SE the summary reports and the claim's decision uses (a t interval over rows). With
    ``reliable_only``, only CLT-reliable intervals count (rows with none are left out).
    """
    chosen = frame[frame["clt_reliable"].to_numpy(dtype=bool)] if reliable_only else frame
    return chosen.groupby(ROW_GROUP, sort=True)["covered"].mean().to_numpy(dtype=np.float64)


def _grouped_se(values: np.ndarray) -> float:
    return float(values.std(ddof=1) / math.sqrt(values.size)) if values.size > 1 else math.nan


def _coverage_by(frame: pd.DataFrame, column: str) -> dict[str, float]:
    grouped = frame.groupby(column, sort=True)["covered"].mean()
    return {str(key): float(value) for key, value in grouped.items()}


def summarise(frame: pd.DataFrame, confidence: float | None = None) -> dict:
    """Coverage (overall and by factor), its standard error grouped by row, and the z-score extremes.

    Standard errors of coverage are grouped by row (:func:`coverage_by_row`): the SD over rows of
    each row's covered fraction, over sqrt(rows).
    """
    check_tidy(frame, KEY_COLUMNS)
    nominal = float(confidence if confidence is not None else frame.attrs.get("confidence", 0.95))
    n_intervals = int(len(frame))
    groups = frame.groupby(ROW_GROUP).ngroups
    coverage = float(frame["covered"].mean())
    z = frame["z"].to_numpy()
    finite = np.isfinite(z)
    abs_z = np.abs(z)
    worst = frame.iloc[int(np.argmax(np.where(finite, abs_z, np.inf)))]
    # Two-sided 5% threshold for the largest of n independent |z| (Sidak/Bonferroni).
    max_threshold = float(stats.norm.isf(0.025 / max(n_intervals, 1)))
    reliable = frame["clt_reliable"].to_numpy(dtype=bool)
    by_row_reliable = coverage_by_row(frame)
    coverage_reliable = float(frame["covered"][reliable].mean()) if reliable.any() else math.nan
    critical = float(stats.norm.ppf(0.5 + nominal / 2.0))
    z_exact = frame["z_exact_se"].to_numpy()
    relative_error = np.abs(frame["c_estimate"] - frame["c_exact"]) / frame["c_exact"]
    return {
        "nominal_coverage": nominal,
        "n_intervals": n_intervals,
        "n_independent_groups": int(groups),
        "coverage": coverage,
        "coverage_se": _grouped_se(coverage_by_row(frame, reliable_only=False)),
        "coverage_by_all_dropped": _coverage_by(frame, "all_dropped"),
        "coverage_by_drop_ratio": _coverage_by(frame, "drop_ratio"),
        "coverage_by_n_keys": _coverage_by(frame, "n_keys"),
        "coverage_by_shape": _coverage_by(frame, "shape"),
        "n_clt_reliable_intervals": int(reliable.sum()),
        "n_clt_reliable_groups": int(by_row_reliable.size),
        "coverage_clt_reliable": coverage_reliable,
        "coverage_clt_unreliable": float(frame["covered"][~reliable].mean()) if (~reliable).any() else None,
        "coverage_clt_reliable_by_row_mean": float(by_row_reliable.mean()) if by_row_reliable.size else None,
        "coverage_clt_reliable_se": _grouped_se(by_row_reliable),
        "coverage_with_exact_se": float(np.mean(np.abs(z_exact) <= critical)),
        "max_abs_z": float(abs_z.max()),
        "max_abs_z_clt_reliable": float(abs_z[reliable].max()) if reliable.any() else None,
        "max_abs_z_threshold_5pct": max_threshold,
        "mean_z_squared": float(np.mean(np.where(finite, z, 0.0) ** 2)),
        "mean_z_squared_clt_reliable": float(np.mean(z[reliable & finite] ** 2)) if reliable.any() else None,
        "mean_z_exact_se_squared": float(np.mean(z_exact[np.isfinite(z_exact)] ** 2)),
        "n_non_finite_z": int((~finite).sum()),
        "worst_interval": {key: worst[key] for key in KEY_COLUMNS + ("p", "c_exact", "c_estimate", "z")},
        "max_relative_error": float(relative_error.max()),
        "median_relative_error": float(relative_error.median()),
    }


def _headline(summary: dict) -> list[str]:
    return [
        f"coverage where the CLT is reliable {summary['coverage_clt_reliable']:.4f} "
        f"({summary['n_clt_reliable_intervals']} intervals); with exact SE "
        f"{summary['coverage_with_exact_se']:.4f}",
        f"coverage {summary['coverage']:.4f} (nominal {summary['nominal_coverage']}, "
        f"{summary['n_intervals']} intervals, SE grouped by row {summary['coverage_se']:.4f})",
        f"max |z| {summary['max_abs_z']:.2f} (5% threshold {summary['max_abs_z_threshold_5pct']:.2f}), "
        f"mean z^2 {summary['mean_z_squared']:.3f}",
    ]


STUDY = Study(
    name="coefficients",
    title="Smoothing coefficients: Monte-Carlo against exact",
    config_class=CoefficientsConfig,
    run=run,
    summarise=summarise,
    question=QUESTION,
    method=METHOD,
    page="simulations.pages.coefficients",
    headline=_headline,
    rank=10,
)


__all__ = [
    "COLUMNS",
    "KEY_COLUMNS",
    "CoefficientsConfig",
    "batched_weight_moments",
    "STUDY",
    "run",
    "summarise",
]
