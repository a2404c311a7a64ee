"""Configuration, rows, masks and Monte-Carlo weight moments of the structured-mask study.

The study itself (what it measures, its run and summary) is :mod:`simulations.structured_masks`,
which re-exports these names. Rows follow timm's key order (prefix tokens, then the patches
row-major); masks come from :mod:`dropkey.masks`; weights are computed in torch float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from dropkey.masks import (
    block_keep_mask,
    calibrated_seed_rate,
    check_grid,
    coverage_counts,
    cross_keep_mask,
    dropkey_keep_mask,
)
from simulations.common import chunk_sizes
from theory.checks import check_choice, check_drop_ratio, check_int, check_real, check_seed, check_tuple
from theory.conventions import all_dropped_weights, check_all_dropped
from theory.seeding import integer_seed

#: Row shapes of this study (positions matter: rows are not sorted).
SHAPES = ("vit_like", "local")
#: Structured variants (independent DropKey is always run as the reference).
STRUCTURED = ("block", "cross")
VARIANTS = ("dropkey",) + STRUCTURED


def _grid_check(value: object, name: str) -> tuple[int, int]:
    """A grid of the study: a tuple (a config field) that :func:`dropkey.masks.check_grid` accepts, at most
    64 x 64 and at least 2 patches."""
    if not isinstance(value, tuple):
        raise ValueError(f"{name} must be a tuple (H, W) of integers in [1, 64], got {value!r}")
    height, width = check_grid(value, name)
    check_int(height, f"{name}[0]", 1, 64)
    check_int(width, f"{name}[1]", 1, 64)
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
        """8x8 and 14x14 grids (65 and 197 keys), 8 rows per shape, 100000 masks per row
        (about 3 minutes on 2 cores)."""
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
