"""The CPU-checkable parts of benchmarks/bench_gpu.py: arguments, floors, saved-state probe, targets, table.

The timing itself needs CUDA (``gpu`` test at the end: a quick run on one shape).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from dropkey import functional as fn

ROOT = Path(__file__).resolve().parents[1]
_SPEC = importlib.util.spec_from_file_location("bench_gpu", ROOT / "benchmarks" / "bench_gpu.py")
bench = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(bench)


def test_arguments_and_defaults():
    args = bench.parse_args([])
    assert args.seq_lens == (65, 197, 577, 1024) and args.variants == bench.VARIANTS
    assert (args.repeats, args.warmup, args.ratio, args.tokens, args.heads) == (20, 3, 0.1, 65536, 12)
    quick = bench.parse_args(["--quick", "--seq-lens", "197,577", "--variants", "paper,sdpa_nomask,triton"])
    assert quick.repeats == 5 and quick.tokens == 16384 and quick.seq_lens == (197, 577)
    assert quick.variants == ("sdpa_nomask", "triton", "paper")  # canonical order
    for bad in (["--seq-lens", "1,x"], ["--seq-lens", "0"], ["--ratio", "1.0"], ["--ratio", "0"], ["--repeats", "0"],
                ["--variants", "triton"], ["--variants", "sdpa_nomask,flash3"]):
        with pytest.raises(SystemExit):
            bench.parse_args(bad)


def test_batch_floor_and_bandwidth():
    assert [bench.batch_for(n, 65536) for n in (65, 197, 577, 1024)] == [1008, 332, 113, 64]
    assert bench.batch_for(10**6, 100) == 1
    floor = bench.floor_seconds((2, 3, 100, 64), 2, 1000.0)  # 12 * 38400 elements * 2 bytes / 1e12 B/s
    assert floor["step"] == pytest.approx(12 * 2 * 3 * 100 * 64 * 2 / 1e12)
    assert floor["forward"] == pytest.approx(floor["step"] / 3)
    assert bench.nominal_bandwidth("NVIDIA H200") == 4800.0
    assert bench.nominal_bandwidth("NVIDIA H100 80GB HBM3") == 3350.0
    assert bench.nominal_bandwidth("Some GPU") is None


def test_saved_state_probe_tells_n_by_n_state_from_per_row_state():
    """The reference saves N x N weights; the fused CPU backend a bit-packed mask (1 bit/logit); SDPA without mask none."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 40, 16, generator=g).requires_grad_(True) for _ in range(3))
    logits, rows = 2 * 3 * 40 * 40, ((40, 16),)

    def probe(call):
        return bench.saved_state(call, (q, k, v), logits, rows)

    reference = probe(lambda: fn.dropkey_attention(q, k, v, 0.1, generator=0, backend="reference"))
    assert reference["nn_state_bytes"] >= logits * 4
    fused = probe(lambda: fn.dropkey_attention(q, k, v, 0.1, generator=0, backend="fused"))
    assert fused["nn_state_bytes"] == logits // 8
    plain = probe(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v))
    assert plain["nn_state_bytes"] == 0


def _fake_cases():
    def row(fwd, step, state=0):
        out = bench.summarise({"forward": [fwd, fwd + 0.5, fwd], "step": [step + 1.0, step, step - 0.1]})
        return {"check": "ok (1.0e-03)", "nn_state_bytes": state, "other_saved_bytes": 100, "step_peak_mib": 1.5, **out}

    cases = []
    for n, fused_step in ((197, 1.1), (577, 1.3)):
        rows = {"sdpa_nomask": row(0.3, 1.0), "triton": row(0.4, fused_step), "triton_nomask": row(0.35, 0.88),
                "paper": row(1.0, 4.0, 10**6), "flex_hash": {"check": "-", "error": "OOM"}}
        bench.add_ratios(rows, {"forward": 1e-4, "step": 5e-4})
        cases.append({"shape": [8, 12, n, 64], "floor_ms": {}, "variants": rows})
    return cases


def test_targets_and_table():
    cases = _fake_cases()
    rows = cases[0]["variants"]
    assert rows["triton"]["step_vs_sdpa_nomask"] == pytest.approx(1.1)
    assert rows["triton"]["step_speedup_vs_paper"] == pytest.approx(4.0 / 1.1)
    assert rows["triton"]["step_floor_fraction_pct"] == pytest.approx(100 * 0.5 / 1.1)
    targets = bench.evaluate_targets(cases)
    assert targets["8x12x197x64: triton fwd+bwd within 1.15x of SDPA flash without mask"] == "MET (1.10x)"
    assert targets["8x12x577x64: triton fwd+bwd within 1.15x of SDPA flash without mask"] == "NOT MET (1.30x)"
    assert targets["8x12x197x64: triton fwd+bwd >= 3.0x faster than the paper's code"] == "MET (3.64x)"
    assert targets["8x12x577x64: triton fwd+bwd >= 3.0x faster than the paper's code"] == "MET (3.08x)"
    assert targets["8x12x577x64: triton saves zero bytes of N x N state for backward"].startswith("MET (0 bytes")
    missing = bench.evaluate_targets([{"shape": [1, 1, 197, 64], "variants": {"sdpa_nomask": {}}}])
    assert set(missing.values()) == {"NOT MEASURED"}
    meta = {"device": "NVIDIA H200", "versions": {"torch": "2.x", "triton": "3.x", "cuda": "12.x"}, "git_commit": "abc",
            "dtype": "bfloat16", "heads": 12, "tokens": 65536, "ratio": 0.1, "repeats": 20, "warmup": 3,
            "copy_bandwidth_gbs": 4000.0, "nominal_bandwidth_gbs": 4800.0, "targets": targets}
    text = bench.render(meta, cases)
    assert "NVIDIA H200" in text and "nominal 4800 GB/s" in text
    assert "| 8x12x197x64 | triton | ok (1.0e-03) | 0.400 | 0.700 | 1.100 (1.000) | 1.10x | 1.33x | 3.64x | 1.5 | 0 | 45.5 |" in text
    assert "| 8x12x197x64 | flex_hash | - | OOM |" in text
    assert text.count("| 8x12x") == 10 and "- 8x12x577x64: triton fwd+bwd within 1.15x" in text
    assert "- 8x12x197x64: kernel at r = 0 / SDPA 0.88x; mask (r > 0 / r = 0) 1.25x" in text
    assert bench.decompose([{"shape": [1, 1, 197, 64], "variants": {"sdpa_nomask": {}, "triton": {}}}]) == []


def test_without_cuda_the_script_says_so_and_writes_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench.main(["--output", str(tmp_path)]) == 1
    assert "needs a CUDA device" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_committed_gpu_results_say_what_was_measured():
    """attention_gpu.md either reports a real run (device + targets) or says plainly that nothing was measured."""
    text = (ROOT / "benchmarks" / "results" / "attention_gpu.md").read_text()
    data = ROOT / "benchmarks" / "results" / "attention_gpu.json"
    if data.exists():
        meta = json.loads(data.read_text())["meta"]
        assert meta["device"] in text and "## Targets" in text
    else:
        assert "NOT measured" in text and "python benchmarks/bench_gpu.py" in text


@pytest.mark.gpu
def test_quick_run_on_one_shape(tmp_path):
    assert bench.main(["--quick", "--seq-lens", "197", "--repeats", "2", "--warmup", "1", "--output", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "attention_gpu_quick.json").read_text())
    rows = data["cases"][0]["variants"]
    assert rows["triton"]["check"].startswith("ok") and rows["triton"]["nn_state_bytes"] == 0
    assert (tmp_path / "attention_gpu_quick.md").read_text().startswith("# DropKey attention on GPU")


def test_gpu_session_script_is_valid_bash_and_fits_one_device_call():
    """benchmarks/gpu_session.sh parses, names modules and files that exist, and its step limits sum to < 600 s."""
    import re
    import subprocess

    script = ROOT / "benchmarks" / "gpu_session.sh"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    text = script.read_text()
    limits = [int(seconds) for seconds in re.findall(r"^step \S+ (\d+) ", text, flags=re.M)]
    assert len(limits) == 5 and sum(limits) + 10 * len(limits) < 600  # each step may take 10 s more to be killed
    for path in re.findall(r"\b((?:tests|benchmarks)/[\w/]+\.py)\b", text):
        assert (ROOT / path).exists(), path
    assert "dropkey.kernels.triton_aot" in text and importlib.util.find_spec("dropkey.kernels.triton_aot")
