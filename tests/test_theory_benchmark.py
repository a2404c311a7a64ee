"""benchmarks/bench_expected_attention.py runs end to end, and its baselines compute what the new method does.

Timings are measured only by the benchmark itself, never asserted here.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from theory import smoothing_coefficients
from theory.rows import softmax_gaussian_rows

ROOT = Path(__file__).resolve().parents[1]
_SPEC = importlib.util.spec_from_file_location(
    "bench_expected_attention", ROOT / "benchmarks" / "bench_expected_attention.py"
)
bench = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(bench)


def test_previous_and_plain_implementations_agree_with_the_new_one():
    rows = softmax_gaussian_rows(np.random.default_rng(0), 5, 40)
    new = smoothing_coefficients(rows, 0.3, all_dropped="zero")
    np.testing.assert_allclose(bench.previous_coefficients(rows, 0.3), new, rtol=1e-12)
    np.testing.assert_allclose(bench.plain_coefficients(rows, 0.3), new, rtol=1e-10)


def test_quick_run_prints_the_table(capsys):
    assert bench.main(["--quick", "--no-save", "--sizes", "12"]) == 0
    out = capsys.readouterr().out
    assert "| 12 |" in out and "mpmath" in out
