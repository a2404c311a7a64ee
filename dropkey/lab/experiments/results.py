"""Run an experiment end to end and write / read its result folder (see :mod:`dropkey.lab.experiments`)."""

from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from dropkey import storage
from dropkey.lab.experiments import analysis
from dropkey.lab.experiments.definitions import arm_record, experiment, scale
from dropkey.lab.experiments.finetune import FineTune
from dropkey.lab.experiments.runner import RunSpec, execute_all, train_config
from dropkey.provenance import provenance

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_RESULTS_DIR", "DEFAULT_RUNS_DIR", "ExperimentResult", "load_result", "reanalyse",
           "result_folder", "run_experiment", "run_specs"]

DEFAULT_RUNS_DIR = Path("runs") / "experiments"
DEFAULT_RESULTS_DIR = Path("results")
#: folders written before :mod:`dropkey.storage`'s marker existed wrote provenance.json last
LEGACY_MARKER = storage.PROVENANCE
OLD_MEASUREMENTS = "measurements.csv"  # the claims' table of earlier versions (mean and SE only)


@dataclass(frozen=True)
class ExperimentResult:
    """A finished experiment as read back from its result folder."""

    name: str
    scale: str
    folder: Path
    runs: pd.DataFrame
    attention: pd.DataFrame
    finals: pd.DataFrame
    monte_carlo: pd.DataFrame
    comparisons: pd.DataFrame
    per_seed: pd.DataFrame
    summary: dict[str, Any]
    config: dict[str, Any]
    provenance: dict[str, Any]


def result_folder(results_dir: str | os.PathLike[str], scale_name: str, name: str) -> Path:
    return Path(results_dir) / scale_name / name


def run_specs(
    name: str, scale_name: str, *, runs_dir: str | os.PathLike[str] = DEFAULT_RUNS_DIR,
    data_dir: str | os.PathLike[str] | None = None, device: str = "auto", seeds: Sequence[int] | None = None,
) -> list[RunSpec]:
    """Every run of the experiment at that scale (arm-major, then seed)."""
    spec, s = experiment(name), scale(scale_name)
    chosen = tuple(s.seeds_for(name) if seeds is None else seeds)
    if not chosen:
        raise ValueError("seeds must name at least one seed")
    specs = []
    for arm in spec.arms(s):
        monte_carlo = s.mc_samples if arm.name in spec.monte_carlo_arms else ()
        finetune = FineTune(s.finetune_epochs, s.finetune_lr) if arm.name in spec.finetune_arms else None
        for seed in chosen:
            config = train_config(s, arm, seed, runs_dir=runs_dir, data_dir=data_dir, device=device)
            specs.append(RunSpec(arm, seed, config, monte_carlo, finetune))
    return specs


def run_experiment(
    name: str,
    scale_name: str,
    *,
    runs_dir: str | os.PathLike[str] = DEFAULT_RUNS_DIR,
    results_dir: str | os.PathLike[str] = DEFAULT_RESULTS_DIR,
    data_dir: str | os.PathLike[str] | None = None,
    device: str = "auto",
    seeds: Sequence[int] | None = None,
    jobs: int = 1,
    progress: bool = False,
    command: Sequence[str] | None = None,
) -> ExperimentResult:
    """Train what is missing, analyse every run, write the result folder; return it as read back.

    An experiment with its own ``run`` (e.g. ``gradient_mechanism``) is handed the scale and the
    folders instead; it chooses its own runs (``seeds`` must then be None; ``jobs`` is not used).
    """
    spec, s = experiment(name), scale(scale_name)
    if spec.run is not None:
        if seeds is not None:
            raise ValueError(f"seeds must be None for experiment {name!r} (it probes the scale's first seed)")
        spec.run(scale_name, runs_dir=runs_dir, results_dir=results_dir, data_dir=data_dir, device=device,
                 progress=progress, command=command)
        return load_result(results_dir, scale_name, name)
    specs = run_specs(name, scale_name, runs_dir=runs_dir, data_dir=data_dir, device=device, seeds=seeds)
    started = time.perf_counter()
    execute_all(specs, jobs=jobs, progress=progress, command=command)
    elapsed = time.perf_counter() - started

    metrics, attention, monte_carlo = analysis.run_tables(specs)
    finals = analysis.final_quantities(specs, metrics, attention)
    summary = {
        "experiment": name, "scale": scale_name, "question": spec.question, "claims": list(spec.claims),
        "runs": len(specs), "seeds": sorted({x.seed for x in specs}),
        "median_images_per_s": analysis.throughput(finals),
        "training_wall_time_s_sum": float(metrics.groupby("run_key")["wall_time_s"].max().sum()),
    }
    config = {
        "experiment": name, "scale": vars(s) | {"seeds": list(s.seeds)},
        "arms": [arm_record(arm) for arm in dict.fromkeys(x.arm for x in specs)],
        "runs": [{"arm": x.arm.name, "group": x.arm.group, "seed": x.seed, "run_key": x.folder.name,
                  "monte_carlo": list(x.monte_carlo),
                  "finetune": None if x.finetune is None else vars(x.finetune),
                  "train_config": x.config.to_dict()} for x in specs],
    }
    for run in config["runs"]:  # where a run's files lived on this machine is not part of the result
        run["train_config"].pop("out_dir"), run["train_config"].pop("data_dir")
    record = provenance(None, list(command) if command is not None else None)
    record.update(seeds=summary["seeds"], scale=scale_name, experiment=name, wall_time_s=elapsed,
                  jobs=jobs, device=device)
    folder = result_folder(results_dir, scale_name, name)
    _write_result(folder, name, {"runs.csv": metrics, "attention.csv": attention, "finals.csv": finals,
                                 "monte_carlo.csv": monte_carlo}, summary, config, record)
    log.info("%s at %s scale: %d runs, results in %s", name, scale_name, len(specs), folder)
    return load_result(results_dir, scale_name, name)


def _write_result(folder: Path, name: str, tables: dict[str, pd.DataFrame], summary: dict[str, Any],
                  config: dict[str, Any], record: dict[str, Any]) -> None:
    """Analyse the run tables and write the result folder (:func:`dropkey.storage.write_result_folder`)."""
    try:
        per_seed = analysis.per_seed(name, tables["finals.csv"], tables["attention.csv"], tables["monte_carlo.csv"])
    except KeyError as error:
        raise analysis.IncompleteRun(
            f"{folder}: the run tables lack {error}: they were recorded by an older version; train the experiment "
            "again (the runs' cache keys changed with what they record)") from None
    files = {**tables, "per_seed.csv": per_seed, "comparisons.csv": analysis.comparisons(per_seed)}
    if not len(files["monte_carlo.csv"]):
        files.pop("monte_carlo.csv")
    for stale in (OLD_MEASUREMENTS, "monte_carlo.csv"):  # left by earlier writes (no marker listing them)
        if stale not in files:
            (folder / stale).unlink(missing_ok=True)
    storage.write_result_folder(folder, tables=files, documents={"summary.json": summary, "config.json": config},
                                provenance=record)


def reanalyse(results_dir: str | os.PathLike[str], scale_name: str, name: str,
              command: Sequence[str] | None = None) -> ExperimentResult:
    """Recompute the per-seed and comparison tables of a complete result folder from its run tables.

    Trains nothing: ``finals.csv``, ``attention.csv`` and ``monte_carlo.csv`` are read back and
    analysed with this version of :mod:`dropkey.lab.experiments.analysis` (for folders written by an
    earlier version). The provenance keeps the training's record and adds this analysis's commit.
    """
    if experiment(name).run is not None:
        raise ValueError(f"experiment {name!r} analyses its own cached probes: run it again "
                         f"(`dropkey-lab experiment {name} --scale {scale_name}`), nothing is retrained")
    result = load_result(results_dir, scale_name, name, legacy=True)
    tables = {"runs.csv": result.runs, "attention.csv": result.attention, "finals.csv": result.finals,
              "monte_carlo.csv": result.monte_carlo}
    record = dict(result.provenance)
    record["reanalysed"] = provenance(None, list(command) if command is not None else None)
    summary = {key: value for key, value in result.summary.items() if key != "measurements"}
    _write_result(result.folder, name, tables, summary, result.config, record)
    log.info("%s at %s scale: re-analysed in %s", name, scale_name, result.folder)
    return load_result(results_dir, scale_name, name)


def _read_csv(folder: storage.ResultFolder, name: str) -> pd.DataFrame:
    """A result table; the empty ``group`` label (no sweep) reads back as "" rather than NaN."""
    path = folder.path(name)
    missing = {column: ["", "nan", "NaN"] for column in pd.read_csv(path, nrows=0).columns if column != "group"}
    return pd.read_csv(path, dtype={"group": str}, keep_default_na=False, na_values=missing)


def load_result(results_dir: str | os.PathLike[str], scale_name: str, name: str, *,
                legacy: bool = False) -> ExperimentResult:
    """Read a complete result folder (FileNotFoundError naming it if incomplete or absent).

    ``legacy``: also accept a folder of an earlier version, complete when its provenance.json was
    written last (only :func:`reanalyse` asks for it, to bring such a folder up to date).
    """
    folder = storage.read_result_folder(
        result_folder(results_dir, scale_name, name), what=f"{name} result at {scale_name} scale",
        remedy=f"dropkey-lab experiment {name} --scale {scale_name}", legacy_marker=LEGACY_MARKER if legacy else None,
    )
    table = functools.partial(_read_csv, folder)
    return ExperimentResult(
        name=name, scale=scale_name, folder=folder.folder,
        runs=table("runs.csv"), attention=table("attention.csv"), finals=table("finals.csv"),
        monte_carlo=table("monte_carlo.csv") if folder.has("monte_carlo.csv") else pd.DataFrame(),
        comparisons=table("comparisons.csv"),
        # per_seed.csv is absent in folders of earlier versions: see reanalyse()
        per_seed=(table("per_seed.csv") if folder.has("per_seed.csv")
                  else pd.DataFrame(columns=analysis.PER_SEED_COLUMNS)),
        summary=folder.read_json("summary.json"), config=folder.read_json("config.json"), provenance=folder.provenance,
    )
