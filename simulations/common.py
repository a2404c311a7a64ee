"""Helpers shared by the Monte-Carlo studies in :mod:`simulations`.

The shared homes below the studies are used directly: argument checks from
:mod:`theory.checks`, seeding from :mod:`theory.seeding` (one named child stream per
part of a study, one grandchild per grid cell, never offsets added to a seed), the
all-dropped conventions, DropKey's renormalisation of kept weights and the entropy
from :mod:`theory.conventions`.

Attention rows. :func:`attention_row` builds the named row shapes used by the
studies (flat, peaked, power-law, ViT-like), sorted in decreasing order so that
key 0 is the largest weight.

Masks. :func:`sample_dropkey_weights` draws DropKey weights for many masks and
many rows in one array operation (the batched sampler the studies build on).

Frames and outputs. :func:`check_tidy` asserts the tidy-data contract (one row per
observation, identified by its key columns); :func:`write_study_outputs` writes a
study's result folder (``results.csv``, ``summary.json``, ``config.json``,
``provenance.json`` and :mod:`dropkey.storage`'s completion marker) and
:func:`read_study_outputs` reads it back: the command line and the report's study
cache share this one layout. This module is library code: it logs and never prints. The command
line (argument parsing, logging configuration, printing) is :mod:`simulations.cli`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from dropkey import storage
from dropkey.provenance import provenance
from theory.checks import check_choice, check_int
from theory.conventions import renormalise_kept
from theory.rows import softmax_gaussian_rows

log = logging.getLogger(__name__)

#: Names of the attention-row shapes understood by :func:`attention_row`.
ROW_SHAPES = ("flat", "peaked", "power_law", "vit_like")

#: The files of a study's result folder (besides dropkey.storage's provenance and marker).
RESULTS, SUMMARY, CONFIG = "results.csv", "summary.json", "config.json"

#: Upper bound on float64 entries materialised per sampling chunk (~32 MB).
MAX_CHUNK_ENTRIES = 4_000_000


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


def sample_dropkey_weights(
    p: np.ndarray, drop_ratio: float, num_samples: int, rng: np.random.Generator, all_dropped: str
) -> np.ndarray:
    """``num_samples`` DropKey weight draws for rows ``p`` (..., N): shape (S, ..., N).

    A key of weight 0 is read as absent (as in :mod:`theory`): an all-dropped row under
    "uniform" spreads 1/N' over its N' keys of positive weight. Keep indicators are
    ``rng.random(...) >= r``, the same rule as :func:`theory.sampled_expected_attention`,
    so one row and one seed give the same masks there and here.
    """
    p = np.asarray(p, dtype=np.float64)
    kept = rng.random((num_samples,) + p.shape) >= drop_ratio
    return renormalise_kept(p, kept, all_dropped, present=p > 0)


def chunk_sizes(total: int, per_item_entries: int, max_entries: int = MAX_CHUNK_ENTRIES) -> list[int]:
    """Split ``total`` items into chunks of at most ``max_entries`` float entries."""
    size = max(1, max_entries // max(per_item_entries, 1))
    return [min(size, total - start) for start in range(0, total, size)]


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


# --- study outputs ---------------------------------------------------------------------------------


def config_record(config: Any) -> dict[str, Any]:
    """A config dataclass (or a plain mapping) as JSON data, tuples as lists (:func:`dropkey.storage.to_jsonable`)."""
    data = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)
    return storage.to_jsonable(data)


def write_study_outputs(
    out: Path,
    *,
    name: str,
    config: Any,
    frame: pd.DataFrame,
    summary: dict,
    command: Sequence[str],
    size: str | None = None,
) -> Path:
    """Write a study's result folder: ``results.csv``, ``summary.json``, ``config.json``, ``provenance.json``.

    One layout for the command line's outputs and the report's study cache, written by
    :func:`dropkey.storage.write_result_folder` (atomic files, its completion marker last).
    ``config.json`` holds the study's name, its config (a dataclass or mapping; its ``seed``
    goes into the provenance) and, when given, ``size`` ("quick" or "full"); ``command`` is the
    command line that produced the run. Returns the folder.
    """
    record: dict[str, Any] = {"study": name, "config": config_record(config)}
    if size is not None:
        record["size"] = size
    storage.write_result_folder(
        out,
        tables={RESULTS: frame},
        documents={SUMMARY: summary, CONFIG: record},
        provenance=provenance(record["config"].get("seed"), list(command)),
    )
    log.info("%s: %d rows written to %s", name, len(frame), out)
    return Path(out)


@dataclass(frozen=True)
class StudyOutputs:
    """A study's result folder as read back (see :func:`write_study_outputs`)."""

    folder: Path
    frame: pd.DataFrame
    summary: dict[str, Any]
    config: dict[str, Any]
    provenance: dict[str, Any]


def read_study_outputs(folder: Path, *, remedy: str) -> StudyOutputs:
    """Read a complete study result folder (FileNotFoundError naming it and ``remedy``, the command that writes it).

    Every file is checked against the size and SHA-256 the marker records first: a file missing,
    unreadable or changed is a :class:`dropkey.storage.IntegrityError` naming it.
    """
    result = storage.read_result_folder(folder, remedy=remedy, what="study result")
    return StudyOutputs(
        folder=result.folder,
        frame=pd.read_csv(result.path(RESULTS)),
        summary=result.read_json(SUMMARY),
        config=result.read_json(CONFIG),
        provenance=result.provenance,
    )
