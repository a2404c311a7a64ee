"""benchmarks/bench_cpu_alternatives.py: its inline hash is the project's hash mask, and it runs end to end."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from dropkey.kernels import hash_mask

ROOT = Path(__file__).resolve().parents[1]
_SPEC = importlib.util.spec_from_file_location(
    "bench_cpu_alternatives", ROOT / "benchmarks" / "bench_cpu_alternatives.py"
)
bench = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(bench)


def test_wrapping_fmix32_equals_the_spec():
    words = torch.randint(0, 1 << 32, (100_000,), dtype=torch.int64, generator=torch.Generator().manual_seed(0))
    words[:4] = torch.tensor([0, 1, (1 << 32) - 1, 1 << 31])
    assert torch.equal(bench._fmix32_wrapping(words), hash_mask._fmix32(words))


@pytest.mark.parametrize("shape", [(2, 3, 7, 8), (1, 1, 65, 16)])
def test_inline_hash_drops_what_hash_drop_mask_drops(shape):
    bench.check_hash_mask(shape)  # raises on any difference


def test_inline_hash_check_can_fail(monkeypatch):
    wrapping = bench._fmix32_wrapping
    monkeypatch.setattr(bench, "_fmix32_wrapping", lambda h: wrapping(h) ^ (1 << 31))  # the top bit flipped
    with pytest.raises(AssertionError, match="differs"):
        bench.check_hash_mask((2, 3, 7, 8))


@pytest.mark.parametrize(
    "bad", [["--repeats", "0"], ["--shapes", "2x3x4"], ["--shapes", "2xax4x5"], ["--shapes", "0x1x4x4"]]
)
def test_bad_arguments_are_refused(bad, capsys):
    with pytest.raises(SystemExit):
        bench.main(bad)
    assert "--" in capsys.readouterr().err


@pytest.mark.slow
# the deprecation warning comes from torch.compile internals
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_runs_end_to_end(tmp_path):
    assert bench.main(["--repeats", "1", "--shapes", "2x2x9x8", "--output", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "cpu_alternatives.json").read_text())
    (case,) = data["cases"]
    assert case["shape"] == [2, 2, 9, 8] and set(case["step_median_ms"]) == set(bench.METHODS)
    assert "fastest DropKey path" in (tmp_path / "cpu_alternatives.md").read_text()
