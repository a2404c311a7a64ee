"""Run the report's studies (the simulations and the theory checks), cached per config.

A study's result lives in a folder named by a hash of (study name, config, code
version), in the layout of :func:`simulations.common.write_study_outputs` (the command
line's too): ``results.csv``, ``summary.json``, ``config.json``, ``provenance.json`` and,
written last, :mod:`dropkey.storage`'s completion marker. A folder with its marker is
complete, so a crashed or interrupted build resumes by skipping every finished study.
Each file is written atomically. A cached folder is read only when every file matches the size
and SHA-256 its marker records; a damaged one (a file changed, cut short, missing or unreadable,
or the marker itself) is logged, removed and recomputed, never rendered.

The report is always built from what is read back from the cache, never from the
in-memory result of a fresh run, so a first build and a rebuild from the cache
render the same bytes.

The "code version" is a hash of the code a study runs: its module and every project module
it imports, transitively (:func:`code_modules`), so editing a study or anything it depends on
invalidates its cached results while an unrelated edit does not.

The studies themselves come from :mod:`simulations.registry` (each simulation's ``STUDY``) and
:mod:`reports.theory_study` (the derivations).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import modulefinder
import shutil
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from tqdm import tqdm

from dropkey import storage
from reports.theory_study import THEORY
from simulations import registry
from simulations.common import config_record, read_study_outputs, write_study_outputs
from simulations.registry import Study

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
SIZES = registry.SIZES
#: The packages whose modules make up a study's code version.
PROJECT_PACKAGES = ("theory", "dropkey", "simulations", "reports")


def all_studies() -> tuple[Study, ...]:
    """Every study of the report: the simulations' (:func:`simulations.registry.studies`), then the theory."""
    return registry.studies() + (THEORY,)


def study_names() -> tuple[str, ...]:
    """The names of :func:`all_studies`, in their order."""
    return tuple(spec.name for spec in all_studies())


def __getattr__(name: str) -> Any:
    """``STUDIES`` (the simulations' studies) and ``STUDY_NAMES`` (every study's name), read from the registry."""
    if name == "STUDIES":
        return registry.studies()
    if name == "STUDY_NAMES":
        return study_names()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass(frozen=True)
class StudyResult:
    """A finished study as read back from its cache folder."""

    study: Study
    folder: Path
    frame: pd.DataFrame
    summary: dict[str, Any]
    config: dict[str, Any]
    provenance: dict[str, Any]
    from_cache: bool


def page_text(spec: Study) -> dict[str, str]:
    """The question, method and (optional) explanation at the top of a study's page."""
    return {"question": spec.question, "method": spec.method, "explanation": spec.explanation}


def study(name: str) -> Study:
    """The study with this name (ValueError naming the allowed names otherwise)."""
    for candidate in all_studies():
        if candidate.name == name:
            return candidate
    raise ValueError(f"study must be one of {study_names()}, got {name!r}")


def default_config(name: str, size: str, seed: int) -> Any:
    """The study's quick() or full() config with the given seed."""
    return study(name).config(size, seed)


def code_modules(spec: Study, root: Path = ROOT, packages: Sequence[str] = PROJECT_PACKAGES) -> dict[str, Path]:
    """The project modules a study's code runs: its module and every module of ``packages`` it imports.

    Imports are followed transitively and wherever they are written (in functions too), by reading
    the code (:class:`modulefinder.ModuleFinder` on ``root``), not by importing it; modules imported
    by name at run time (``importlib``) are not seen. A study's page module (its figures and
    equations) is imported that way, so drawing code is not part of its results' code version.
    Returns module name -> file.
    """
    origin = importlib.util.find_spec(spec.module).origin
    finder = modulefinder.ModuleFinder(path=[str(root)])
    finder.run_script(origin)
    found = {name: Path(module.__file__) for name, module in finder.modules.items()
             if module.__file__ and name.split(".")[0] in packages}
    found[spec.module] = Path(origin)
    return dict(sorted(found.items()))


def code_version(spec: Study, root: Path = ROOT, packages: Sequence[str] = PROJECT_PACKAGES) -> str:
    """SHA-256 over the sorted (module name, source) of :func:`code_modules`: editing any of them changes it."""
    digest = hashlib.sha256()
    for name, file in code_modules(spec, root, packages).items():
        digest.update(name.encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()


def cache_folder(cache_root: Path, spec: Study, config: Any) -> Path:
    """The folder of this (study, config, code version)."""
    key = json.dumps(
        {"study": spec.name, "config": config_record(config), "code": code_version(spec)}, sort_keys=True
    )
    return Path(cache_root) / spec.name / hashlib.sha256(key.encode()).hexdigest()[:16]


def _read(folder: Path, spec: Study, from_cache: bool) -> StudyResult:
    outputs = read_study_outputs(folder, remedy="dropkey-lab report")
    return StudyResult(study=spec, folder=outputs.folder, frame=outputs.frame, summary=outputs.summary,
                       config=outputs.config, provenance=outputs.provenance, from_cache=from_cache)


def run_study(
    name: str,
    config: Any,
    cache_root: Path,
    *,
    progress: bool = False,
    command: Sequence[str] | None = None,
) -> StudyResult:
    """The study's result for ``config``: from the cache if complete, else computed and cached."""
    spec = study(name)
    folder = cache_folder(cache_root, spec, config)
    if storage.is_complete(folder):
        try:
            cached = _read(folder, spec, from_cache=True)
        except (storage.IntegrityError, FileNotFoundError) as error:  # FileNotFoundError: a file it does not list
            log.warning("%s: the cache folder %s is damaged (%s); recomputing it", name, folder, error)
            shutil.rmtree(folder)
        else:
            log.info("%s: cached in %s", name, folder)
            return cached
    log.info("%s: running (cache folder %s)", name, folder)
    frame, summary = spec.compute(config, progress=progress)
    write_study_outputs(folder, name=spec.name, config=config, frame=frame, summary=summary,
                        command=list(command if command is not None else sys.argv))
    return _read(folder, spec, from_cache=False)


def run_studies(
    configs: Mapping[str, Any],
    cache_root: Path,
    *,
    progress: bool = False,
    command: Sequence[str] | None = None,
) -> dict[str, StudyResult]:
    """Run (or load) every study in ``configs`` (name -> config), in name order."""
    results = {}
    names = sorted(configs)
    for name in tqdm(names, desc="studies", disable=not progress):
        results[name] = run_study(name, configs[name], cache_root, progress=progress, command=command)
    return results


def default_configs(size: str, seed: int, only: Sequence[str] | None = None) -> dict[str, Any]:
    """Configs of the selected studies (all by default) at ``size`` with ``seed``."""
    names = list(only) if only else list(study_names())
    return {name: default_config(name, size, seed) for name in names}
