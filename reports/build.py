"""Build the report: run (or load) the studies, judge every claim, write self-contained HTML pages.

``build_report(out_dir, size="quick", seed=0)`` writes ``index.html`` (the
claims table), ``theory.html``, one page per simulation study and one page per
real-ViT experiment (``vit_<name>.html``). Pages are rendered only from cached
results (see :mod:`reports.studies`) and from the experiments' result folders
(``results/<scale>/<name>/``, see :mod:`dropkey.lab.experiments`), so rebuilding from
the same results gives byte-identical files. Pages are written atomically.

``experiment_scale="quick"`` (the CLI's default with ``--quick``) first runs every
experiment at that scale (training runs are cached in ``runs_dir``, so a second
build trains nothing); the pages show every scale found in ``results_dir``.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dropkey.storage import write_bytes_atomic, write_text_atomic
from reports import claims as registry
from reports.equations import page_equations
from reports.evidence import (
    VIT_SCALES,
    Evidence,
    experiment_complete,
    experiment_evidence,
    load_experiment_evidence,
)
from reports.figures import study_figures
from reports.forest import forest_figure
from reports.html import DOWNLOAD_BUDGET_BYTES, MAX_PAGE_BYTES, Downloads, check_page_size, flatten, render, table_html
from reports.studies import (
    ROOT,
    THEORY,
    StudyResult,
    all_studies,
    default_configs,
    page_text,
    run_studies,
    study,
)

log = logging.getLogger(__name__)

DEFAULT_CACHE = Path("runs") / "report-cache"
DEFAULT_RESULTS = ROOT / "results"
DEFAULT_RUNS = Path("runs") / "experiments"
#: room kept below the page limit when an experiment page re-renders with a smaller download budget
PAGE_MARGIN_BYTES = 100_000


@dataclass(frozen=True)
class BuiltReport:
    """What a build wrote: page name -> path, the verdict of every claim, and which studies were computed."""

    pages: dict[str, Path]
    verdicts: dict[str, registry.Verdict]
    computed: tuple[str, ...]  # studies run in this build (the others came from the cache)


def page_name(name: str) -> str:
    return f"{name}.html"


def _navigation(results: Mapping[str, StudyResult], experiments: Mapping[str, list]) -> list[dict[str, str]]:
    from dropkey.lab.experiments import EXPERIMENTS

    order = [spec.name for spec in all_studies()]
    links = [{"href": page_name(name), "title": study(name).title} for name in order if name in results]
    links += [{"href": page_name(registry.VIT_PREFIX + e.name), "title": f"ViT: {e.name.replace('_', ' ')}"}
              for e in EXPERIMENTS if experiments.get(e.name)]
    return links


def load_experiments(results_dir: Path) -> dict[str, list]:
    """Every complete experiment result in ``results_dir``: name -> results, largest scale first."""
    from dropkey.lab.experiments import EXPERIMENT_NAMES, load_result

    found: dict[str, list] = {}
    for name in EXPERIMENT_NAMES:
        for scale in reversed(VIT_SCALES):
            folder = Path(results_dir) / scale / name
            if experiment_complete(folder):
                experiment_evidence(folder, name, scale)  # EvidenceError for a folder of an older format
                found.setdefault(name, []).append(load_result(results_dir, scale, name))
    return found


def _evidence(results: Mapping[str, StudyResult], results_dir: Path) -> Evidence:
    simulations = {name: result for name, result in results.items() if name != THEORY.name}
    derivations = {}
    if THEORY.name in results:
        derivations = {record["key"]: record for record in results[THEORY.name].summary["derivations"]}
    return Evidence(
        summaries={name: result.summary for name, result in simulations.items()},
        frames={name: result.frame for name, result in simulations.items()},
        derivations=derivations,
        experiments=load_experiment_evidence(results_dir),
    )


def _claim_rows(
    evidence: Evidence, results: Mapping[str, StudyResult], experiments: Mapping[str, list]
) -> list[dict[str, Any]]:
    rows = []
    for claim in registry.CLAIMS:
        links = []
        for name in claim.measured_by:
            if name.startswith(registry.VIT_PREFIX):
                experiment = name[len(registry.VIT_PREFIX):]
                scales = ", ".join(result.scale for result in experiments.get(experiment, []))
                links.append({"href": page_name(name) if experiments.get(experiment) else "",
                              "title": f"ViT experiment {experiment} ({scales or 'not run'})"})
            else:
                links.append({"href": page_name(name) if name in results else "", "title": study(name).title})
        rows.append({"claim": claim, "verdict": registry.assess(claim, evidence), "links": links})
    return rows


def _check_rows(evidence: Evidence) -> list[dict[str, Any]]:
    rows = []
    for check in registry.CHECKS:
        status, key = check.evaluate(evidence)
        rows.append({"check": check, "status": status, "key": key})
    return rows


def _derivation_keys(claim_rows: list[dict[str, Any]], page: str) -> list[str]:
    """The derivations behind the claims a page measures, in registry order, each once."""
    keys = [key for row in claim_rows if page in row["claim"].measured_by for key in row["claim"].theory]
    return list(dict.fromkeys(keys))


def _figure_entries(figures, downloads: Downloads, prefix: str) -> list[dict[str, Any]]:
    return [{"slug": f.slug, "title": f.title, "caption": f.caption, "markup": f.markup,
             "download": downloads.add(f.data, f"{prefix}-{f.slug}.csv", f.title)} for f in figures]


def _study_page(result: StudyResult, claim_rows: list[dict[str, Any]], check_rows: list[dict[str, Any]],
                nav: list[dict[str, str]], downloads: Downloads) -> str:
    name = result.study.name
    figures = _figure_entries(study_figures(name, result.frame, result.summary), downloads, name)
    return render(
        "study.html.j2",
        page_title=result.study.title,
        nav=nav,
        name=name,
        title=result.study.title,
        **page_text(result.study),
        claims=[row for row in claim_rows if name in row["claim"].measured_by],
        checks=[row for row in check_rows if row["check"].measured_by == name],
        equations=page_equations(name),
        derivation_keys=_derivation_keys(claim_rows, name),
        figures=figures,
        summary_rows=flatten(result.summary),
        downloads=[downloads.add(result.frame, f"{name}-results.csv", "every row of the study")],
        head_table=table_html(result.frame, max_rows=20),
        config=result.config,
        provenance=result.provenance,
        folder=result.folder.as_posix(),
    )


def _experiment_section(result, downloads: Downloads) -> dict[str, Any]:
    from dropkey.lab.experiments import scale as scale_settings
    from reports.vit_figures import experiment_figures

    prefix = f"{result.name}-{result.scale}"
    figures = _figure_entries(experiment_figures(result), downloads, prefix)
    tables = {"per_seed.csv": (result.per_seed, "per quantity and seed: every arm value and paired difference"),
              "comparisons.csv": (result.comparisons, "every comparison: mean, SE over seeds, n"),
              "finals.csv": (result.finals, "per run: final quantities"),
              "runs.csv": (result.runs, "per run and epoch: the trainer's metrics"),
              "attention.csv": (result.attention, "per run, epoch and block: attention diagnostics (mean over heads)")}
    if len(result.monte_carlo):
        tables["monte_carlo.csv"] = (result.monte_carlo, "per run and K: Monte-Carlo inference accuracy")
    shown = ["quantity", "group", "layer", "value", "standard_error", "n", "description"]
    return {
        "scale": result.scale,
        "description": scale_settings(result.scale).description,
        "runs": result.summary["runs"],
        "seeds": result.summary["seeds"],
        "wall_time": f"{result.summary['training_wall_time_s_sum'] / 60:.1f} min",
        "commit": result.provenance.get("git_commit", "unknown"),
        "figures": figures,
        "comparisons": table_html(result.comparisons[shown], max_rows=200),
        "finals": table_html(result.finals, max_rows=200),
        "downloads": [
            downloads.add(frame, f"{prefix}-{filename}", title) for filename, (frame, title) in tables.items()
        ],
        "config": result.config,
        "provenance": result.provenance,
        "folder": result.folder.as_posix(),
    }


def _experiment_page(name: str, found: list, claim_rows: list[dict[str, Any]], nav: list[dict[str, str]],
                     downloads: Downloads) -> str:
    from dropkey.lab.experiments import experiment

    spec = experiment(name)
    return render(
        "experiment.html.j2",
        page_title=f"ViT: {spec.title}",
        nav=nav,
        name=name,
        title=spec.title,
        question=spec.question,
        method=spec.method,
        claims=[row for row in claim_rows if registry.VIT_PREFIX + name in row["claim"].measured_by],
        equations=page_equations(registry.VIT_PREFIX + name),
        derivation_keys=_derivation_keys(claim_rows, registry.VIT_PREFIX + name),
        scales=[_experiment_section(result, downloads) for result in found],
        missing_scales=[scale for scale in VIT_SCALES if scale not in {result.scale for result in found}],
    )


def _theory_page(result: StudyResult, nav: list[dict[str, str]], downloads: Downloads) -> str:
    derivations = result.summary["derivations"]
    counts = Counter(record["status"] for record in derivations)
    return render(
        "theory.html.j2",
        page_title=THEORY.title,
        nav=nav,
        seed=result.config["config"]["seed"],
        **page_text(THEORY),
        answer=", ".join(f"{count} {status}" for status, count in sorted(counts.items())),
        derivations=derivations,
        downloads=[downloads.add(result.frame, "theory-derivations.csv", "status of every derivation")],
        provenance=result.provenance,
    )


def _index_page(
    claim_rows: list[dict[str, Any]], check_rows: list[dict[str, Any]], results: Mapping[str, StudyResult], nav,
    size: str, seed: int, experiments: Mapping[str, list],
) -> str:
    counts = Counter(row["verdict"].status for row in claim_rows)
    studies = [
        {
            "href": page_name(name),
            "title": results[name].study.title,
            "folder": results[name].folder.name,
            "commit": results[name].provenance.get("git_commit", "unknown"),
        }
        for name in sorted(results)
    ]
    forest = forest_figure([(row["claim"], finding) for row in claim_rows for finding in row["verdict"].findings])
    return render(
        "index.html.j2",
        page_title="Claims",
        nav=nav,
        size=size,
        seed=seed,
        claims=claim_rows,
        checks=check_rows,
        forest=forest,
        counts=[(status, counts.get(status, 0)) for status in registry.STATUSES],
        studies=studies,
        vit_results="results/<scale>/<experiment>/per_seed.csv",
        vit_note="found." if experiments else "not present yet, so those claims are 'not yet measured'.",
        experiments=[
            {"href": page_name(registry.VIT_PREFIX + name), "name": name,
             "scales": ", ".join(f"{r.scale} ({r.summary['runs']} runs)" for r in found),
             "commit": found[0].provenance.get("git_commit", "unknown")}
            for name, found in sorted(experiments.items())
        ],
    )


def build_report(
    out_dir: str | Path,
    *,
    size: str = "quick",
    seed: int = 0,
    only: Sequence[str] | None = None,
    configs: Mapping[str, Any] | None = None,
    cache_dir: str | Path = DEFAULT_CACHE,
    results_dir: str | Path = DEFAULT_RESULTS,
    experiment_scale: str | None = None,
    runs_dir: str | Path = DEFAULT_RUNS,
    jobs: int = 1,
    progress: bool = False,
    command: Sequence[str] | None = None,
) -> BuiltReport:
    """Write the report into ``out_dir``; return what was written and the verdicts.

    ``configs`` (study name -> config) overrides the quick/full configs (tests
    use tiny ones); ``only`` restricts the studies run and rendered; claims whose
    studies are not in this build are 'not yet measured'. ``experiment_scale``
    (e.g. "quick") first runs every real-ViT experiment at that scale into
    ``results_dir`` (runs cached in ``runs_dir``, ``jobs`` in parallel); None
    trains nothing and shows what ``results_dir`` holds.
    """
    out = Path(out_dir)
    chosen = dict(configs) if configs is not None else default_configs(size, seed, only)
    if only:
        chosen = {name: config for name, config in chosen.items() if name in set(only)}
    results = run_studies(chosen, Path(cache_dir), progress=progress, command=command)
    if experiment_scale is not None:
        from dropkey.lab.experiments import EXPERIMENT_NAMES, run_experiment

        for name in EXPERIMENT_NAMES:
            run_experiment(name, experiment_scale, runs_dir=runs_dir, results_dir=results_dir, jobs=jobs,
                           progress=progress, command=command)
    experiments = load_experiments(Path(results_dir))
    evidence = _evidence(results, Path(results_dir))
    claim_rows = _claim_rows(evidence, results, experiments)
    check_rows = _check_rows(evidence)
    nav = _navigation(results, experiments)
    pages: dict[str, str] = {}
    files: dict[str, bytes] = {}
    for name, result in sorted(results.items()):
        downloads = Downloads()
        pages[page_name(name)] = (_theory_page(result, nav, downloads) if name == THEORY.name
                                  else _study_page(result, claim_rows, check_rows, nav, downloads))
        files.update(downloads.files)
    for name, found in sorted(experiments.items()):
        budget = DOWNLOAD_BUDGET_BYTES
        downloads = Downloads(budget)
        text = _experiment_page(name, found, claim_rows, nav, downloads)
        over = len(text.encode()) - MAX_PAGE_BYTES
        while over > 0 and budget > 0:  # several scales' figures and tables leave less room: embed less data
            budget = max(0, budget - over - PAGE_MARGIN_BYTES)
            downloads = Downloads(budget)
            text = _experiment_page(name, found, claim_rows, nav, downloads)
            over = len(text.encode()) - MAX_PAGE_BYTES
        pages[page_name(registry.VIT_PREFIX + name)] = text
        files.update(downloads.files)
    pages["index.html"] = _index_page(claim_rows, check_rows, results, nav, size, seed, experiments)
    for filename, text in pages.items():
        check_page_size(filename, text)
    written = {}
    for relative, payload in sorted(files.items()):
        write_bytes_atomic(out / relative, payload)
    for filename, text in sorted(pages.items()):
        written[filename] = write_text_atomic(out / filename, text)
        log.info("wrote %s (%d bytes)", out / filename, len(text.encode()))
    return BuiltReport(
        pages=written,
        verdicts={row["claim"].id: row["verdict"] for row in claim_rows},
        computed=tuple(name for name, result in sorted(results.items()) if not result.from_cache),
    )
