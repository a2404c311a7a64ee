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
to bound memory); weights are computed in torch float64.

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
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from scipy import stats
from tqdm import tqdm

import theory
from dropkey.masks import (
    block_keep_mask,
    calibrated_seed_rate,
    coverage_counts,
    cross_keep_mask,
    dropkey_keep_mask,
)
from simulations.common import check_tidy, chunk_sizes, concat_frames, frame_from_columns
from simulations.registry import Study
from theory.checks import check_choice, check_drop_ratio, check_int, check_real, check_seed, check_tuple
from theory.conventions import all_dropped_weights, check_all_dropped, entropy
from theory.seeding import child_sequences, generator, integer_seed

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

#: Row shapes of this study (positions matter: rows are not sorted).
SHAPES = ("vit_like", "local")
#: Structured variants (independent DropKey is always run as the reference).
STRUCTURED = ("block", "cross")
VARIANTS = ("dropkey",) + STRUCTURED
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


def _grid_check(value: object, name: str) -> tuple[int, int]:
    if not isinstance(value, tuple) or len(value) != 2:
        raise ValueError(f"{name} must be a pair (H, W) of integers in [1, 64], got {value!r}")
    height = check_int(value[0], f"{name}[0]", 1, 64)
    width = check_int(value[1], f"{name}[1]", 1, 64)
    if height * width < 2:
        raise ValueError(f"{name} must have at least 2 patches, got {value!r}")
    return height, width


def grid_name(grid: tuple[int, int]) -> str:
    return f"{grid[0]}x{grid[1]}"


@dataclass(frozen=True)
class StructuredMasksConfig:
    """Grid and sizes of the structured-mask study.

    grids: patch grids (H, W), each an integer pair in [1, 64] with >= 2 patches.
    num_prefix_tokens: class/register tokens before the patches, in [0, 8].
    shapes: row shapes (``vit_like``, ``local``).  structured: variants compared
    with DropKey (``block``, ``cross``).  drop_ratios: r in (0, 1).
    rows_per_shape (>= 1): rows per (grid, shape).  num_samples (>= 10): masks
    per row.  block_side in [1, 15], cross_arm in [1, 7]: footprints.
    logit_std in (0, 20]: vit_like logits.  local_sigma in (0, 100] (patches),
    local_logit_noise in [0, 20], cls_logit in [-50, 50]: the local rows.
    all_dropped: convention.  min_effective_samples in (0, 1e6]: the
    ``clt_reliable`` threshold.
    """

    grids: tuple[tuple[int, int], ...] = ((8, 8), (14, 14))
    num_prefix_tokens: int = 1
    shapes: tuple[str, ...] = SHAPES
    structured: tuple[str, ...] = STRUCTURED
    drop_ratios: tuple[float, ...] = (0.1, 0.3, 0.5)
    rows_per_shape: int = 8
    num_samples: int = 100000
    block_side: int = 3
    cross_arm: int = 1
    logit_std: float = 2.0
    local_sigma: float = 1.5
    local_logit_noise: float = 0.25
    cls_logit: float = 0.0
    all_dropped: str = "uniform"
    min_effective_samples: float = 25.0
    seed: int = 0

    def __post_init__(self) -> None:
        check_tuple(self.grids, "grids", _grid_check)
        check_int(self.num_prefix_tokens, "num_prefix_tokens", 0, 8)
        check_tuple(self.shapes, "shapes", lambda v, n: check_choice(v, n, SHAPES))
        check_tuple(self.structured, "structured", lambda v, n: check_choice(v, n, STRUCTURED))
        check_tuple(self.drop_ratios, "drop_ratios", lambda v, n: check_drop_ratio(v, n, allow_zero=False))
        check_int(self.rows_per_shape, "rows_per_shape", 1)
        check_int(self.num_samples, "num_samples", 10)
        check_int(self.block_side, "block_side", 1, 15)
        check_int(self.cross_arm, "cross_arm", 1, 7)
        check_real(self.logit_std, "logit_std", 0.0, 20.0, low_open=True)
        check_real(self.local_sigma, "local_sigma", 0.0, 100.0, low_open=True)
        check_real(self.local_logit_noise, "local_logit_noise", 0.0, 20.0)
        check_real(self.cls_logit, "cls_logit", -50.0, 50.0)
        check_all_dropped(self.all_dropped)
        check_real(self.min_effective_samples, "min_effective_samples", 0.0, 1e6, low_open=True)
        check_seed(self.seed)

    @classmethod
    def quick(cls) -> StructuredMasksConfig:
        """A few seconds: the 8x8 grid (65 keys), 4 rows per shape, 20000 masks per row."""
        return cls(grids=((8, 8),), rows_per_shape=4, num_samples=20000)

    @classmethod
    def full(cls) -> StructuredMasksConfig:
        """8x8 and 14x14 grids (65 and 197 keys), 8 rows per shape, 100000 masks per row (about 3 minutes on 2 cores)."""
        return cls()


# --- rows ------------------------------------------------------------------------------------------


def patch_positions(grid: tuple[int, int], num_prefix_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """(y, x) of every key; prefix tokens get -1."""
    height, width = grid
    ys, xs = np.divmod(np.arange(height * width), width)
    prefix = np.full(num_prefix_tokens, -1)
    return np.concatenate([prefix, ys]), np.concatenate([prefix, xs])


def _softmax(logits: np.ndarray) -> np.ndarray:
    weights = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return weights / weights.sum(axis=-1, keepdims=True)


def make_rows(
    shape: str, grid: tuple[int, int], config: StructuredMasksConfig, rng: np.random.Generator
) -> np.ndarray:
    """``rows_per_shape`` attention rows (R, N) of the named shape, keys in timm's order."""
    check_choice(shape, "shape", SHAPES)
    prefix = config.num_prefix_tokens
    n = prefix + grid[0] * grid[1]
    rows = config.rows_per_shape
    if shape == "vit_like":
        return _softmax(rng.normal(0.0, config.logit_std, size=(rows, n)))
    ys, xs = patch_positions(grid, prefix)
    query = rng.integers(0, grid[0] * grid[1], size=rows)
    qy, qx = np.divmod(query, grid[1])
    distance2 = (ys[None, :] - qy[:, None]) ** 2 + (xs[None, :] - qx[:, None]) ** 2
    logits = -distance2 / (2.0 * config.local_sigma**2)
    logits[:, :prefix] = config.cls_logit
    logits = logits + rng.normal(0.0, config.local_logit_noise, size=(rows, n))
    return _softmax(logits)


# --- masks and weight moments -------------------------------------------------------------------------


def keep_masks(
    variant: str,
    shape: tuple[int, ...],
    drop_ratio: float,
    *,
    grid: tuple[int, int],
    config: StructuredMasksConfig,
    generator_: torch.Generator,
) -> torch.Tensor:
    """Bool keep masks of ``shape = (..., N)`` from :mod:`dropkey.masks` (True = kept)."""
    check_choice(variant, "variant", VARIANTS)
    if variant == "dropkey":
        return dropkey_keep_mask(shape, drop_ratio, generator=generator_)
    if variant == "block":
        return block_keep_mask(
            shape, drop_ratio, grid=grid, num_prefix_tokens=config.num_prefix_tokens,
            side=config.block_side, generator=generator_,
        )
    return cross_keep_mask(
        shape, drop_ratio, grid=grid, num_prefix_tokens=config.num_prefix_tokens,
        arm=config.cross_arm, generator=generator_,
    )


def weights_from_keep(kept: torch.Tensor, p: torch.Tensor, all_dropped: str) -> torch.Tensor:
    """w = b p / sum(b p) in float64 for keep masks (..., S, N) and rows p (..., 1, N) or (N,).

    An all-dropped row follows :func:`theory.conventions.all_dropped_weights` with every key
    present ("uniform": 1/N, as the masks of :mod:`dropkey.masks` count every key; the numpy
    samplers of :mod:`simulations.common` read a zero weight as an absent key instead, which
    differs only for rows with exact zeros, and these rows are softmaxes: none).
    """
    check_all_dropped(all_dropped)
    kept_weight = kept.to(torch.float64) * p
    norm = kept_weight.sum(dim=-1, keepdim=True)
    ok = norm > 0
    weights = kept_weight / torch.where(ok, norm, torch.ones_like(norm))
    if bool(ok.all()):
        return weights
    fallback = torch.as_tensor(all_dropped_weights(p.numpy(), all_dropped))
    return torch.where(ok, weights, fallback.expand_as(weights))


@dataclass(frozen=True)
class Moments:
    """Sample moments over S masks, per row (R,) or per (row, key) (R, N)."""

    w_mean: np.ndarray
    w_var: np.ndarray
    ratio_mean: np.ndarray  # mean of w_j / p_j
    ratio_se: np.ndarray
    keep_rate: np.ndarray
    drop_fraction: np.ndarray  # (R,)
    drop_fraction_se: np.ndarray  # (R,)


def sample_moments(
    variant: str,
    p: np.ndarray,
    drop_ratio: float,
    *,
    grid: tuple[int, int],
    config: StructuredMasksConfig,
    seed: np.random.SeedSequence,
) -> Moments:
    """Moments of the weights of rows ``p`` (R, N) over ``config.num_samples`` masks each.

    All rows share one mask call per chunk of samples, shape (R, chunk, N); the
    torch generator is seeded from ``seed`` (:func:`theory.seeding.integer_seed`).
    """
    rows, n = p.shape
    samples = config.num_samples
    gen = torch.Generator().manual_seed(integer_seed(seed))
    p_t = torch.as_tensor(p, dtype=torch.float64).unsqueeze(1)  # (R, 1, N)
    sum_w = torch.zeros(rows, n, dtype=torch.float64)
    sum_w2 = torch.zeros(rows, n, dtype=torch.float64)
    kept_count = torch.zeros(rows, n, dtype=torch.float64)
    sum_f = torch.zeros(rows, dtype=torch.float64)
    sum_f2 = torch.zeros(rows, dtype=torch.float64)
    for size in chunk_sizes(samples, rows * n):
        kept = keep_masks(variant, (rows, size, n), drop_ratio, grid=grid, config=config, generator_=gen)
        weights = weights_from_keep(kept, p_t, config.all_dropped)
        sum_w += weights.sum(dim=1)
        sum_w2 += weights.square().sum(dim=1)
        kept_f = kept.to(torch.float64)
        kept_count += kept_f.sum(dim=1)
        fraction = 1.0 - kept_f.mean(dim=-1)  # (R, size)
        sum_f += fraction.sum(dim=1)
        sum_f2 += fraction.square().sum(dim=1)
    w_mean = (sum_w / samples).numpy()
    w_var = np.maximum((sum_w2.numpy() - samples * w_mean**2) / (samples - 1), 0.0)
    f_mean = (sum_f / samples).numpy()
    f_var = np.maximum((sum_f2.numpy() - samples * f_mean**2) / (samples - 1), 0.0)
    return Moments(
        w_mean=w_mean,
        w_var=w_var,
        ratio_mean=w_mean / p,
        ratio_se=np.sqrt(w_var / samples) / p,
        keep_rate=(kept_count / samples).numpy(),
        drop_fraction=f_mean,
        drop_fraction_se=np.sqrt(f_var / samples),
    )


def keep_probability(
    variant: str, grid: tuple[int, int], drop_ratio: float, config: StructuredMasksConfig
) -> np.ndarray:
    """Exact marginal keep probability of every key (N,) under a variant.

    DropKey and prefix tokens: 1 - r. Structured patches: (1 - gamma)^(coverage count),
    gamma = :func:`dropkey.masks.calibrated_seed_rate` (only the mean over patches is r;
    border patches are kept more often than interior ones).
    """
    check_choice(variant, "variant", VARIANTS)
    n_patches = grid[0] * grid[1]
    prefix = np.full(config.num_prefix_tokens, 1.0 - drop_ratio)
    if variant == "dropkey":
        return np.concatenate([prefix, np.full(n_patches, 1.0 - drop_ratio)])
    size = config.block_side if variant == "block" else config.cross_arm
    gamma = calibrated_seed_rate(drop_ratio, grid, kind=variant, side=config.block_side, arm=config.cross_arm)
    counts = coverage_counts(tuple(grid), variant, size).ravel().astype(np.float64)
    return np.concatenate([prefix, np.exp(counts * np.log1p(-gamma))])


# --- the study ---------------------------------------------------------------------------------------------


def _rows(config: StructuredMasksConfig) -> dict[tuple[tuple[int, int], str], np.ndarray]:
    """Rows of every (grid, shape); drawn from the 'rows' seed child, one grandchild per grid."""
    children = child_sequences(child_sequences(config.seed, 2)[0], len(config.grids))
    rows = {}
    for grid, child in zip(config.grids, children):
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
    for (grid, variant, r), child in tqdm(list(zip(cells, mask_children)), desc="structured_masks", disable=not progress):
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
        "max_abs_z_reliable": float(np.abs(row["z_vs_dropkey"].to_numpy()[reliable]).max()) if reliable.any() else math.nan,
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
        records.append({"grid": grid, "shape": shape, "row": row, "variant": variant, "drop_ratio": r, **_row_metrics(group)})
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
        change = (group["tv_to_dropkey"].to_numpy() - floor["tv_to_dropkey"].to_numpy()) / group["dropkey_smoothing_tv"].to_numpy()
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
    "StructuredMasksConfig",
    "keep_masks",
    "STUDY",
    "make_rows",
    "run",
    "sample_moments",
    "summarise",
    "weights_from_keep",
]
