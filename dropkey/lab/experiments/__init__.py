"""The real-ViT experiments: train every arm with every seed, compare, write results with provenance.

>>> from dropkey.lab.experiments import run_experiment              # doctest: +SKIP
>>> result = run_experiment("accuracy", "quick")
>>> result.comparisons[["quantity", "value", "standard_error", "n"]]

``run_experiment(name, scale)`` trains (or reuses, see :mod:`dropkey.lab.experiments.runner`) the
runs of experiment ``name`` (:data:`EXPERIMENT_NAMES`) at ``scale`` (:data:`SCALE_NAMES`),
then writes ``results_dir/<scale>/<name>/``:

- ``runs.csv``: per run and epoch, the trainer's metrics (loss, accuracy, images/s, ...);
- ``attention.csv``: per run, epoch and block, the attention diagnostics (mean over heads;
  ``other_layer >= 0`` rows are the cross-layer similarity of ``layer`` and ``other_layer``);
- ``finals.csv``: one row per run, the per-run quantities of :mod:`.analysis`;
- ``monte_carlo.csv``: (alignment only) test accuracy of k-pass Monte-Carlo inference;
- ``per_seed.csv``: every paired difference the claims read, seed by seed (quantity, group,
  layer, seed, value, covariate, description);
- ``comparisons.csv``: every paired comparison (value, standard error over seeds, n);
- ``summary.json``, ``config.json`` (the scale, every arm and run config),
  ``provenance.json`` (commit, versions, machine, seeds, command, wall time) and, written last,
  ``complete.json`` (:mod:`dropkey.storage`'s completion marker: every file's size and SHA-256).

Tables use the one CSV float format of :mod:`dropkey.storage`; every file is written
atomically. Measured medium- and full-scale results are committed under ``results/``;
quick-scale results (CI, the README's main command) are not.
"""

from __future__ import annotations

import importlib
from typing import Any

from dropkey.lab.experiments.definitions import (
    EXPERIMENT_NAMES,
    EXPERIMENTS,
    SCALE_NAMES,
    SCALES,
    Arm,
    Experiment,
    Scale,
    experiment,
    scale,
)

# torch-dependent names, loaded on first use (PEP 562) so that the CLI's parser stays light
_LAZY = {name: "results" for name in (
    "DEFAULT_RESULTS_DIR", "DEFAULT_RUNS_DIR", "ExperimentResult", "load_result", "result_folder",
    "run_experiment", "run_specs",
)}

__all__ = ["EXPERIMENTS", "EXPERIMENT_NAMES", "SCALES", "SCALE_NAMES", "Arm", "Experiment", "Scale", "experiment",
           "scale", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'dropkey.lab.experiments' has no attribute {name!r}")
    return getattr(importlib.import_module(f"dropkey.lab.experiments.{module}"), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
