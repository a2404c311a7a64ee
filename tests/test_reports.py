"""The report builder: claims registry, verdict rules, cached studies, and self-contained, reproducible pages.

The report is built with tiny study configs and a stand-in for the (slow)
symbolic derivations, so the whole file runs in seconds.
"""

from __future__ import annotations

import base64
import functools
import gzip
import html
import importlib
import io
import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import sympy as sp

from dropkey import storage
from dropkey.lab.experiments import EXPERIMENT_NAMES
from reports import claims as registry
from reports.build import build_report
from reports.cli import build_parser, main
from reports.evidence import Evidence, EvidenceError, Sample, load_experiment_evidence
from reports.results_doc import results_markdown
from reports.statistics import DIRECTIONS
from reports.studies import STUDY_NAMES, cache_folder, code_modules, code_version, study, study_names
from simulations import registry as simulations_registry
from simulations.coefficients import CoefficientsConfig
from simulations.gradient_damping import GradientDampingConfig
from simulations.registry import Study
from simulations.structured_masks import StructuredMasksConfig
from simulations.toy_optimisation import ToyOptimisationConfig
from simulations.toy_regimes import ToyRegimesConfig
from simulations.train_test_mismatch import TrainTestMismatchConfig
from theory.derivations import CHECKS, Derivation

ROOT = Path(__file__).resolve().parents[1]

#: Every claim the brief requires the registry to hold.
REQUIRED = {
    "eq3-expected-output",
    "eq4-smoothing",
    "order-majorisation",
    "dropout-no-smoothing",
    "gradient-chain",
    "gradient-damping",
    "toy-peak-shrinkage",
    "vit-schedule",
    "dropkey-vs-dropout-optimisation",
    "structured-masks-smoothing",
    "vit-structured",
    "deepvit-collapse",
    "vit-attention-peaks",
    "vit-accuracy",
    "vit-alignment",
    "deepvit-reattention",
    "dropkey-collapse",
}


def tiny_configs(with_theory: bool = True) -> dict:
    """Configs far smaller than quick(): each study runs in well under a second."""
    configs = {
        "coefficients": CoefficientsConfig(ns=(4, 8), drop_ratios=(0.1, 0.5), num_samples=200, num_repeats=3),
        "gradient_damping": GradientDampingConfig(
            ns=(6,), shapes=("peaked", "vit_like"), rows_per_cell=10, drop_ratios=(0.1, 0.5),
            beta_means=(0.0, 0.5), num_samples=500,
        ),
        "toy_optimisation": ToyOptimisationConfig(
            n_problems=32, n_keys=4, steps=40, n_records=8, drop_ratios=(0.1, 0.5), covariance_samples=50
        ),
        "train_test_mismatch": TrainTestMismatchConfig(
            ns=(4, 8), drop_ratios=(0.1, 0.5), shapes=("peaked", "vit_like"), n_problems=20, ks=(1, 4, 16)
        ),
        "toy_regimes": ToyRegimesConfig(
            n_problems=12, n_keys=5, dim=3, checkpoints=(2, 6), drop_ratios=(0.2,), logit_lr_multipliers=(5.0,),
            fixed_value_offsets=(0.0,), probe_masks=4,
        ),
        "structured_masks": StructuredMasksConfig(
            grids=((4, 4),), drop_ratios=(0.3,), rows_per_shape=2, num_samples=300
        ),
    }
    if with_theory:
        configs["theory"] = {"seed": 0}
    return configs


def fake_verify_all(*, seed: int = 0) -> list[Derivation]:
    """A fast stand-in for theory.derivations.verify_all: every key proved, with real sympy expressions."""
    p, r, t = sp.symbols("p r t", positive=True)
    expressions = {
        "integral": sp.Integral(sp.exp(-t * p) * (r + (1 - r) * sp.exp(-t)), (t, 0, sp.oo)),
        "fraction": (1 - r) / (p + 1),
    }
    return [
        Derivation(key, key.replace("-", " "), f"statement of {key}", "proved", True, expressions, "details")
        for key, _ in CHECKS
    ]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Two builds from one cache (the second reads everything back) plus the cache folder."""
    base = tmp_path_factory.mktemp("report")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("theory.derivations.verify_all", fake_verify_all)
        first = build_report(base / "a", configs=tiny_configs(), cache_dir=base / "cache", results_dir=base / "results")
        second = build_report(
            base / "b", configs=tiny_configs(), cache_dir=base / "cache", results_dir=base / "results"
        )
    return {"base": base, "first": first, "second": second}


def read_pages(folder: Path) -> dict[str, str]:
    return {path.name: path.read_text(encoding="utf-8") for path in sorted(folder.glob("*.html"))}


# --- registry --------------------------------------------------------------------------------


def test_registry_holds_every_required_claim_once():
    ids = [claim.id for claim in registry.CLAIMS]
    assert len(ids) == len(set(ids))
    assert REQUIRED <= set(ids), f"missing claims: {sorted(REQUIRED - set(ids))}"
    for claim in registry.CLAIMS:
        assert claim.statement and claim.source and claim.rule_in_words and claim.tests, claim.id
        assert claim.measured_by, claim.id
    assert "mc-inference-alignment" not in ids  # the central-limit rate is a check of the code, not a claim
    assert registry.check("mc-inference-rate").measured_by == "train_test_mismatch"


def test_every_empirical_quantity_is_registered_before_the_data():
    """Quantity, direction, smallest effect with its justification, alpha: stated in the registry and its words."""
    empirical = [claim for claim in registry.CLAIMS if claim.empirical]
    assert {claim.id for claim in empirical} >= {c for c in REQUIRED if c.startswith(("vit-", "deepvit-", "toy-"))}
    for claim in empirical:
        for quantity in claim.quantities:
            assert quantity.direction in DIRECTIONS and quantity.smallest_effect > 0 and quantity.alpha == 0.05
            assert quantity.justification and quantity.meaning and quantity.replicate
            assert (
                quantity.name in claim.rule_in_words
                and f"smallest effect {quantity.smallest_effect:g}" in claim.rule_in_words
            )
    assert "ours (hypothesis)" in registry.claim("structured-masks-smoothing").source


def _test_exists(node: str) -> bool:
    """Whether a node id ('tests/test_x.py::test_y' or '...::TestZ::test_y') names a test function (by importing it)."""
    file, _, name = node.partition("::")
    path = ROOT / file
    if path.parent != ROOT / "tests" or not path.is_file():
        return False
    target = importlib.import_module(path.stem)  # tests/ is on sys.path (pytest's rootdir conftest)
    for part in name.split("::"):
        target = getattr(target, part, None)
    return callable(target) and name.split("::")[-1].startswith("test")


def test_every_referenced_test_node_exists():
    missing = [f"{item.id}: {node}" for item in (*registry.CLAIMS, *registry.CHECKS) for node in item.tests
               if not _test_exists(node)]
    assert not missing, missing
    assert not _test_exists("tests/test_reports.py::test_no_such_test")  # the check can fail


def test_every_referenced_derivation_and_study_exists():
    keys = {key for key, _ in CHECKS}
    for claim in registry.CLAIMS:
        assert set(claim.theory) <= keys, claim.id
        experiments = {registry.VIT_PREFIX + name for name in EXPERIMENT_NAMES}
        assert set(claim.measured_by) <= set(STUDY_NAMES) | experiments, claim.id


def test_registry_records_are_frozen():
    with pytest.raises(AttributeError):
        registry.CLAIMS[0].id = "other"  # type: ignore[misc]
    with pytest.raises(ValueError, match="status must be one of"):
        registry.Verdict("maybe", "", "")
    with pytest.raises(ValueError, match="direction"):
        registry.Quantity("x", "y", "sideways", 1.0, "z")


# --- verdict rules on synthetic evidence --------------------------------------------------------------

PROVED = {"a": "proved"}
COUNTS = {"pairs": 9, "rows": 3, "c_order_violations": 0, "w_order_violations": 0, "max_violations": 0,
          "entropy_violations": 0}


def _sample(quantity: str, values, label: str = "", covariate=None) -> Sample:
    return Sample(
        quantity, label, np.asarray(values, dtype=float), None if covariate is None else np.asarray(covariate)
    )


def _theory(claim_id: str, samples, **extra) -> dict:
    return {"derivations": PROVED, "samples": samples, **extra}


RULE_CASES = [
    ("eq3-expected-output", _theory("", [_sample("coverage_minus_nominal", [0.0, 0.01, -0.01, 0.005])]), "confirmed"),
    ("eq3-expected-output", _theory("", [_sample("coverage_minus_nominal", [-0.3, -0.32, -0.28])]), "partly"),
    ("eq3-expected-output", _theory("", None), "confirmed"),  # proved; the cross-check did not run
    ("eq3-expected-output", {"derivations": {"a": "refuted"}, "samples": None}, "contradicted"),
    ("eq3-expected-output", {"derivations": {"a": "failed"}, "samples": None}, "not yet measured"),
    ("eq3-expected-output", _theory("", [_sample("coverage_minus_nominal", [0.1, -0.1, 0.0])]), "inconclusive"),
    ("eq4-smoothing", {"derivations": PROVED, "counts": COUNTS}, "confirmed"),
    ("eq4-smoothing", {"derivations": PROVED, "counts": {**COUNTS, "c_order_violations": 2}}, "contradicted"),
    ("eq4-smoothing", {"derivations": {"a": "missing"}, "counts": None}, "not yet measured"),
    ("order-majorisation", {"derivations": PROVED, "counts": COUNTS}, "confirmed"),
    ("order-majorisation", {"derivations": PROVED, "counts": {**COUNTS, "max_violations": 1}}, "contradicted"),
    ("dropout-no-smoothing", {"derivations": PROVED}, "confirmed"),
    ("dropout-no-smoothing", {"derivations": {"a": "refuted"}}, "contradicted"),
    ("toy-peak-shrinkage", [_sample("peak_dropkey_minus_none", [-0.2, -0.21, -0.19], "r=0.1")], "confirmed"),
    ("toy-peak-shrinkage", [_sample("peak_dropkey_minus_none", [-0.2, -0.21, -0.19], "r=0.1"),
                            _sample("peak_dropkey_minus_none", [0.0, 0.001, -0.001], "r=0.5")], "partly"),
    ("toy-peak-shrinkage", [_sample("peak_dropkey_minus_none", [0.2, 0.21], "r=0.1")], "contradicted"),
    ("toy-peak-shrinkage", [_sample("peak_dropkey_minus_none", [0.2, -0.3, 0.1], "r=0.1")], "inconclusive"),
    ("toy-peak-shrinkage", None, "not yet measured"),
    ("gradient-chain", _theory("", [_sample("link_fraction_minus_half", [0.4, 0.45, 0.38], "a")]), "confirmed"),
    ("gradient-chain", _theory("", [_sample("link_fraction_minus_half", [0.4, 0.45, 0.38], "a"),
                                    _sample("link_fraction_minus_half", [-0.3, -0.35, -0.28], "b")]), "partly"),
    ("gradient-damping", _theory("", [_sample("log_damping", [-0.2, -0.25, -0.22], "r=0.1")],
                                 first_order_errors={"r=0.1": 0.01}), "confirmed"),
    ("gradient-damping", _theory("", [_sample("log_damping", [-0.2, -0.25, -0.22], "r=0.1")],
                                 first_order_errors={"r=0.1": 0.12}), "partly"),  # the leading-order caveat
    ("gradient-damping", _theory("", [_sample("log_damping", [0.2, 0.25, 0.22], "r=0.1")],
                                 first_order_errors={"r=0.1": 0.01}), "partly"),  # proof vs contradicting data
]


@pytest.mark.parametrize(("claim_id", "numbers", "expected"), RULE_CASES)
def test_rule_gives_the_stated_status(claim_id, numbers, expected):
    verdict = registry.claim(claim_id).rule(numbers)
    assert verdict.status == expected, verdict
    assert verdict.reason


def test_rules_together_give_every_status():
    assert {expected for _, _, expected in RULE_CASES} == set(registry.STATUSES)


def _write_per_seed(root: Path, scale: str, experiment: str, rows: list[tuple[str, list[float]]], *,
                    covariate: list[float] | None = None, complete: bool = True) -> None:
    folder = root / scale / experiment
    folder.mkdir(parents=True)
    records = [{"quantity": q, "group": "", "layer": -1, "seed": seed, "value": v,
                "covariate": math.nan if covariate is None else covariate[seed], "description": q}
               for q, values in rows for seed, v in enumerate(values)]
    pd.DataFrame(records, columns=["quantity", "group", "layer", "seed", "value", "covariate", "description"]).to_csv(
        folder / "per_seed.csv", index=False)
    if complete:
        (folder / "provenance.json").write_text("{}")
        storage.mark_complete(folder)


@pytest.mark.parametrize(
    ("claim_id", "experiment", "rows", "expected"),
    [
        ("vit-schedule", "schedules", [("top1_decreasing_minus_constant", [0.8, 0.9, 1.0])], "confirmed"),
        ("vit-schedule", "schedules", [("top1_decreasing_minus_constant", [0.1, 0.0, -0.1])], "contradicted"),
        ("vit-schedule", "schedules", [("top1_decreasing_minus_constant", [1.5, -1.2, 0.4])], "inconclusive"),
        ("vit-schedule", "schedules", [("top1_decreasing_minus_constant", [1.5])], "not yet measured"),
        ("vit-structured", "structured", [("top1_block_minus_dropkey", [0.0, 0.1, -0.1]),
                                          ("top1_cross_minus_dropkey", [5.0, 4.0, 4.6])], "partly"),
        ("vit-structured", "structured", [("top1_block_minus_dropkey", [5.0, 4.2, 4.8]),
                                          ("top1_cross_minus_dropkey", [5.0, 4.0, 4.6])], "contradicted"),
        ("vit-attention-peaks", "attention_dynamics", [("peak_dropkey_minus_none", [-0.05, -0.06, -0.04]),
                                                       ("entropy_dropkey_minus_none", [0.1, 0.12, 0.09])], "confirmed"),
    ],
)
def test_real_vit_claims_read_the_per_seed_table(tmp_path, claim_id, experiment, rows, expected):
    _write_per_seed(tmp_path, "medium", experiment, rows)
    evidence = Evidence(experiments=load_experiment_evidence(tmp_path))
    verdict = registry.assess(registry.claim(claim_id), evidence)
    assert verdict.status == expected, verdict
    n = len(rows[0][1])
    assert verdict.key_number.startswith(f"[medium scale, n = {n} seeds]")


def test_structure_helping_with_one_seed_is_not_confirmed(tmp_path):
    """The old rule called n = 1 with block +5 pp and cross +4 pp 'confirmed' for 'no gain'."""
    _write_per_seed(tmp_path, "medium", "structured", [("top1_block_minus_dropkey", [5.0]),
                                                       ("top1_cross_minus_dropkey", [4.0])])
    verdict = registry.assess(
        registry.claim("vit-structured"), Evidence(experiments=load_experiment_evidence(tmp_path))
    )
    assert verdict.status == "not yet measured"


def test_dropkey_collapse_is_decided_at_a_matched_entropy(tmp_path):
    entropy = [-0.05, -0.06, -0.04, -0.055]  # DropKey sharpens attention; similarity follows entropy alone
    similarity = [0.8 * e for e in entropy]
    _write_per_seed(tmp_path, "medium", "collapse", [("centred_similarity_dropkey_minus_plain", similarity),
                                                     ("centred_similarity_both_minus_reattention", similarity)],
                    covariate=entropy)
    verdict = registry.assess(
        registry.claim("dropkey-collapse"), Evidence(experiments=load_experiment_evidence(tmp_path))
    )
    assert all(f.decision.covariate for f in verdict.findings)
    assert all(abs(f.decision.mean) < 1e-9 for f in verdict.findings)  # nothing left once entropy is matched


def test_real_vit_claims_are_judged_at_the_largest_complete_scale(tmp_path):
    _write_per_seed(tmp_path, "quick", "schedules", [("top1_decreasing_minus_constant", [-5.0, -5.1, -4.9])])
    _write_per_seed(tmp_path, "medium", "schedules", [("top1_decreasing_minus_constant", [5.0, 5.1, 4.9])])
    _write_per_seed(tmp_path, "full", "schedules", [("top1_decreasing_minus_constant", [-5.0, -5.1, -4.9])],
                    complete=False)  # incomplete folders are ignored
    found = load_experiment_evidence(tmp_path)
    assert found["schedules"].scale == "medium"
    (tmp_path / "full" / "schedules" / "provenance.json").write_text("{}")  # interrupted before its marker
    with pytest.raises(EvidenceError, match="no completion marker"):
        load_experiment_evidence(tmp_path)
    (tmp_path / "full" / "schedules" / "provenance.json").unlink()
    assert registry.assess(registry.claim("vit-schedule"), Evidence(experiments=found)).status == "confirmed"


def test_absent_results_mean_not_yet_measured(tmp_path):
    assert load_experiment_evidence(tmp_path) == {}
    for claim in registry.CLAIMS:
        verdict = registry.assess(claim, Evidence())
        assert verdict.status == "not yet measured", claim.id
        assert "not run" in verdict.reason, claim.id


def test_a_study_that_ran_without_what_a_claim_reads_is_an_error():
    """A renamed summary key or a missing quantity fails loudly; it never reads as 'not yet measured'."""
    evidence = Evidence(summaries={"toy_optimisation": {"renamed": 1}},
                        frames={"toy_optimisation": pd.DataFrame({"regulariser": [], "drop_ratio": [], "problem": [],
                                                                  "step": [], "peak_weight": []})})
    with pytest.raises(EvidenceError, match="far_fraction"):
        registry.assess(registry.claim("toy-peak-shrinkage"), evidence)
    with pytest.raises(EvidenceError, match="no columns"):
        registry.assess(registry.claim("structured-masks-smoothing"),
                        Evidence(summaries={"structured_masks": {}}, frames={"structured_masks": pd.DataFrame()}))


def test_a_result_folder_without_a_registered_quantity_is_an_error(tmp_path):
    _write_per_seed(tmp_path, "medium", "accuracy", [("top1_dropkey_minus_none", [0.1, 0.2, 0.3])])
    evidence = Evidence(experiments=load_experiment_evidence(tmp_path))
    with pytest.raises(EvidenceError, match="top1_dropkey_minus_dropout"):
        registry.assess(registry.claim("vit-accuracy"), evidence)


def test_an_older_result_folder_must_be_reanalysed(tmp_path):
    folder = tmp_path / "medium" / "accuracy"
    folder.mkdir(parents=True)
    (folder / "measurements.csv").write_text("claim_id,quantity,value,standard_error,n,scale,experiment\n")
    (folder / "provenance.json").write_text("{}")
    with pytest.raises(EvidenceError, match="--reanalyse"):  # no completion marker: an earlier version wrote it
        load_experiment_evidence(tmp_path)
    storage.mark_complete(folder)
    with pytest.raises(EvidenceError, match="--reanalyse"):  # complete, but without the per-seed table
        load_experiment_evidence(tmp_path)


def test_checks_pass_fail_or_did_not_run():
    check = registry.check("mc-inference-rate")
    summary = {"pooled_slope": -0.49, "pooled_slope_se": 0.01, "slopes": {
        "a": {"smallest_k_closer_to_train_than_plain_inference": 2}}}
    assert check.evaluate(Evidence(summaries={"train_test_mismatch": summary}))[0] == "passed"
    assert check.evaluate(Evidence(summaries={"train_test_mismatch": {**summary, "pooled_slope": -0.3}}))[0] == "failed"
    assert check.evaluate(Evidence())[0] == "not run"
    with pytest.raises(EvidenceError):
        check.evaluate(Evidence(summaries={"train_test_mismatch": {"renamed": 1}}))


# --- the built report --------------------------------------------------------------------------------


def test_report_has_index_theory_and_a_page_per_study(built):
    pages = read_pages(built["base"] / "a")
    assert set(pages) == {"index.html", "theory.html"} | {f"{name}.html" for name in tiny_configs() if name != "theory"}
    index = pages["index.html"]
    for claim in registry.CLAIMS:
        assert f'id="{claim.id}"' in index
    assert set(built["first"].verdicts) == {claim.id for claim in registry.CLAIMS}
    for status in ("confirmed", "not yet measured"):
        assert f"badge-{status.replace(' ', '-')}" in index


def test_every_claim_gets_a_measured_outcome_from_the_tiny_configs(built):
    """Simulation and theory claims from the tiny studies (real-ViT claims: tests/test_experiments.py)."""
    for claim in registry.CLAIMS:
        if any(name.startswith(registry.VIT_PREFIX) for name in claim.measured_by):
            continue
        verdict = built["first"].verdicts[claim.id]
        assert verdict.status != "not yet measured", (claim.id, verdict)
        for finding in verdict.findings:
            assert finding.decision.outcome != "not yet measured", (claim.id, finding.text())


def test_regeneration_from_the_cache_is_byte_identical(built):
    first, second = built["base"] / "a", built["base"] / "b"
    assert built["second"].computed == ()
    names = sorted(path.name for path in first.iterdir())
    assert names == sorted(path.name for path in second.iterdir())
    for name in names:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name


def test_pages_make_no_network_reference(built):
    for name, text in read_pages(built["base"] / "a").items():
        assert "http://" not in text and "https://" not in text, name
        assert not re.search(r"""(src|href)\s*=\s*["']?\s*//""", text), name
        assert not re.search(r"url\(\s*['\"]?(?!data:|#)", text), name  # url(#id): an in-page clip path
        for target in re.findall(r"""(?:src|href)\s*=\s*["']([^"']*)["']""", text):
            assert target.startswith("data:") or re.fullmatch(
                r"[\w.-]*\.html(#[\w.-]+)?|#[\w.-]+|data/[\w.-]+\.csv\.gz", target
            ), (name, target[:80])


def _downloads(text: str) -> dict[str, bytes]:
    """Every embedded CSV of a page: plain data: links and gzip-compressed script elements."""
    found = re.findall(r'<a download="([^"]+)" href="data:text/csv;base64,([^"]*)"', text)
    downloads = {name: base64.b64decode(payload) for name, payload in found}
    for name, element in re.findall(r'<a download="([^"]+)" href="#[^"]*" data-gzip-csv="([^"]+)"', text):
        payload = re.search(rf'<script type="text/plain" id="{re.escape(element)}">([^<]*)</script>', text).group(1)
        downloads[name] = gzip.decompress(base64.b64decode(payload))
    return downloads


def test_large_csvs_are_embedded_gzip_compressed_and_deterministic(monkeypatch):
    from reports import html as report_html

    frame = pd.DataFrame({"x": range(500), "y": [0.5] * 500})
    small = report_html.csv_download(frame, "a b.csv", "t")
    assert small["uri"].startswith("data:text/csv;base64,") and not small["gzip"]
    monkeypatch.setattr(report_html, "MAX_EMBEDDED_CSV_BYTES", 100)
    large = report_html.csv_download(frame, "a b.csv", "t")
    assert not large["uri"] and large["element_id"] == "csv-a-b-csv"
    assert gzip.decompress(base64.b64decode(large["gzip"])) == report_html.csv_bytes(frame)
    assert report_html.csv_download(frame, "a b.csv", "t") == large  # mtime=0: the same bytes every build
    page = report_html.render("macros.html.j2")  # the macro file renders on its own
    assert page.strip() == ""


def test_data_beyond_the_page_budget_goes_to_a_file_with_an_embedded_sample():
    """A page keeps its embedded data within budget: the rest is a gzip file next to it, plus whole units."""
    from reports import html as report_html

    rng = np.random.default_rng(0)
    frame = pd.DataFrame({"problem": np.repeat(np.arange(400), 50), "step": np.tile(np.arange(50), 400),
                          "value": rng.normal(size=20_000)})
    downloads = report_html.Downloads(budget=60_000)
    entry = downloads.add(frame, "toy-results.csv", "every row")
    assert not entry["uri"] and not entry["gzip"] and entry["file"] == "data/toy-results.csv.gz"
    assert gzip.decompress(downloads.files["data/toy-results.csv.gz"]) == report_html.csv_bytes(frame)
    sample = entry["sample"]
    assert sample is not None and sample["rows"] % 50 == 0 and 0 < sample["rows"] < len(frame)  # whole problems
    assert downloads.left >= 0
    markup = report_html.render("macros.html.j2")
    assert markup.strip() == ""


def test_a_page_over_three_megabytes_is_an_error():
    from reports import html as report_html

    report_html.check_page_size("ok.html", "x" * 1000)
    with pytest.raises(report_html.PageTooLarge, match="big.html"):
        report_html.check_page_size("big.html", "x" * (report_html.MAX_PAGE_BYTES + 1))


def test_every_page_is_at_most_three_megabytes(built):
    for path in (built["base"] / "a").glob("*.html"):
        assert path.stat().st_size <= 3_000_000, path.name


def test_pages_start_with_question_method_and_answer(built):
    for name, text in read_pages(built["base"] / "a").items():
        plain = html.unescape(text)
        assert "Question." in plain and "Method." in plain and "Answer." in plain, name
        assert plain.index("Question.") < plain.index("<h2"), name  # first, before any section
    index = read_pages(built["base"] / "a")["index.html"]
    assert 'id="forest"' in index and "smallest effect that matters" in index


def test_csv_data_is_embedded_and_parses_back(built):
    page = (built["base"] / "a" / "gradient_damping.html").read_text(encoding="utf-8")
    downloads = _downloads(page)
    assert "gradient_damping-results.csv" in downloads
    embedded = pd.read_csv(io.BytesIO(downloads["gradient_damping-results.csv"]))
    folder = cache_folder(built["base"] / "cache", study("gradient_damping"), tiny_configs()["gradient_damping"])
    cached = pd.read_csv(folder / "results.csv")
    pd.testing.assert_frame_equal(embedded, cached, check_exact=False, rtol=1e-10)
    figure_data = [name for name in downloads if name != "gradient_damping-results.csv"]
    assert figure_data, "every figure carries its data"
    for name in figure_data:
        assert len(pd.read_csv(io.BytesIO(downloads[name]))) > 0


def test_study_pages_embed_figures_tables_and_provenance(built):
    for name in ("coefficients", "gradient_damping", "toy_optimisation", "train_test_mismatch"):
        text = (built["base"] / "a" / f"{name}.html").read_text(encoding="utf-8")
        assert "<svg" in text and "<table" in text, name
        plain = html.unescape(text)
        assert "git_commit" in plain and '"seed": 0' in plain and '"versions"' in plain, name
    assert "data:image/png;base64," in (built["base"] / "a" / "coefficients.html").read_text(encoding="utf-8")


def test_every_study_page_renders_its_equations_as_mathml(built):
    from reports.equations import page_equations

    for name in tiny_configs(with_theory=False):
        text = (built["base"] / "a" / f"{name}.html").read_text(encoding="utf-8")
        expected = page_equations(name)
        assert expected, name
        assert text.count('<math display="block">') == len(expected), name
        assert "<msub>" in text or "<msubsup>" in text, name
    coefficients = (built["base"] / "a" / "coefficients.html").read_text(encoding="utf-8")
    assert '<a href="theory.html#smoothing-gap">' in coefficients  # a claim's derivation is linked


def test_theory_page_renders_mathml(built):
    text = (built["base"] / "a" / "theory.html").read_text(encoding="utf-8")
    assert text.count('<math display="block">') >= len(CHECKS)
    assert "<mfrac>" in text and "<msubsup>" in text  # the fraction and the integral's limits
    for key, _ in CHECKS:
        assert f'id="{key}"' in text


def test_no_temporary_files_are_left(built):
    leftovers = [path for path in built["base"].rglob("*") if path.name.endswith(".tmp")]
    assert leftovers == []


# --- cache: resume without recomputing -------------------------------------------------------------------


def test_second_build_uses_the_cache_and_never_reruns(built, monkeypatch, tmp_path):
    def refuse(*args, **kwargs):
        raise AssertionError("a cached study was recomputed")

    monkeypatch.setattr(Study, "compute", refuse)  # every simulation
    monkeypatch.setattr("theory.derivations.verify_all", refuse)
    report = build_report(tmp_path, configs=tiny_configs(), cache_dir=built["base"] / "cache", results_dir=tmp_path)
    assert report.computed == ()
    assert (tmp_path / "index.html").read_bytes() == (built["base"] / "a" / "index.html").read_bytes()


def test_interrupted_build_resumes_with_the_unfinished_study_only(tmp_path, monkeypatch):
    configs = tiny_configs(with_theory=False)
    cache = tmp_path / "cache"

    compute = Study.compute

    def crash(self, *args, **kwargs):
        if self.name == "train_test_mismatch":  # the last study, in name order
            raise RuntimeError("interrupted")
        return compute(self, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(Study, "compute", crash)
        with pytest.raises(RuntimeError, match="interrupted"):
            build_report(tmp_path / "out", configs=configs, cache_dir=cache, results_dir=tmp_path)
    assert not (tmp_path / "out" / "index.html").exists()
    report = build_report(tmp_path / "out", configs=configs, cache_dir=cache, results_dir=tmp_path)
    assert report.computed == ("train_test_mismatch",)


def test_a_folder_without_its_completion_marker_is_recomputed(tmp_path, monkeypatch):
    configs = {"gradient_damping": tiny_configs()["gradient_damping"]}
    cache = tmp_path / "cache"

    def fail_on_marker(path, payload):
        if Path(path).name == storage.MARKER:
            raise OSError("disk full")
        return original(path, payload)

    original = storage.write_json_atomic
    with monkeypatch.context() as patch:
        patch.setattr(storage, "write_json_atomic", fail_on_marker)
        with pytest.raises(OSError):
            build_report(tmp_path / "out", configs=configs, cache_dir=cache, results_dir=tmp_path)
    folder = cache_folder(cache, study("gradient_damping"), configs["gradient_damping"])
    assert (folder / "results.csv").is_file() and (folder / storage.PROVENANCE).is_file()
    assert not (folder / storage.MARKER).exists()
    report = build_report(tmp_path / "out", configs=configs, cache_dir=cache, results_dir=tmp_path)
    assert report.computed == ("gradient_damping",)
    assert json.loads((folder / storage.PROVENANCE).read_text())["seed"] == 0
    assert set(json.loads((folder / storage.MARKER).read_text())["files"]) == {
        "results.csv", "summary.json", "config.json", storage.PROVENANCE}


def test_cache_key_changes_with_the_config(tmp_path):
    config = tiny_configs()["coefficients"]
    other = CoefficientsConfig(ns=(4, 8), drop_ratios=(0.1, 0.5), num_samples=201, num_repeats=3)
    spec = study("coefficients")
    assert cache_folder(tmp_path, spec, config) == cache_folder(tmp_path, spec, config)
    assert cache_folder(tmp_path, spec, config) != cache_folder(tmp_path, spec, other)


def _write_package(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text, encoding="utf-8")


def test_cache_key_follows_the_code_the_study_imports(tmp_path, monkeypatch):
    """Editing a module the study imports (directly, in a function, or through another) changes the key;
    editing a module of the same package it does not import leaves it."""
    _write_package(tmp_path, {
        "labpkg/__init__.py": "",
        "labpkg/study.py": "from labpkg import helper\n\ndef run(config, progress=False):\n"
                           "    from labpkg.lazy import value\n    return helper.twice(value)\n",
        "labpkg/helper.py": "from labpkg.deep import one\n\ndef twice(x):\n    return 2 * x * one\n",
        "labpkg/deep.py": "one = 1\n",
        "labpkg/lazy.py": "value = 3\n",
        "labpkg/other.py": "unrelated = 0\n",
    })
    monkeypatch.syspath_prepend(str(tmp_path))
    import labpkg.study

    spec = Study("labstudy", "t", dict, labpkg.study.run, dict, "q", "m")
    version = functools.partial(code_version, spec, root=tmp_path, packages=("labpkg",))
    assert sorted(code_modules(spec, root=tmp_path, packages=("labpkg",))) == [
        "labpkg", "labpkg.deep", "labpkg.helper", "labpkg.lazy", "labpkg.study"]
    before = version()
    (tmp_path / "labpkg" / "other.py").write_text("unrelated = 1\n", encoding="utf-8")
    assert version() == before
    for name in ("deep.py", "lazy.py", "study.py"):
        path = tmp_path / "labpkg" / name
        path.write_text(path.read_text(encoding="utf-8") + "# edited\n", encoding="utf-8")
        assert version() != before, name
        before = version()


def test_each_study_is_keyed_on_its_own_dependencies():
    toy = code_modules(study("toy_regimes"))
    assert {"simulations.toy_regimes", "simulations.toy_exact", "simulations.toy_optimisation",
            "simulations.common", "theory.smoothing"} <= set(toy)
    assert "simulations.coefficients" not in toy and not any(name.startswith("simulations.pages") for name in toy)
    assert "dropkey.masks" in code_modules(study("structured_masks"))
    assert "dropkey.masks" not in code_modules(study("coefficients"))
    assert {"theory.derivations", "reports.html"} <= set(code_modules(study("theory")))


def test_a_registered_example_study_gets_a_report_page(tmp_path, capsys):
    """Adding a study is one file (tests/study_example.py, the worked example of docs/extending.md) plus a test."""
    import study_example

    simulations_registry.register(study_example.STUDY)
    try:
        assert "all_dropped" in study_names()
        configs = {"all_dropped": study_example.AllDroppedConfig(num_samples=4000)}
        report = build_report(tmp_path / "out", configs=configs, cache_dir=tmp_path / "cache", results_dir=tmp_path)
        code = main(["simulate", "all_dropped", "--out", str(tmp_path / "sim")])
    finally:
        simulations_registry.unregister("all_dropped")
    assert "all_dropped" not in study_names()
    assert report.computed == ("all_dropped",) and code == 0
    page = html.unescape((tmp_path / "out" / "all_dropped.html").read_text(encoding="utf-8"))
    assert study_example.STUDY.title in page and study_example.QUESTION in page and study_example.METHOD in page
    assert "<svg" in page and page.count('<math display="block">') == 1
    assert "all_dropped.html" in (tmp_path / "out" / "index.html").read_text(encoding="utf-8")
    summary = json.loads((tmp_path / "sim" / "summary.json").read_text())
    assert summary["cells"] == 6 and summary["max_abs_z"] < 5  # r^N within 5 standard errors (fixed seed)
    assert "max |z| over 6 cells" in capsys.readouterr().out


def test_pages_are_written_atomically(tmp_path, monkeypatch, built):
    """A failure while writing a page leaves the previous page intact."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "index.html").write_text("previous", encoding="utf-8")

    def broken_replace(source, target):
        raise OSError("crash during rename")

    monkeypatch.setattr("dropkey.storage.os.replace", broken_replace)
    with pytest.raises(OSError):
        build_report(out, configs=tiny_configs(), cache_dir=built["base"] / "cache", results_dir=tmp_path)
    assert (out / "index.html").read_text(encoding="utf-8") == "previous"
    assert not [path for path in out.iterdir() if path.name.endswith(".tmp")]


# --- command line ---------------------------------------------------------------------------------------


def test_report_command_defaults_and_options():
    parser = build_parser()
    args = parser.parse_args(["report"])
    assert (args.size, args.seed, args.only, str(args.out)) == ("quick", 0, None, "report")
    assert parser.parse_args(["report", "--full", "--seed", "3"]).size == "full"
    assert parser.parse_args(["report", "--only", "toy_optimisation"]).only == "toy_optimisation"
    with pytest.raises(SystemExit):
        parser.parse_args(["report", "--quick", "--full"])
    with pytest.raises(SystemExit):
        parser.parse_args(["report", "--only", "no_such_study"])


def test_report_command_builds_one_study(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(
        "reports.build.default_configs",
        lambda size, seed, only: {"gradient_damping": tiny_configs()["gradient_damping"]},
    )
    code = main(
        ["report", "--only", "gradient_damping", "--out", str(tmp_path / "out"), "--cache", str(tmp_path / "c")]
    )
    output = capsys.readouterr().out
    assert code == 0
    assert (tmp_path / "out" / "gradient_damping.html").is_file() and (tmp_path / "out" / "index.html").is_file()
    assert "gradient-damping" in output and "not yet measured" in output


def test_committed_results_doc_is_generated_from_the_committed_results():
    """docs/results.md holds no hand-typed number: `dropkey-lab results-table` regenerates it from results/."""
    assert (ROOT / "docs" / "results.md").read_text(encoding="utf-8") == results_markdown(ROOT / "results")


def test_results_table_command_follows_the_result_folders(tmp_path, capsys):
    results = tmp_path / "results"
    shutil.copytree(ROOT / "results" / "medium" / "schedules", results / "medium" / "schedules")
    assert main(["results-table", "--results-dir", str(results), "--out", str(tmp_path / "a.md")]) == 0
    assert "results table:" in capsys.readouterr().out
    before = (tmp_path / "a.md").read_text(encoding="utf-8")
    assert "| vit-schedule | contradicted |" in before and "| vit-accuracy | not yet measured |" in before
    per_seed = results / "medium" / "schedules" / "per_seed.csv"
    frame = pd.read_csv(per_seed, dtype={"group": str}, keep_default_na=False)
    frame.loc[frame["quantity"] == "top1_decreasing_minus_constant", "value"] = [2.0, 2.2, 2.4]
    frame.to_csv(per_seed, index=False)
    # a changed file its marker does not record is refused (issue 15), a rewritten, re-marked folder is read
    assert main(["results-table", "--results-dir", str(results), "--out", str(tmp_path / "b.md")]) == 1
    assert str(per_seed) in capsys.readouterr().err
    storage.mark_complete(per_seed.parent, record=storage.read_marker(per_seed.parent).get("record"))
    assert main(["results-table", "--results-dir", str(results), "--out", str(tmp_path / "b.md")]) == 0
    after = (tmp_path / "b.md").read_text(encoding="utf-8")
    assert "| vit-schedule | confirmed |" in after and "+2.2 [95% CI" in after


def test_fmt_handles_missing_numbers():
    assert registry.fmt(None) == "n/a" and registry.fmt(math.nan) == "n/a" and registry.fmt(0.12345) == "0.123"
