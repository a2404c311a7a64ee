"""benchmarks/bench_gpu.py on the CPU: arguments, floors, saved-state probe, targets, table, the dry run.

The dry run sends every variant through the code a GPU run uses (the Triton kernels under
the interpreter, which conftest.py turns on without CUDA); FlexAttention, which has no CPU
backward, gets a forward check of its hash mask. Timing on a GPU is the ``gpu`` test: a quick
run on one shape.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest
import torch

from dropkey import functional as fn

ROOT = Path(__file__).resolve().parents[1]
_SPEC = importlib.util.spec_from_file_location("bench_gpu", ROOT / "benchmarks" / "bench_gpu.py")
bench = importlib.util.module_from_spec(_SPEC)
sys.modules["bench_gpu"] = bench  # torch.compile (flex_hash) looks the score_mod's module up by name
_SPEC.loader.exec_module(bench)


def test_arguments_and_defaults():
    args = bench.parse_args([])
    assert args.seq_lens == (65, 197, 577, 1024) and args.variants == bench.VARIANTS
    assert (args.repeats, args.warmup, args.ratio, args.tokens, args.heads) == (20, 3, 0.1, 65536, 12)
    quick = bench.parse_args(["--quick", "--seq-lens", "197,577", "--variants", "paper,sdpa_nomask,triton"])
    assert quick.repeats == 5 and quick.tokens == 16384 and quick.seq_lens == (197, 577)
    assert quick.variants == ("sdpa_nomask", "triton", "paper")  # canonical order
    assert quick.output == bench.RESULTS
    dry = bench.parse_args(["--dry-run", "--heads", "3"])
    assert (dry.repeats, dry.warmup, dry.tokens, dry.heads, dry.seq_lens) == (2, 1, 130, 3, (65,))
    assert dry.output is None  # a dry run writes files only where told to
    for bad in (["--seq-lens", "1,x"], ["--seq-lens", "0"], ["--ratio", "1.0"], ["--ratio", "0"], ["--repeats", "0"],
                ["--variants", "triton"], ["--variants", "sdpa_nomask,flash3"], ["--quick", "--dry-run"]):
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
    """The reference saves N x N weights; the fused CPU backend a bit-packed mask (1 bit/logit); SDPA without mask
    none."""
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
    assert (
        "| 8x12x197x64 | triton | ok (1.0e-03) | 0.400 | 0.700 | 1.100 (1.000) | 1.10x | 1.33x | 3.64x "
        "| 1.5 | 0 | 45.5 |" in text
    )
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


def _needs_interpreter():
    problem = bench.dry_run_problem()
    if problem:
        pytest.skip(problem)


# the deprecation warning comes from torch.compile internals
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_dry_run_checks_and_times_every_variant_on_the_cpu(tmp_path):
    """Every variant passes its correctness check and is timed; the fused kernel saves no N x N state, the reference
    does."""
    _needs_interpreter()
    argv = ["--dry-run", "--heads", "1", "--tokens", "65", "--repeats", "1", "--output", str(tmp_path)]
    assert bench.main(argv) == 0
    data = json.loads((tmp_path / "attention_gpu_dry_run.json").read_text())
    assert data["meta"]["dry_run"] and data["meta"]["device"].startswith("CPU")
    (case,) = data["cases"]
    rows = case["variants"]
    assert case["shape"] == [1, 1, 65, 64] and set(rows) == set(bench.VARIANTS)
    for name in bench.VARIANTS:
        if name == "flex_hash" and "CPU" in rows[name].get("error", ""):  # FlexAttention: no backward on the CPU
            continue
        assert rows[name]["check"].startswith("ok") and rows[name]["step_median_ms"] > 0, (name, rows[name])
    assert rows["triton"]["nn_state_bytes"] == 0 and rows["triton_nomask"]["nn_state_bytes"] == 0
    assert rows["reference"]["nn_state_bytes"] >= 65 * 65 * 4
    text = (tmp_path / "attention_gpu_dry_run.md").read_text()
    assert "DRY RUN on the CPU" in text and "PARTIAL" not in text and "| 1x1x65x64 | triton | ok" in text


def test_dry_run_needs_the_interpreter(monkeypatch, capsys, tmp_path):
    _needs_interpreter()
    from dropkey.kernels import triton_dropkey

    monkeypatch.setattr(triton_dropkey, "INTERPRETED", False)
    assert bench.main(["--dry-run", "--output", str(tmp_path)]) == 1
    assert "TRITON_INTERPRET=1" in capsys.readouterr().err and list(tmp_path.iterdir()) == []


def test_a_run_that_stops_keeps_the_shapes_it_finished(monkeypatch, tmp_path):
    """Results are written after every shape: a crash (or the device call's time limit) in the second keeps the
    first."""
    _needs_interpreter()
    finished = _fake_cases()[0]

    def run_case(shape, *args):
        if shape[2] == 577:
            raise KeyboardInterrupt  # what a time limit's signal does to the run
        return {**finished, "shape": list(shape)}

    monkeypatch.setattr(bench, "run_case", run_case)
    with pytest.raises(KeyboardInterrupt):
        bench.main(["--dry-run", "--seq-lens", "197,577", "--output", str(tmp_path)])
    data = json.loads((tmp_path / "attention_gpu_dry_run.json").read_text())
    assert [case["shape"][2] for case in data["cases"]] == [197]
    text = (tmp_path / "attention_gpu_dry_run.md").read_text()
    assert "**PARTIAL**: 1 of 2 shapes" in text and "1.15x of SDPA flash without mask: MET (1.10x)" in text


# the deprecation warning comes from torch.compile internals
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_flex_score_mod_drops_exactly_the_hash_mask():
    """FlexAttention's score_mod (forward: the CPU has no flex backward) equals the reference on the same hash mask.

    N = 24 at r = 0.9 leaves about 8 of 96 rows fully dropped, so the ``zero`` convention is checked
    too; another seed's reference must differ (the check can fail).
    """
    shape, ratio, seed = (2, 2, 24, 16), 0.9, 11
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(shape, generator=g) for _ in range(3))
    out = bench.make_variant("flex_hash", ratio, shape, seed, torch.device("cpu"))(q, k, v)
    dead = bench._hash.hash_drop_mask(bench._hash.hash_seed(seed), (*shape[:3], shape[2]), ratio).all(-1)
    assert 0 < dead.sum() < dead.numel() / 2
    torch.testing.assert_close(out, bench._expected("flex_hash", q, k, v, ratio, seed), rtol=1e-5, atol=1e-5)
    assert (out[dead] == 0).all()
    assert not torch.allclose(out, bench._expected("flex_hash", q, k, v, ratio, seed + 1), atol=1e-3)


@pytest.mark.gpu
def test_quick_run_on_one_shape(tmp_path):
    assert (
        bench.main(["--quick", "--seq-lens", "197", "--repeats", "2", "--warmup", "1", "--output", str(tmp_path)]) == 0
    )
    data = json.loads((tmp_path / "attention_gpu_quick.json").read_text())
    rows = data["cases"][0]["variants"]
    assert rows["triton"]["check"].startswith("ok") and rows["triton"]["nn_state_bytes"] == 0
    assert (tmp_path / "attention_gpu_quick.md").read_text().startswith("# DropKey attention on GPU")


def test_gpu_session_script_runs_its_steps_within_one_device_call(tmp_path):
    """benchmarks/gpu_session.sh, run with a stand-in ``timeout`` that records each step instead of running it:
    five steps, each under a limit, whose limits (plus 10 s each to be killed) sum to < 600 s, running modules
    and files that exist."""
    import shlex
    import subprocess

    fake = tmp_path / "bin"
    fake.mkdir()
    calls = tmp_path / "calls.txt"
    (fake / "timeout").write_text(
        "#!/usr/bin/env bash\n"
        f'printf "%q " "$@" >> {shlex.quote(str(calls))}\n'
        f"echo >> {shlex.quote(str(calls))}\n"
    )
    (fake / "timeout").chmod(0o755)
    env = dict(os.environ, PATH=f"{fake}:{os.environ['PATH']}", OUT=str(tmp_path / "out"), PYTHON=sys.executable)
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_session.sh")], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    steps = [shlex.split(line) for line in calls.read_text().splitlines() if line.strip()]
    assert [step[0] for step in steps] == ["--kill-after=10"] * 5
    limits = [int(step[1]) for step in steps]
    assert sum(limits) + 10 * len(limits) < 600  # each step may take 10 s more to be killed
    summary = (tmp_path / "out" / "summary.txt").read_text().splitlines()
    assert [line.split(":")[0] for line in summary] == ["env", "bench", "kernels", "gpu", "compile"]
    words = [word for step in steps for word in step]
    for word in words:
        if word.startswith(("tests/", "benchmarks/")) and word.endswith(".py"):
            assert (ROOT / word.split("::")[0]).exists(), word
    modules = [words[i + 1] for i, word in enumerate(words) if word == "-m" and "." in words[i + 1]]
    assert modules == ["dropkey.kernels.triton_aot"] and importlib.util.find_spec(modules[0])
