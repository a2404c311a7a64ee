"""Helpers shared by the Monte-Carlo studies in :mod:`simulations`.

Seeding. Every run takes one integer seed. Independent random streams are
derived from it with :meth:`numpy.random.SeedSequence.spawn` (never by adding
offsets to the seed), so streams never overlap and a study's result depends
only on its config (seed included). Studies use :func:`child_sequences`, which
addresses the children by position: a study spawns one child per part (rows,
masks, ...) and one grandchild per grid cell, in the config's grid order.

Attention rows. :func:`attention_row` builds the named row shapes used by the
studies (flat, peaked, power-law, ViT-like), sorted in decreasing order so that
key 0 is the largest weight.

Masks. :func:`sample_dropkey_weights` draws DropKey weights for many masks and
many rows in one array operation (the batched sampler the studies build on).

Frames and outputs. :func:`check_tidy` asserts the tidy-data contract (one row per
observation, identified by its key columns); :func:`write_study_outputs` writes a
study's ``results.csv``, ``summary.json`` and ``config.json`` (with provenance)
atomically. This module is library code: it logs and never prints. The command
line (argument parsing, logging configuration, printing) is :mod:`simulations.cli`.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import math
import numbers
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from dropkey.provenance import provenance
from dropkey.storage import write_json_atomic, write_text_atomic
from theory.rows import softmax_gaussian_rows
from theory.validation import ALL_DROPPED_CONVENTIONS

log = logging.getLogger(__name__)

#: Names of the attention-row shapes understood by :func:`attention_row`.
ROW_SHAPES = ("flat", "peaked", "power_law", "vit_like")

#: Conventions for rows whose keys are all dropped (THEORY-NOTES section 1): the
#: theory's tuple itself, under the name the studies use.
ALL_DROPPED = ALL_DROPPED_CONVENTIONS

#: Upper bound on float64 entries materialised per sampling chunk (~32 MB).
MAX_CHUNK_ENTRIES = 4_000_000


# --- config validation ----------------------------------------------------------------


def check_seed(value: object, name: str = "seed") -> int:
    """A seed is a non-negative Python/numpy integer (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
    return int(value)


def check_int(value: object, name: str, low: int, high: int | None = None) -> int:
    """An integer in [low, high] (high=None: unbounded above)."""
    allowed = f"[{low}, {'inf' if high is None else high}]"
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer in {allowed}, got {value!r}")
    if value < low or (high is not None and value > high):
        raise ValueError(f"{name} must be an integer in {allowed}, got {value!r}")
    return int(value)


def check_float(
    value: object,
    name: str,
    low: float,
    high: float,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """A finite real number in the interval from low to high (open ends as asked)."""
    allowed = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a real number in {allowed}, got {value!r}")
    number = float(value)
    ok = math.isfinite(number)
    ok = ok and (number > low if low_open else number >= low)
    ok = ok and (number < high if high_open else number <= high)
    if not ok:
        raise ValueError(f"{name} must be a real number in {allowed}, got {value!r}")
    return number


def check_tuple(
    values: object, name: str, check: Callable[[object, str], Any], *, unique: bool = True
) -> tuple:
    """A non-empty tuple whose items each pass ``check(item, f"{name}[i]")``."""
    if not isinstance(values, tuple) or len(values) == 0:
        raise ValueError(f"{name} must be a non-empty tuple, got {values!r}")
    checked = tuple(check(item, f"{name}[{i}]") for i, item in enumerate(values))
    if unique and len(set(checked)) != len(checked):
        raise ValueError(f"{name} must not repeat values, got {values!r}")
    return checked


def check_choice(value: object, name: str, allowed: Sequence[str]) -> str:
    """One of the allowed option names."""
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{name} must be one of {tuple(allowed)}, got {value!r}")
    return value


def positive_drop_ratio_check(value: object, name: str) -> float:
    """A drop ratio in (0, 1)."""
    return check_float(value, name, 0.0, 1.0, low_open=True, high_open=True)


# --- seeding ------------------------------------------------------------------------------


def child_sequences(seed: int | np.random.SeedSequence, count: int) -> list[np.random.SeedSequence]:
    """``count`` independent children of ``seed`` via :meth:`numpy.random.SeedSequence.spawn`.

    An integer seed starts a fresh root each call, so the children depend only on
    ``(seed, index)``: child ``i`` is the same whatever ``count`` is (>= i + 1).
    A SeedSequence argument is spawned from as is (its spawn counter advances).
    """
    root = seed if isinstance(seed, np.random.SeedSequence) else np.random.SeedSequence(seed)
    return root.spawn(count)


def generator(sequence: np.random.SeedSequence) -> np.random.Generator:
    """A numpy Generator on a SeedSequence child."""
    return np.random.default_rng(sequence)


def torch_seed(sequence: np.random.SeedSequence) -> int:
    """A 63-bit integer seed for ``torch.Generator.manual_seed`` from a SeedSequence."""
    return int(sequence.generate_state(1, dtype=np.uint64)[0] & np.uint64(2**63 - 1))


# --- attention rows and masks --------------------------------------------------------------


def attention_row(
    shape: str,
    n_keys: int,
    rng: np.random.Generator | None = None,
    *,
    peak_mass: float = 0.9,
    power_exponent: float = 1.0,
    logit_std: float = 2.0,
) -> np.ndarray:
    """One attention row of the named shape, sorted in decreasing order.

    flat: 1/N.  peaked: one key holds ``peak_mass``, the rest share the remainder.
    power_law: p_j proportional to j^-a (j = 1..N, a = ``power_exponent``).
    vit_like: softmax of N(0, logit_std^2) logits (needs ``rng``; drawn by
    :func:`theory.rows.softmax_gaussian_rows`, the suite's one definition).
    """
    check_choice(shape, "shape", ROW_SHAPES)
    n = check_int(n_keys, "n_keys", 1)
    if shape == "flat":
        row = np.full(n, 1.0 / n)
    elif shape == "peaked":
        row = np.full(n, (1.0 - peak_mass) / max(n - 1, 1))
        row[0] = peak_mass if n > 1 else 1.0
    elif shape == "power_law":
        row = np.arange(1, n + 1, dtype=np.float64) ** (-power_exponent)
    else:
        if rng is None:
            raise ValueError("rng is required for shape 'vit_like'")
        row = softmax_gaussian_rows(rng, 1, n, logit_std)[0]
    row = np.sort(row)[::-1] / row.sum()
    return np.ascontiguousarray(row)


def vit_like_rows(rng: np.random.Generator, rows: int, n_keys: int, logit_std: float) -> np.ndarray:
    """``rows`` ViT-like rows (R, N) (:func:`theory.rows.softmax_gaussian_rows`), each sorted decreasingly."""
    return -np.sort(-softmax_gaussian_rows(rng, rows, n_keys, logit_std), axis=1)


def all_dropped_weights(p: np.ndarray, all_dropped: str) -> np.ndarray:
    """Weights of an all-dropped row under a convention, broadcastable like ``p``."""
    check_choice(all_dropped, "all_dropped", ALL_DROPPED)
    if all_dropped == "zero":
        return np.zeros_like(p)
    if all_dropped == "uniform":
        present = p > 0
        return present / present.sum(axis=-1, keepdims=True)
    return p


def dropkey_weights_from_keep(kept: np.ndarray, p: np.ndarray, all_dropped: str) -> np.ndarray:
    """DropKey weights w = b p / sum(b p) for keep masks ``kept`` (..., N) and rows ``p``.

    ``p`` broadcasts against ``kept``; rows whose kept mass is 0 follow ``all_dropped``.
    """
    kept_weight = kept * p
    norm = kept_weight.sum(axis=-1, keepdims=True)
    safe = np.where(norm > 0, norm, 1.0)
    fallback = np.broadcast_to(all_dropped_weights(p, all_dropped), kept_weight.shape)
    return np.where(norm > 0, kept_weight / safe, fallback)


def sample_dropkey_weights(
    p: np.ndarray, drop_ratio: float, num_samples: int, rng: np.random.Generator, all_dropped: str
) -> np.ndarray:
    """``num_samples`` DropKey weight draws for rows ``p`` (..., N): shape (S, ..., N).

    Keep indicators are ``rng.random(...) >= r``, the same rule as
    :func:`theory.sampled_expected_attention`, so one row and one seed give the
    same masks there and here.
    """
    p = np.asarray(p, dtype=np.float64)
    kept = rng.random((num_samples,) + p.shape) >= drop_ratio
    return dropkey_weights_from_keep(kept, p, all_dropped)


def chunk_sizes(total: int, per_item_entries: int, max_entries: int = MAX_CHUNK_ENTRIES) -> list[int]:
    """Split ``total`` items into chunks of at most ``max_entries`` float entries."""
    size = max(1, max_entries // max(per_item_entries, 1))
    return [min(size, total - start) for start in range(0, total, size)]


def entropy(p: np.ndarray, axis: int = -1) -> np.ndarray:
    """Shannon entropy (nats) along ``axis``, with 0 log 0 = 0."""
    p = np.asarray(p, dtype=np.float64)
    logs = np.log(np.where(p > 0, p, 1.0))
    return -(p * logs).sum(axis=axis)


# --- statistics ------------------------------------------------------------------------------


def binomial_standard_error(probability: float, count: int) -> float:
    """Standard error of a proportion estimated from ``count`` independent trials."""
    return math.sqrt(probability * (1.0 - probability) / max(count, 1))


def fit_line(x: np.ndarray, y: np.ndarray, sigma: np.ndarray | None = None) -> dict[str, float]:
    """Least-squares line y = a + b x with the slope's standard error.

    With ``sigma`` (known standard errors of y) the fit is weighted and the slope
    SE follows from sigma (``slope_se``); the residual-based SE is also returned
    (``slope_se_residual``, needs >= 3 points).
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    weights = np.ones_like(x) if sigma is None else 1.0 / np.asarray(sigma, dtype=np.float64) ** 2
    w_sum = weights.sum()
    x_bar = (weights * x).sum() / w_sum
    y_bar = (weights * y).sum() / w_sum
    sxx = (weights * (x - x_bar) ** 2).sum()
    slope = (weights * (x - x_bar) * (y - y_bar)).sum() / sxx
    intercept = y_bar - slope * x_bar
    residuals = y - intercept - slope * x
    dof = x.size - 2
    if dof > 0:
        scale = (weights * residuals**2).sum() / dof
        slope_se_residual = math.sqrt(scale / sxx)
    else:
        slope_se_residual = math.nan
    slope_se = math.sqrt(1.0 / sxx) if sigma is not None else slope_se_residual
    return {
        "slope": float(slope),
        "intercept": float(intercept),
        "slope_se": float(slope_se),
        "slope_se_residual": float(slope_se_residual),
    }


# --- frames -------------------------------------------------------------------------------------


def frame_from_columns(columns: dict[str, Iterable]) -> pd.DataFrame:
    """A DataFrame from equal-length 1-D columns (arrays are flattened)."""
    data = {name: np.asarray(values).reshape(-1) for name, values in columns.items()}
    lengths = {name: len(values) for name, values in data.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"columns must have equal lengths, got {lengths}")
    return pd.DataFrame(data)


def concat_frames(frames: Sequence[pd.DataFrame]) -> pd.DataFrame:
    """Concatenate non-empty frames with a fresh RangeIndex."""
    frames = [frame for frame in frames if len(frame)]
    if not frames:
        raise ValueError("no rows to concatenate")
    return pd.concat(frames, ignore_index=True)


def check_tidy(frame: pd.DataFrame, keys: Sequence[str]) -> None:
    """Raise ValueError unless ``keys`` are columns that identify each row uniquely."""
    missing = [key for key in keys if key not in frame.columns]
    if missing:
        raise ValueError(f"frame lacks key columns {missing}")
    if frame.duplicated(subset=list(keys)).any():
        raise ValueError(f"frame has duplicate rows for keys {list(keys)}")


def to_jsonable(value: Any) -> Any:
    """Convert numpy scalars/arrays, tuples and non-finite floats for JSON output."""
    if isinstance(value, dict):
        return {str(key): to_jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(item) for item in value]
    if isinstance(value, np.ndarray):
        return [to_jsonable(item) for item in value.tolist()]
    if isinstance(value, (np.bool_, bool)):
        return bool(value)
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        number = float(value)
        return number if math.isfinite(number) else None
    return value


# --- study outputs ---------------------------------------------------------------------------------


def write_study_outputs(
    out: Path,
    *,
    name: str,
    size: str,
    config: Any,
    frame: pd.DataFrame,
    summary: dict,
    command: Sequence[str],
) -> None:
    """Write a study's ``results.csv``, ``summary.json`` and ``config.json`` (with provenance) atomically.

    ``config`` is the study's config dataclass (its ``seed`` goes into the provenance);
    ``size`` is "quick" or "full"; ``command`` is the command line that produced the run.
    """
    buffer = io.StringIO()
    frame.to_csv(buffer, index=False, float_format="%.12g")
    write_text_atomic(out / "results.csv", buffer.getvalue())
    write_json_atomic(out / "summary.json", to_jsonable(summary))
    write_json_atomic(
        out / "config.json",
        {
            "study": name,
            "size": size,
            "config": to_jsonable(dataclasses.asdict(config)),
            "provenance": provenance(config.seed, list(command)),
        },
    )
    log.info("%s: %d rows written to %s", name, len(frame), out)
