"""Calibrating the overfitting regime: the recipe in which a regulariser has something to fix.

A regulariser can only help a model that overfits; the paper's setting is small data. Before the
outcome experiments, candidate recipes (training subset, epochs, batch, augmentation) are trained
without a regulariser and judged on three criteria fixed here, before any outcome is seen:

- the plain ViT fits its training images: clean (un-augmented, eval-mode) training accuracy
  at the end >= :data:`MIN_TRAIN_ACCURACY`;
- test accuracy has plateaued: over the evaluations in the last :data:`PLATEAU_FRACTION` of the
  epochs, max - min < :data:`MAX_PLATEAU_CHANGE`;
- a generalisation gap to close: clean training minus test accuracy >= :data:`MIN_GAP`.

Candidates are tried cheapest first (training images times epochs, :data:`CANDIDATES`); the
first that meets all three is the regime and the dearer ones are not trained.
:func:`run_calibration` writes every trained candidate's curve (clean training and test accuracy
at each evaluation) and every candidate's verdict to ``results_dir/<scale>/calibration/``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from dropkey import storage
from dropkey.lab.checkpoints import read_checkpoint
from dropkey.lab.experiments.definitions import Arm, Scale, scale
from dropkey.lab.experiments.runner import clean_accuracy, run_key, train_config
from dropkey.lab.train import CHECKPOINT, TrainConfig, Trainer, train
from dropkey.provenance import provenance

log = logging.getLogger(__name__)

NAME = "calibration"
MIN_TRAIN_ACCURACY = 0.99
PLATEAU_FRACTION = 0.2
MAX_PLATEAU_CHANGE = 0.002
MIN_GAP = 0.10
CURVE_FILE = "calibration_curve.csv"  # in each candidate's run folder, rewritten after each evaluation


@dataclass(frozen=True)
class Candidate:
    """One recipe tried without a regulariser: TrainConfig fields over the scale's plain run."""

    name: str
    overrides: tuple[tuple[str, Any], ...]


#: the candidates per scale, cheapest first (the regime chosen is the scale's recipe in definitions.py)
CANDIDATES: dict[str, tuple[Candidate, ...]] = {
    "small_data": (
        Candidate("n500_e50", (("train_subset", 500), ("epochs", 50), ("batch_size", 64), ("eval_every", 5))),
        Candidate("n500_e100_b32", (("train_subset", 500), ("epochs", 100), ("batch_size", 32), ("eval_every", 5))),
        Candidate("n1000_e100_b32", (("train_subset", 1000), ("epochs", 100), ("batch_size", 32),
                                     ("eval_every", 5))),
        Candidate("n500_e200_b32", (("train_subset", 500), ("epochs", 200), ("batch_size", 32), ("eval_every", 10))),
    ),
}


def candidate_config(s: Scale, candidate: Candidate, *, runs_dir: str | os.PathLike[str],
                     data_dir: str | os.PathLike[str] | None = None, device: str = "auto") -> TrainConfig:
    """The candidate's run: the scale's plain run with the candidate's fields, no diagnostics; its own folder."""
    plain = train_config(s, Arm("none"), s.seeds[0], runs_dir=runs_dir, data_dir=data_dir, device=device)
    config = dataclasses.replace(plain, diagnostics_every=0, **dict(candidate.overrides))
    return dataclasses.replace(config, out_dir=str(Path(runs_dir) / NAME / f"{candidate.name}-{run_key(config)}"))


def train_candidate(config: TrainConfig, command: Sequence[str] | None = None) -> pd.DataFrame:
    """Train (or resume) one candidate; its curve: epoch, clean training accuracy, test accuracy."""
    folder = Path(config.out_dir)
    curve_path = folder / CURVE_FILE
    if storage.is_complete(folder):
        return pd.read_csv(curve_path)
    probe = Trainer(dataclasses.replace(config, progress=False))  # the same data and normalisation as the run
    rows = pd.read_csv(curve_path).to_dict("records") if curve_path.is_file() else []

    def record(epoch: int, row: dict[str, Any]) -> None:
        if np.isnan(row["test_acc"]):
            return
        probe.model.load_state_dict(read_checkpoint(folder / CHECKPOINT)["model"])
        accuracy = clean_accuracy(probe.model, probe.normalize, probe.train_set, config.eval_batch_size, probe.device)
        rows.append({"epoch": epoch, "train_clean_acc": accuracy,
                     "train_augmented_acc": row["train_acc"], "test_acc": row["test_acc"],
                     "wall_time_s": row["wall_time_s"]})
        storage.write_csv_atomic(curve_path, pd.DataFrame(rows))

    train(config, resume=True, callbacks=[record], command=command)
    storage.mark_complete(folder)
    return pd.read_csv(curve_path)


def judge(curve: pd.DataFrame, epochs: int) -> dict[str, Any]:
    """The three criteria on one candidate's curve (see the module doc)."""
    end = curve.sort_values("epoch").iloc[-1]
    late = curve[curve["epoch"] >= (1.0 - PLATEAU_FRACTION) * epochs]
    change = float(late["test_acc"].max() - late["test_acc"].min()) if len(late) >= 2 else float("nan")
    gap = float(end["train_clean_acc"] - end["test_acc"])
    verdict = {
        "train_clean_acc": float(end["train_clean_acc"]), "test_acc": float(end["test_acc"]),
        "late_test_change": change, "late_evaluations": int(len(late)), "gap": gap,
        "fits": bool(end["train_clean_acc"] >= MIN_TRAIN_ACCURACY),
        "plateaued": bool(len(late) >= 2 and change < MAX_PLATEAU_CHANGE),
        "gap_large": bool(gap >= MIN_GAP),
    }
    verdict["meets_all"] = verdict["fits"] and verdict["plateaued"] and verdict["gap_large"]
    return verdict


def run_calibration(
    scale_name: str,
    *,
    runs_dir: str | os.PathLike[str],
    results_dir: str | os.PathLike[str],
    data_dir: str | os.PathLike[str] | None = None,
    device: str = "auto",
    command: Sequence[str] | None = None,
) -> Path:
    """Train every candidate of the scale (cached), judge it, write ``results_dir/<scale>/calibration/``."""
    if scale_name not in CANDIDATES:
        raise ValueError(f"scale must be one of {tuple(CANDIDATES)} (the scales with calibration candidates), "
                         f"got {scale_name!r}")
    s = scale(scale_name)
    started = time.perf_counter()
    curves, verdicts, configs = [], [], {}
    chosen = None
    for candidate in CANDIDATES[scale_name]:
        config = candidate_config(s, candidate, runs_dir=runs_dir, data_dir=data_dir, device=device)
        if chosen is not None:  # cheapest first: a later candidate cannot be chosen, so it is not trained
            verdicts.append({"candidate": candidate.name, "images_x_epochs": config.train_subset * config.epochs,
                             "epochs": config.epochs, "train_subset": config.train_subset,
                             "batch_size": config.batch_size, "meets_all": False,
                             "note": f"not run: the cheaper {chosen} meets every criterion"})
            continue
        curve = train_candidate(config, command)
        curves.append(curve.assign(candidate=candidate.name))
        verdicts.append({"candidate": candidate.name, "images_x_epochs": config.train_subset * config.epochs,
                         "epochs": config.epochs, "train_subset": config.train_subset, "batch_size": config.batch_size,
                         "training_wall_time_s": float(curve["wall_time_s"].max()), **judge(curve, config.epochs),
                         "note": ""})
        configs[candidate.name] = {k: v for k, v in config.to_dict().items() if k not in ("out_dir", "data_dir")}
        if verdicts[-1]["meets_all"]:
            chosen = candidate.name
    table = pd.DataFrame(verdicts)
    table["chosen"] = table["candidate"] == chosen
    summary = {"experiment": NAME, "scale": scale_name, "chosen": chosen,
               "criteria": {"min_train_clean_acc": MIN_TRAIN_ACCURACY, "plateau_fraction": PLATEAU_FRACTION,
                            "max_late_test_change": MAX_PLATEAU_CHANGE, "min_gap": MIN_GAP},
               "rule": "candidates are tried cheapest first (training images x epochs); the first that meets all "
                       "three criteria is chosen and the dearer ones are not trained"}
    record = provenance(s.seeds[0], list(command) if command is not None else None)
    record.update(scale=scale_name, experiment=NAME, wall_time_s=time.perf_counter() - started)
    folder = Path(results_dir) / scale_name / NAME
    storage.write_result_folder(folder, tables={"curves.csv": pd.concat(curves, ignore_index=True),
                                                "candidates.csv": table},
                                documents={"summary.json": summary, "config.json": configs}, provenance=record)
    log.info("calibration at %s scale: chosen %s; results in %s", scale_name, chosen, folder)
    return folder
