"""The report builder: claims registry, verdict rules, cached studies, and self-contained, reproducible pages.

The report is built with tiny study configs and a stand-in for the (slow)
symbolic derivations, so the whole file runs in seconds.
"""

from __future__ import annotations

import ast
import base64
import gzip
import html
import io
import json
import math
import re
from pathlib import Path

import pandas as pd
import pytest
import sympy as sp

from dropkey.cli import build_parser, main
from dropkey.experiments import EXPERIMENT_NAMES
from reports import claims as registry
from reports.build import build_report
from reports.studies import COMPLETE_MARKER, STUDY_NAMES, cache_folder, study
from simulations.coefficients import CoefficientsConfig
from simulations.gradient_damping import GradientDampingConfig
from simulations.structured_masks import StructuredMasksConfig
from simulations.toy_optimisation import ToyOptimisationConfig
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
    "mc-inference-alignment",
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
        second = build_report(base / "b", configs=tiny_configs(), cache_dir=base / "cache", results_dir=base / "results")
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


def _defined_tests(path: Path) -> set[str]:
    """Node-id suffixes ('test_x', 'TestY::test_z') defined in a test file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = set()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            names.add(node.name)
        elif isinstance(node, ast.ClassDef):
            names.update(f"{node.name}::{item.name}" for item in node.body if isinstance(item, ast.FunctionDef))
    return names


def test_every_referenced_test_node_exists():
    missing = []
    for claim in registry.CLAIMS:
        for node in claim.tests:
            file, _, name = node.partition("::")
            path = ROOT / file
            if not path.is_file() or name not in _defined_tests(path):
                missing.append(f"{claim.id}: {node}")
    assert not missing, missing


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


# --- verdict rules on synthetic numbers -------------------------------------------------------------

PROVED = {"a": "proved"}
M = registry.Measurement

RULE_CASES = [
    (registry.rule_eq3, {"derivations": PROVED, "coverage": 0.95, "nominal": 0.95, "coverage_se": 0.01}, "confirmed"),
    (registry.rule_eq3, {"derivations": PROVED, "coverage": 0.80, "nominal": 0.95, "coverage_se": 0.01}, "partly"),
    (registry.rule_eq3, {"derivations": {"a": "refuted"}}, "not reproduced"),
    (registry.rule_eq3, {"derivations": {"a": "failed"}}, "not yet measured"),
    (registry.rule_eq4, {"derivations": PROVED, "c_order_violations": 0, "pairs": 9}, "confirmed"),
    (registry.rule_eq4, {"derivations": PROVED, "c_order_violations": 2, "pairs": 9}, "not reproduced"),
    (registry.rule_eq4, {"derivations": {"a": "missing"}}, "not yet measured"),
    (registry.rule_order, {"derivations": PROVED, "w_order_violations": 0, "max_violations": 0, "entropy_violations": 0, "rows": 3}, "confirmed"),
    (registry.rule_order, {"derivations": PROVED, "w_order_violations": 0, "max_violations": 1, "entropy_violations": 0, "rows": 3}, "not reproduced"),
    (registry.rule_dropout, {"derivations": PROVED}, "confirmed"),
    (registry.rule_dropout, {"derivations": {"a": "refuted"}}, "not reproduced"),
    (registry.rule_dropkey_vs_dropout, {"dropout_minus_dropkey": {"r=0.1": (0.2, 0.01), "r=0.5": (0.3, 0.01)}}, "confirmed"),
    (registry.rule_dropkey_vs_dropout, {"dropout_minus_dropkey": {"r=0.1": (-0.2, 0.01), "r=0.5": (-0.3, 0.01)}}, "not reproduced"),
    (registry.rule_dropkey_vs_dropout, {"dropout_minus_dropkey": {"r=0.1": (0.2, 0.01), "r=0.5": (-0.3, 0.01)}}, "partly"),
    (registry.rule_dropkey_vs_dropout, {}, "not yet measured"),
    (registry.rule_peak_shrinkage, {"dropkey_minus_none": {"r=0.1": (-0.2, 0.01)}}, "confirmed"),
    (registry.rule_peak_shrinkage, {"dropkey_minus_none": {"r=0.1": (-0.2, 0.01), "r=0.5": (0.0, 0.01)}}, "partly"),
    (registry.rule_peak_shrinkage, {"dropkey_minus_none": {"r=0.1": (0.2, 0.01)}}, "not reproduced"),
    (registry.rule_chain, {"derivations": PROVED, "links_far": {"x": 0.9}, "chain_all_links": 0.8}, "confirmed"),
    (registry.rule_chain, {"derivations": PROVED, "links_far": {"x": 0.4}, "chain_all_links": 0.3}, "partly"),
    (registry.rule_chain, {"derivations": {"a": "refuted"}}, "not reproduced"),
    (registry.rule_damping, {"derivations": PROVED, "min_fraction_damped_far": 0.97, "max_first_order_error_far": 0.03, "fraction_anti_damped_5se": 0.0}, "confirmed"),
    (registry.rule_damping, {"derivations": PROVED, "min_fraction_damped_far": 0.97, "max_first_order_error_far": 0.12, "fraction_anti_damped_5se": 0.0}, "partly"),
    (registry.rule_damping, {"derivations": PROVED, "min_fraction_damped_far": 0.2, "max_first_order_error_far": 0.03, "fraction_anti_damped_5se": 0.0}, "not reproduced"),
    (registry.rule_damping, {"derivations": PROVED}, "not yet measured"),
    (registry.rule_alignment, {"pooled_slope": -0.5, "pooled_slope_se": 0.01, "cells": 10, "cells_not_closed": []}, "confirmed"),
    (registry.rule_alignment, {"pooled_slope": -0.5, "pooled_slope_se": 0.01, "cells": 10, "cells_not_closed": ["a", "b"]}, "partly"),
    (registry.rule_alignment, {"pooled_slope": -0.3, "pooled_slope_se": 0.01, "cells": 10, "cells_not_closed": []}, "not reproduced"),
    (registry.rule_alignment, {}, "not yet measured"),
    (registry.rule_collapse, {"top_blocks_similarity_plain": M(0.95)}, "confirmed"),
    (registry.rule_collapse, {"top_blocks_similarity_plain": M(0.8)}, "partly"),
    (registry.rule_collapse, {"top_blocks_similarity_plain": M(0.3)}, "not reproduced"),
    (registry.rule_collapse, {"top_blocks_similarity_plain": None}, "not yet measured"),
]


@pytest.mark.parametrize(("rule", "numbers", "expected"), RULE_CASES)
def test_rule_gives_the_stated_status(rule, numbers, expected):
    verdict = rule(numbers)
    assert verdict.status == expected, verdict
    assert verdict.reason


def test_rules_together_give_every_status():
    assert {expected for _, _, expected in RULE_CASES} == set(registry.STATUSES)


@pytest.mark.parametrize(
    ("claim_id", "rows", "expected"),
    [
        ("vit-schedule", [("top1_decreasing_minus_constant", 0.8, 0.2)], "confirmed"),
        ("vit-schedule", [("top1_decreasing_minus_constant", 0.1, 0.2)], "not reproduced"),
        ("vit-structured", [("top1_block_minus_dropkey", 0.0, 0.2), ("top1_cross_minus_dropkey", 0.9, 0.2)], "partly"),
        ("vit-structured", [("top1_block_minus_dropkey", -0.1, 0.2), ("top1_cross_minus_dropkey", 0.1, 0.2)], "confirmed"),
        ("vit-structured", [("top1_block_minus_dropkey", 0.9, 0.2), ("top1_cross_minus_dropkey", 0.9, 0.2)], "not reproduced"),
        ("vit-attention-peaks", [("peak_dropkey_minus_none", -0.05, 0.01), ("entropy_dropkey_minus_none", 0.1, 0.02)], "confirmed"),
        ("vit-attention-peaks", [("peak_dropkey_minus_none", -0.05, 0.01), ("entropy_dropkey_minus_none", -0.1, 0.02)], "partly"),
        ("vit-attention-peaks", [("peak_dropkey_minus_none", 0.05, 0.01), ("entropy_dropkey_minus_none", -0.1, 0.02)], "not reproduced"),
        ("dropkey-collapse", [("similarity_dropkey_minus_plain", -0.01, 0.01), ("similarity_softmax_both_minus_reattention", -0.5, 0.05)], "partly"),
        ("deepvit-collapse", [("top_blocks_similarity_plain", 0.97, float("nan"))], "confirmed"),
        ("deepvit-collapse", [("top_blocks_similarity_plain", 0.5, 0.01)], "not reproduced"),
        ("vit-accuracy", [], "not yet measured"),
        ("vit-accuracy", [("top1_dropkey_minus_none", 2.0, 0.5)], "not yet measured"),  # one of two quantities
    ],
)
def test_real_vit_claims_read_the_results_file(tmp_path, claim_id, rows, expected):
    frame = pd.DataFrame(
        [{"claim_id": claim_id, "quantity": q, "value": v, "standard_error": se, "n": 3, "scale": "medium",
          "experiment": "x"} for q, v, se in rows],
        columns=["claim_id", "quantity", "value", "standard_error", "n", "scale", "experiment"],
    )
    folder = tmp_path / "medium" / "x"
    folder.mkdir(parents=True)
    frame.to_csv(folder / "measurements.csv", index=False)
    (folder / "provenance.json").write_text("{}")
    evidence = registry.Evidence(vit=registry.load_vit_measurements(tmp_path))
    verdict = registry.assess(registry.claim(claim_id), evidence)
    assert verdict.status == expected
    if rows and expected != "not yet measured":
        assert verdict.key_number.startswith("[medium scale, n = 3 seeds]")


def _write_measurement(root: Path, scale: str, value: float, complete: bool = True) -> None:
    folder = root / scale / "schedules"
    folder.mkdir(parents=True)
    pd.DataFrame([{"claim_id": "vit-schedule", "quantity": "top1_decreasing_minus_constant", "value": value,
                   "standard_error": 0.1, "n": 3, "scale": scale, "experiment": "schedules"}]).to_csv(
        folder / "measurements.csv", index=False)
    if complete:
        (folder / "provenance.json").write_text("{}")


def test_real_vit_claims_are_judged_at_the_largest_complete_scale(tmp_path):
    _write_measurement(tmp_path, "quick", -5.0)
    _write_measurement(tmp_path, "medium", 5.0)
    _write_measurement(tmp_path, "full", -5.0, complete=False)  # incomplete folders are ignored
    found = registry.load_vit_measurements(tmp_path)
    assert found["vit-schedule"]["top1_decreasing_minus_constant"].scale == "medium"
    assert registry.assess(registry.claim("vit-schedule"), registry.Evidence(vit=found)).status == "confirmed"


def test_absent_results_mean_not_yet_measured(tmp_path):
    assert registry.load_vit_measurements(tmp_path) == {}
    for claim in registry.CLAIMS:
        if any(name.startswith(registry.VIT_PREFIX) for name in claim.measured_by):
            assert registry.assess(claim, registry.Evidence()).status == "not yet measured"


def test_summary_without_the_expected_keys_is_not_yet_measured():
    evidence = registry.Evidence(summaries={"train_test_mismatch": {"renamed": 1}})
    verdict = registry.assess(registry.claim("mc-inference-alignment"), evidence)
    assert verdict.status == "not yet measured"


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
            assert target.startswith("data:") or re.fullmatch(r"[\w.-]*\.html(#[\w.-]+)?|#[\w.-]+", target), (name, target[:80])


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
    monkeypatch.setattr(report_html, "MAX_EMBEDDED_GZIP_BYTES", 10)
    assert "too large to embed" in report_html.csv_download(frame, "a.csv", "t")["note"]


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

    for module in ("coefficients", "gradient_damping", "toy_optimisation", "train_test_mismatch"):
        monkeypatch.setattr(f"simulations.{module}.run", refuse)
    monkeypatch.setattr("theory.derivations.verify_all", refuse)
    report = build_report(tmp_path, configs=tiny_configs(), cache_dir=built["base"] / "cache", results_dir=tmp_path)
    assert report.computed == ()
    assert (tmp_path / "index.html").read_bytes() == (built["base"] / "a" / "index.html").read_bytes()


def test_interrupted_build_resumes_with_the_unfinished_study_only(tmp_path, monkeypatch):
    configs = tiny_configs(with_theory=False)
    cache = tmp_path / "cache"

    def crash(*args, **kwargs):
        raise RuntimeError("interrupted")

    with monkeypatch.context() as patch:
        patch.setattr("simulations.train_test_mismatch.run", crash)  # the last study, in name order
        with pytest.raises(RuntimeError, match="interrupted"):
            build_report(tmp_path / "out", configs=configs, cache_dir=cache, results_dir=tmp_path)
    assert not (tmp_path / "out" / "index.html").exists()
    report = build_report(tmp_path / "out", configs=configs, cache_dir=cache, results_dir=tmp_path)
    assert report.computed == ("train_test_mismatch",)


def test_a_folder_without_its_completion_marker_is_recomputed(tmp_path, monkeypatch):
    configs = {"gradient_damping": tiny_configs()["gradient_damping"]}
    cache = tmp_path / "cache"

    def fail_on_marker(path, payload):
        if Path(path).name == COMPLETE_MARKER:
            raise OSError("disk full")
        return original(path, payload)

    import reports.studies

    original = reports.studies.write_json_atomic
    with monkeypatch.context() as patch:
        patch.setattr(reports.studies, "write_json_atomic", fail_on_marker)
        with pytest.raises(OSError):
            build_report(tmp_path / "out", configs=configs, cache_dir=cache, results_dir=tmp_path)
    folder = cache_folder(cache, study("gradient_damping"), configs["gradient_damping"])
    assert (folder / "results.csv").is_file() and not (folder / COMPLETE_MARKER).exists()
    report = build_report(tmp_path / "out", configs=configs, cache_dir=cache, results_dir=tmp_path)
    assert report.computed == ("gradient_damping",)
    assert json.loads((folder / COMPLETE_MARKER).read_text())["seed"] == 0


def test_cache_key_changes_with_the_config(tmp_path):
    config = tiny_configs()["coefficients"]
    other = CoefficientsConfig(ns=(4, 8), drop_ratios=(0.1, 0.5), num_samples=201, num_repeats=3)
    spec = study("coefficients")
    assert cache_folder(tmp_path, spec, config) == cache_folder(tmp_path, spec, config)
    assert cache_folder(tmp_path, spec, config) != cache_folder(tmp_path, spec, other)


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
        "reports.build.default_configs", lambda size, seed, only: {"gradient_damping": tiny_configs()["gradient_damping"]}
    )
    code = main(["report", "--only", "gradient_damping", "--out", str(tmp_path / "out"), "--cache", str(tmp_path / "c")])
    output = capsys.readouterr().out
    assert code == 0
    assert (tmp_path / "out" / "gradient_damping.html").is_file() and (tmp_path / "out" / "index.html").is_file()
    assert "gradient-damping" in output and "not yet measured" in output


def test_fmt_handles_missing_numbers():
    assert registry.fmt(None) == "n/a" and registry.fmt(math.nan) == "n/a" and registry.fmt(0.12345) == "0.123"
