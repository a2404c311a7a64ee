"""Run the report's studies (the simulations and the theory checks), cached per config.

A study's result lives in a folder named by a hash of (study name, config, code
version): ``results.csv``, ``summary.json``, ``config.json`` and, written last,
``provenance.json``. A folder whose ``provenance.json`` exists is complete, so a
crashed or interrupted build resumes by skipping every finished study. Each
file is written atomically (:mod:`dropkey.storage`).

The report is always built from what is read back from the cache, never from the
in-memory result of a fresh run, so a first build and a rebuild from the cache
render the same bytes.

The "code version" is a hash of the source files a study depends on (its module,
``simulations/common.py`` and the ``theory`` package), so editing a simulation
invalidates its cached results while an unrelated edit does not.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import io
import json
import logging
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from tqdm import tqdm

from dropkey.provenance import provenance
from dropkey.storage import write_json_atomic, write_text_atomic

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
SIZES = ("quick", "full")
COMPLETE_MARKER = "provenance.json"  # written last: its presence means the folder is complete


@dataclass(frozen=True)
class Study:
    """One study of the report: where its code lives and how to present it."""

    name: str
    title: str
    module: str  # importable module with run/summarise (theory: the derivations package)
    config_class: str  # name of the frozen config dataclass in ``module`` ("" for theory)
    sources: tuple[str, ...]  # files (relative to the repo root) whose content is the code version


_SIMULATION_SOURCES = ("simulations/common.py", "theory")

STUDIES: tuple[Study, ...] = (
    Study(
        "coefficients",
        "Smoothing coefficients: Monte-Carlo against exact",
        "simulations.coefficients",
        "CoefficientsConfig",
        ("simulations/coefficients.py",) + _SIMULATION_SOURCES,
    ),
    Study(
        "gradient_damping",
        "Damping of the rich-get-richer loop",
        "simulations.gradient_damping",
        "GradientDampingConfig",
        ("simulations/gradient_damping.py",) + _SIMULATION_SOURCES,
    ),
    Study(
        "toy_optimisation",
        "The paper's toy objective, optimised",
        "simulations.toy_optimisation",
        "ToyOptimisationConfig",
        ("simulations/toy_optimisation.py",) + _SIMULATION_SOURCES,
    ),
    Study(
        "train_test_mismatch",
        "Train/test mismatch and Monte-Carlo inference",
        "simulations.train_test_mismatch",
        "TrainTestMismatchConfig",
        ("simulations/train_test_mismatch.py",) + _SIMULATION_SOURCES,
    ),
    Study(
        "toy_regimes",
        "DropKey against dropout across toy regimes",
        "simulations.toy_regimes",
        "ToyRegimesConfig",
        ("simulations/toy_regimes.py", "simulations/toy_exact.py", "simulations/toy_optimisation.py")
        + _SIMULATION_SOURCES,
    ),
    Study(
        "structured_masks",
        "Structured masks: DropKey-Block and DropKey-Cross coefficients",
        "simulations.structured_masks",
        "StructuredMasksConfig",
        ("simulations/structured_masks.py", "dropkey/masks.py") + _SIMULATION_SOURCES,
    ),
)
THEORY = Study("theory", "Symbolic derivations", "theory.derivations", "", ("theory",))
STUDY_NAMES = tuple(study.name for study in STUDIES) + (THEORY.name,)


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


THEORY_QUESTION = "Do the paper's equations (Eqs. 3-11) hold as printed, and what do they imply beyond it?"
THEORY_METHOD = ("Each statement is derived with sympy (symbolically where possible, exactly for small N otherwise) "
                 "and cross-checked numerically against brute-force enumeration of every mask.")


def page_text(spec: Study) -> dict[str, str]:
    """The question, method and (optional) explanation at the top of a study's page, from its module."""
    if spec is THEORY:
        return {"question": THEORY_QUESTION, "method": THEORY_METHOD, "explanation": ""}
    module = importlib.import_module(spec.module)
    return {"question": module.QUESTION, "method": module.METHOD, "explanation": getattr(module, "EXPLANATION", "")}


def study(name: str) -> Study:
    """The study with this name (ValueError naming the allowed names otherwise)."""
    for candidate in STUDIES + (THEORY,):
        if candidate.name == name:
            return candidate
    raise ValueError(f"study must be one of {STUDY_NAMES}, got {name!r}")


def default_config(name: str, size: str, seed: int) -> Any:
    """The simulation's quick() or full() config with the given seed."""
    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}, got {size!r}")
    spec = study(name)
    config_class = getattr(importlib.import_module(spec.module), spec.config_class)
    config = config_class.quick() if size == "quick" else config_class.full()
    return dataclasses.replace(config, seed=seed)


def code_version(spec: Study) -> str:
    """SHA-256 over the sorted (path, content) of the study's source files."""
    digest = hashlib.sha256()
    for source in spec.sources:
        path = ROOT / source
        files = sorted(path.rglob("*.py")) if path.is_dir() else [path]
        for file in files:
            digest.update(file.relative_to(ROOT).as_posix().encode())
            digest.update(file.read_bytes())
    return digest.hexdigest()


def config_record(config: Any) -> dict[str, Any]:
    """A config dataclass (or a plain mapping) as JSON-ready data, tuples as lists."""
    from simulations.common import to_jsonable

    data = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)
    return to_jsonable(data)


def cache_folder(cache_root: Path, spec: Study, config: Any) -> Path:
    """The folder of this (study, config, code version)."""
    key = json.dumps(
        {"study": spec.name, "config": config_record(config), "code": code_version(spec)}, sort_keys=True
    )
    return Path(cache_root) / spec.name / hashlib.sha256(key.encode()).hexdigest()[:16]


def _csv_text(frame: pd.DataFrame) -> str:
    buffer = io.StringIO()
    frame.to_csv(buffer, index=False, float_format="%.12g")
    return buffer.getvalue()


def _write(folder: Path, spec: Study, config: Any, frame: pd.DataFrame, summary: Any, command: list[str]) -> None:
    """Write the four files; provenance.json last, so it marks a complete folder."""
    from simulations.common import to_jsonable

    write_text_atomic(folder / "results.csv", _csv_text(frame))
    write_json_atomic(folder / "summary.json", to_jsonable(summary))
    write_json_atomic(folder / "config.json", {"study": spec.name, "config": config_record(config)})
    seed = config_record(config).get("seed")
    write_json_atomic(folder / COMPLETE_MARKER, provenance(seed, command))


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def _read(folder: Path, spec: Study, from_cache: bool) -> StudyResult:
    return StudyResult(
        study=spec,
        folder=folder,
        frame=pd.read_csv(folder / "results.csv"),
        summary=_read_json(folder / "summary.json"),
        config=_read_json(folder / "config.json"),
        provenance=_read_json(folder / COMPLETE_MARKER),
        from_cache=from_cache,
    )


def _simulate(spec: Study, config: Any, progress: bool) -> tuple[pd.DataFrame, dict]:
    module = importlib.import_module(spec.module)
    frame = module.run(config, progress=progress)
    return frame, module.summarise(frame)


def _derive(config: Mapping[str, Any]) -> tuple[pd.DataFrame, dict]:
    """The theory 'study': every derivation, with its expressions pre-rendered as MathML."""
    from reports.html import expression_record
    from theory.derivations import verify_all

    derivations = verify_all(seed=int(config["seed"]))
    records = []
    for result in derivations:
        records.append(
            {
                "key": result.key,
                "title": result.title,
                "statement": result.statement,
                "status": result.status,
                "holds": bool(result.holds),
                "details": result.details,
                "expressions": [expression_record(name, expr) for name, expr in result.expressions.items()],
            }
        )
    frame = pd.DataFrame(
        [{"key": r["key"], "title": r["title"], "status": r["status"], "holds": r["holds"]} for r in records]
    )
    return frame, {"derivations": records}


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
    if (folder / COMPLETE_MARKER).is_file():
        log.info("%s: cached in %s", name, folder)
        return _read(folder, spec, from_cache=True)
    log.info("%s: running (cache folder %s)", name, folder)
    if spec is THEORY:
        frame, summary = _derive(config)
    else:
        frame, summary = _simulate(spec, config, progress)
    _write(folder, spec, config, frame, summary, list(command if command is not None else sys.argv))
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
    names = list(only) if only else list(STUDY_NAMES)
    configs: dict[str, Any] = {}
    for name in names:
        study(name)  # validates the name
        configs[name] = {"seed": seed} if name == THEORY.name else default_config(name, size, seed)
    return configs
