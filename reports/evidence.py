"""What the claims are judged on: the studies' results, the derivations, and the real-ViT experiments.

:class:`Evidence` holds, per study that ran, its summary and its tidy frame; the derivation
records; and per real-ViT experiment the per-seed table of its largest scale measured. Its
accessors separate the two ways evidence can be absent:

- a study or experiment that did not run: the claims it measures are "not yet measured";
- a study or experiment that ran but lacks what a claim reads (a renamed summary key, a missing
  column or quantity, an older result format): :class:`EvidenceError`, raised -- a refactor must
  not silently empty the report.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from dropkey import storage
from dropkey.lab.experiments.definitions import EXPERIMENT_NAMES, SCALE_NAMES

log = logging.getLogger(__name__)

VIT_SCALES = SCALE_NAMES  # in order of precedence: a claim is judged at the last one measured
VIT_PER_SEED = "per_seed.csv"  # in results/<scale>/<experiment>/: every quantity, seed by seed


class EvidenceError(RuntimeError):
    """A study or experiment ran, but its results lack what a claim needs (never 'not yet measured')."""


@dataclass(frozen=True)
class Sample:
    """The paired differences of one quantity in one cell, ready for :func:`reports.statistics.paired_decision`."""

    quantity: str  # the registered quantity's name
    label: str  # the cell ("" for a claim measured in one cell), e.g. "r=0.1"
    differences: np.ndarray
    covariate: np.ndarray | None = None
    scale: str = ""  # real-ViT experiments: the scale the values come from


@dataclass(frozen=True)
class ExperimentEvidence:
    """One real-ViT experiment at the largest scale measured: its per-seed table (headline rows)."""

    experiment: str
    scale: str
    folder: Path
    per_seed: pd.DataFrame  # quantity, seed, value, covariate (group "" and layer -1 only)
    cells: pd.DataFrame = field(default_factory=pd.DataFrame)  # the same, every group of layer -1 (sweeps, cells)

    @property
    def seeds(self) -> tuple[int, ...]:
        return tuple(sorted(set(int(s) for s in self.per_seed["seed"])))

    def sample(self, quantity: str, *, with_covariate: bool = False) -> Sample:
        """The per-seed values of ``quantity`` (EvidenceError naming the folder if it has none)."""
        rows = self.per_seed[self.per_seed["quantity"] == quantity].sort_values("seed")
        if not len(rows):
            raise EvidenceError(
                f"{self.folder} has no per-seed values of {quantity!r}: re-run or re-analyse the experiment "
                f"(`dropkey-lab experiment {self.experiment} --scale {self.scale} --reanalyse`)"
            )
        covariate = rows["covariate"].to_numpy(np.float64) if with_covariate else None
        if covariate is not None and np.isnan(covariate).all():
            raise EvidenceError(f"{self.folder}: {quantity!r} has no covariate values")
        return Sample(quantity, "", rows["value"].to_numpy(np.float64), covariate, self.scale)

    @property
    def recorded(self) -> set[str]:
        """The quantities this result records (headline or per cell)."""
        return set(self.per_seed["quantity"]) | (set(self.cells["quantity"]) if len(self.cells) else set())

    def cell_samples(self, quantity: str) -> list[Sample]:
        """One sample of ``quantity`` per group label (a claim decided in several cells), in table order."""
        rows = self.cells[self.cells["quantity"] == quantity] if len(self.cells) else self.cells
        if not len(rows):
            raise EvidenceError(
                f"{self.folder} has no per-cell values of {quantity!r}: re-run the experiment "
                f"(`dropkey-lab experiment {self.experiment} --scale {self.scale}`)"
            )
        return [Sample(quantity, str(group), cell.sort_values("seed")["value"].to_numpy(np.float64), None, self.scale)
                for group, cell in rows.groupby("group", sort=False)]


@dataclass(frozen=True)
class Evidence:
    """Everything a claim may be measured from (see the module doc)."""

    summaries: Mapping[str, dict] = field(default_factory=dict)  # study -> summary.json
    frames: Mapping[str, pd.DataFrame] = field(default_factory=dict)  # study -> results.csv
    derivations: Mapping[str, dict] = field(default_factory=dict)  # key -> derivation record
    experiments: Mapping[str, ExperimentEvidence] = field(default_factory=dict)  # experiment -> its largest scale

    def ran(self, study: str) -> bool:
        return study in self.summaries

    def summary(self, study: str, *keys: str) -> Any:
        """summary[keys[0]][keys[1]]... of a study that ran (EvidenceError naming the path if absent)."""
        value: Any = self.summaries[study]
        for depth, key in enumerate(keys):
            if not isinstance(value, Mapping) or key not in value:
                path = ".".join(keys[: depth + 1])
                raise EvidenceError(f"study {study!r} ran but its summary has no {path!r}")
            value = value[key]
        return value

    def frame(self, study: str, *columns: str) -> pd.DataFrame:
        """The results frame of a study that ran, checked to have ``columns``."""
        frame = self.frames[study]
        missing = [column for column in columns if column not in frame.columns]
        if missing:
            raise EvidenceError(f"study {study!r} ran but its results have no columns {missing}")
        return frame


def experiment_complete(folder: Path) -> bool:
    """Whether ``folder`` holds a complete experiment result (:mod:`dropkey.storage`'s marker).

    A folder with a ``provenance.json`` but no marker was written by an earlier version (or its
    writing was interrupted): EvidenceError naming the remedy, never a silent "not run".
    """
    if storage.is_complete(folder):
        return True
    if (Path(folder) / storage.PROVENANCE).is_file():
        experiment, scale = Path(folder).name, Path(folder).parent.name
        raise EvidenceError(
            f"{folder} has a provenance.json but no completion marker (written by an earlier version, or "
            f"interrupted): re-analyse it with `dropkey-lab experiment {experiment} --scale {scale} --reanalyse`, "
            "or run the experiment again")
    return False


def experiment_evidence(folder: Path, experiment: str, scale: str) -> ExperimentEvidence:
    result = storage.read_result_folder(folder, what=f"{experiment} result at {scale} scale",
                                        remedy=f"dropkey-lab experiment {experiment} --scale {scale}")
    if not result.has(VIT_PER_SEED):
        raise EvidenceError(
            f"{folder} is a complete experiment result without {VIT_PER_SEED} (an older format): re-analyse it "
            f"with `dropkey-lab experiment {experiment} --scale {scale} --reanalyse`"
        )
    path = result.path(VIT_PER_SEED)
    frame = pd.read_csv(path, dtype={"group": str}, keep_default_na=False, na_values={"value": [""], "covariate": [""]})
    needed = {"quantity", "group", "layer", "seed", "value", "covariate"}
    if not needed <= set(frame.columns):
        raise EvidenceError(f"{path} lacks the columns {sorted(needed - set(frame.columns))}")
    for column in ("value", "covariate"):
        frame[column] = pd.to_numeric(frame[column], errors="coerce")
    headline = frame[(frame["group"] == "") & (frame["layer"] == -1)]
    cells = frame[frame["layer"] == -1]
    return ExperimentEvidence(experiment, scale, folder, headline.reset_index(drop=True), cells.reset_index(drop=True))


def load_experiment_evidence(results_dir: Path) -> dict[str, ExperimentEvidence]:
    """Per experiment found in ``results_dir/<scale>/<experiment>/``, the largest complete scale; {} if none."""
    found: dict[str, ExperimentEvidence] = {}
    root = Path(results_dir)
    for scale in reversed(VIT_SCALES):
        for folder in sorted(path for path in root.glob(f"{scale}/*")
                             if path.name in EXPERIMENT_NAMES and experiment_complete(path)):  # not calibration
            experiment = folder.name
            if experiment in found:
                continue  # measured at a larger scale already
            found[experiment] = experiment_evidence(folder, experiment, scale)
            log.info("read real-ViT results of %s at %s scale from %s", experiment, scale, folder)
    return found
