"""The Triton kernels compiled for real GPU architectures on this CPU machine (dropkey.kernels.triton_aot).

The interpreter tests (test_triton_kernel.py) check the kernels' arithmetic, but the
interpreter runs them as numpy and accepts code that Triton's compiler rejects. Here
each kernel goes through the real compiler and ptxas for Hopper (sm_90: H100/H200) in
every dtype and every all-dropped mode, in a subprocess without TRITON_INTERPRET:
it must compile, fit the architecture's shared memory and registers, and run its tile
products on tensor cores in float16/bfloat16 (and exact IEEE float32 products, no TF32,
in float32). Ampere (sm_80) and every autotune candidate at head dims 64..256 are
``slow``. Skips where triton or its CUDA backend (with ptxas) is not installed.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from dropkey.kernels import triton_aot as aot

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


def _compiler_missing() -> str:
    if importlib.util.find_spec("triton") is None:
        return 'triton is not installed (pip install "dropkey-lab[triton]")'
    spec = importlib.util.find_spec("triton.backends.nvidia")
    if spec is None or not any((Path(p) / "bin" / "ptxas").exists() for p in spec.submodule_search_locations or ()):
        return "triton's CUDA backend (with ptxas) is not installed"
    return ""


_MISSING = _compiler_missing()
needs_compiler = pytest.mark.skipif(bool(_MISSING), reason=_MISSING)


def _compiler_env(tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp / "triton-cache")
    # Warnings are errors, as in the test suite: a compilation that warns (say, about a
    # compiler default about to change) is reported as failed.
    env["PYTHONWARNINGS"] = "error"
    return env


def _run_check(tmp: Path, *args: str) -> tuple[int, str, list[dict]]:
    """Runs the command line in a fresh process; (exit status, stdout, rows of its JSON)."""
    out = tmp / "resources.json"
    proc = subprocess.run(
        [sys.executable, "-m", "dropkey.kernels.triton_aot", *args, "--jobs", "2", "--json", str(out)],
        env=_compiler_env(tmp), capture_output=True, text=True, timeout=1800,
    )
    assert out.exists(), f"no results written; stderr:\n{proc.stderr[-4000:]}"
    return proc.returncode, proc.stdout, json.loads(out.read_text())


@pytest.fixture(scope="module")
def hopper(tmp_path_factory) -> tuple[int, str, list[dict]]:
    return _run_check(tmp_path_factory.mktemp("aot"), "--arch", "sm_90", "--scope", "smoke")


def _failures(rows: list[dict]) -> str:
    return "\n".join(f"{row['label']}: {row['error']}" for row in rows if row["error"])


# --------------------------------------------------------------------------- compiled for Hopper


@needs_compiler
def test_every_kernel_compiles_for_hopper_in_every_mode(hopper):
    status, stdout, rows = hopper
    assert not _failures(rows), _failures(rows)
    assert status == 0, stdout
    built = {(r["build"]["kernel"], r["build"]["dtype"], r["build"]["all_dropped"], r["build"]["drop"]) for r in rows}
    expected = {(b.kernel, b.dtype, b.all_dropped, b.drop) for b in aot.builds("smoke")}
    assert built == expected
    assert {kernel for kernel, *_ in built} == set(aot.KERNELS)
    assert {mode for _, _, mode, _ in built} == set(aot.ALL_DROPPED)


@needs_compiler
def test_hopper_builds_fit_the_shared_memory_and_register_file(hopper):
    _, _, rows = hopper
    limit = aot.ARCHITECTURES["sm_90"].max_shared_bytes
    for row in rows:
        assert 0 < row["registers"] <= 255, row["label"]
        assert row["shared_bytes"] <= limit, row["label"]
        assert row["fits"], row["label"]


@needs_compiler
def test_the_mask_is_in_the_compiled_kernels(hopper):
    """With r > 0 each tiled kernel has more machine instructions than with r = 0 (the hash, the -inf select)."""
    _, _, rows = hopper
    count = {
        (r["build"]["kernel"], r["build"]["drop"]): r["sass_instructions"]
        for r in rows
        if r["build"]["dtype"] == "float16" and r["build"]["all_dropped"] == "uniform"
    }
    for kernel in aot.TILED_KERNELS:
        assert count[kernel, False] > 0 and count[kernel, True] > count[kernel, False] * 1.1, (kernel, count)


@needs_compiler
def test_half_precision_tiles_run_on_tensor_cores_and_float32_stays_exact(hopper):
    """Tensor-core products (wgmma, or mma for tiles under 64 rows) in float16/bfloat16; none in float32
    (TF32 would round)."""
    _, _, rows = hopper
    tiled = [row for row in rows if row["build"]["kernel"] in aot.TILED_KERNELS]
    assert tiled
    for row in tiled:
        expected = {"none"} if row["build"]["dtype"] == "float32" else {"wgmma", "mma"}
        assert row["tensor_core"] in expected, row["label"]
    assert any(row["tensor_core"] == "wgmma" for row in tiled)  # Hopper's warp-group products are reached


_REJECTED_BY_THE_COMPILER = """
import json

import triton
import triton.language as tl

from dropkey.kernels import triton_aot as aot
from dropkey.kernels import triton_dropkey as tk
from dropkey.kernels.triton_dropkey import _dropped


@triton.jit
def _kept_with_two_returns(rows, cols, inside, threshold, undropped_rows, DROP: tl.constexpr, UNDROP: tl.constexpr):
    # The kernels' keep flags as first written: the interpreter ran this, the compiler
    # cannot type a function whose returns differ in shape ((128, 64) and (1, 64)).
    if DROP:
        dropped = _dropped(rows, cols, threshold)
        if UNDROP:
            dropped = dropped & ~undropped_rows
        return inside & ~dropped
    return inside


big = aot.compile_build(aot.KernelBuild("forward", "float16", 256, block_m=128, block_n=128, num_warps=8), "sm_86")
tk._kept = _kept_with_two_returns
bad = aot.compile_build(aot.KernelBuild("forward", "float16", 64, block_m=128, block_n=64), "sm_90")
print(json.dumps([big.as_dict(), bad.as_dict()]))
"""


@needs_compiler
def test_kernels_the_compiler_rejects_or_the_gpu_cannot_hold_are_reported(tmp_path):
    """The check can fail: the keep-flag helper as first written (which the interpreter ran) does not compile,
    and d = 256 with 128 x 128 tiles needs more shared memory than an RTX 30xx/40xx block has."""
    script = tmp_path / "rejected.py"  # a file: triton.jit reads its function's source
    script.write_text(_REJECTED_BY_THE_COMPILER)
    proc = subprocess.run(
        [sys.executable, str(script)], env=_compiler_env(tmp_path), capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    big, bad = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (
        big["error"] is None and big["shared_bytes"] > aot.ARCHITECTURES["sm_86"].max_shared_bytes and not big["fits"]
    )
    assert "Return type mismatch" in bad["error"] and not bad["fits"] and bad["registers"] is None
    failed = [aot.KernelResources(aot.KernelBuild("forward"), "sm_90", error=bad["error"])]
    assert aot.unlaunchable(failed) == [("sm_90", "forward", "float16", 64, "uniform")]


@needs_compiler
@pytest.mark.slow
def test_every_autotune_candidate_compiles_for_ampere_and_hopper_at_every_head_dim(tmp_path):
    """Each (arch, kernel, dtype, head dim) keeps at least one candidate the autotuner can launch."""
    status, stdout, rows = _run_check(
        tmp_path, "--arch", "sm_80", "--arch", "sm_90", "--scope", "tuning", "--head-dims", "32,64,128,256"
    )
    assert not _failures(rows), _failures(rows)
    assert status == 0, stdout
    results = [
        aot.KernelResources(
            aot.KernelBuild(**row["build"]), row["arch"],
            registers=row["registers"], shared_bytes=row["shared_bytes"],
        )
        for row in rows
    ]
    assert aot.unlaunchable(results) == []
    ampere_half = [r for r in rows if r["arch"] == "sm_80" and r["build"]["dtype"] != "float32"]
    assert ampere_half and all(r["tensor_core"] == "mma" for r in ampere_half)


# --------------------------------------------------------------------------- the module's own logic (no compiler)


@needs_triton
def test_builds_cover_each_code_path_once_and_every_candidate_in_tuning():
    from dropkey.kernels import triton_dropkey as tk

    smoke = aot.builds("smoke", head_dims=(64, 128))
    assert len(smoke) == len(set(smoke))
    assert {b.head_dim for b in smoke} == {64, 128}
    tuning = aot.builds("tuning", head_dims=(64,))
    forward = {
        (b.block_m, b.block_n, b.num_warps, b.num_stages)
        for b in tuning
        if b.kernel == "forward" and b.dtype == "bfloat16"
    }
    assert forward == set(tk.FORWARD_TUNING)
    dq = {
        (b.block_m, b.block_n, b.num_warps, b.num_stages)
        for b in tuning
        if b.kernel == "backward_dq" and b.dtype == "float32"
    }
    assert dq == set(tk.BACKWARD_TUNING_FLOAT32)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"kernel": "sideways"}, "kernel must be one of"),
        ({"kernel": "forward", "dtype": "float64"}, "dtype must be one of"),
        ({"kernel": "forward", "head_dim": 0}, r"head_dim must be in \[1, 256\]"),
        ({"kernel": "forward", "head_dim": 512}, r"head_dim must be in \[1, 256\]"),
        ({"kernel": "forward", "all_dropped": "nan"}, "all_dropped must be one of"),
        ({"kernel": "forward", "block_m": 48}, "block_m must be a power of two"),
        ({"kernel": "forward", "num_warps": 0}, "num_warps must be a power of two"),
        ({"kernel": "forward", "num_stages": 0}, "num_stages must be >= 1"),
    ],
)
def test_bad_builds_are_rejected_by_name(kwargs, message):
    with pytest.raises(ValueError, match=message):
        aot.KernelBuild(**kwargs)


def test_bad_arguments_are_rejected_by_name():
    with pytest.raises(ValueError, match="scope must be one of"):
        aot.builds("everything")
    with pytest.raises(ValueError, match="head_dims must name"):
        aot.builds("smoke", head_dims=())
    with pytest.raises(ValueError, match="arch must be one of"):
        aot.compile_builds([aot.KernelBuild("forward")], ["sm_70"])
    with pytest.raises(ValueError, match="jobs must be >= 1"):
        aot.compile_builds([aot.KernelBuild("forward")], jobs=0)
    with pytest.raises(SystemExit):
        aot.parse_args(["--head-dims", "64,300"])


def test_ptxas_report_and_tensor_core_instructions_are_read():
    log = (
        "ptxas info    : Compiling entry function '_fwd_kernel' for 'sm_90a'\n"
        "ptxas info    : Function properties for _fwd_kernel\n"
        "    72 bytes stack frame, 132 bytes spill stores, 96 bytes spill loads\n"
        "ptxas info    : Used 255 registers, used 1 barriers, 72 bytes cumulative stack size\n"
    )
    assert aot._ptxas_numbers(log) == (255, 72, 132, 96)
    with pytest.raises(RuntimeError, match="resource report"):
        aot._ptxas_numbers("ptxas info: nothing here")
    assert aot._tensor_core("wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 ...") == "wgmma"
    assert aot._tensor_core("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 ...") == "mma"
    assert aot._tensor_core("fma.rn.f32 %f1, %f2, %f3, %f4;") == "none"


def test_fits_and_unlaunchable_follow_the_architecture_limits():
    build = aot.KernelBuild("forward", num_warps=8)
    small = aot.KernelResources(build, "sm_86", registers=128, shared_bytes=64 * 1024)
    big = aot.KernelResources(build, "sm_86", registers=128, shared_bytes=120 * 1024)  # > 99 KB
    greedy = aot.KernelResources(build, "sm_90", registers=255, shared_bytes=1024)  # 255 x 256 threads <= 64 K
    assert small.fits and not big.fits and greedy.fits
    assert not aot.KernelResources(
        aot.KernelBuild("forward", num_warps=16), "sm_90", registers=255, shared_bytes=0
    ).fits
    assert aot.unlaunchable([big]) == [("sm_86", "forward", "float16", 64, "uniform")]
    assert aot.unlaunchable([big, small]) == []
    table = aot.render_table([small, big, aot.KernelResources(build, "sm_90", error="CompilationError: at 1:0\nmore")])
    assert "**no**" in table and "**compile error**: CompilationError: at 1:0 |" in table
    assert all(line.count("|") == table.splitlines()[0].count("|") for line in table.splitlines())


@needs_triton
def test_compiling_refuses_interpreted_kernels():
    from dropkey.kernels import triton_dropkey as tk

    if not tk.INTERPRETED:
        pytest.skip("the kernels are compiled in this process (CUDA)")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        aot.compile_build(aot.KernelBuild("forward"))
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        aot.compiled_kernel(aot.KernelBuild("hash_mask"))


@needs_compiler
@pytest.mark.parametrize(
    ("setting", "forward", "backward_float32"), [(None, 6, 4), ("0", 1, 1), ("off", 1, 1), ("1", 6, 4)]
)
def test_autotune_switch_sets_the_candidates_of_the_compiled_launches(tmp_path, setting, forward, backward_float32):
    """DROPKEY_LAB_TRITON_AUTOTUNE=0 leaves one candidate per launch (the first: no timing); default all of them."""
    env = _compiler_env(tmp_path)
    env.pop("DROPKEY_LAB_TRITON_AUTOTUNE", None)
    if setting is not None:
        env["DROPKEY_LAB_TRITON_AUTOTUNE"] = setting
    script = (
        "from dropkey.kernels import triton_dropkey as tk\n"
        "assert not tk.INTERPRETED\n"
        "f = tk._LAUNCHES['forward', False].configs\n"
        "b = tk._LAUNCHES['backward_dq', True].configs\n"
        "print(len(f), len(b), f[0].kwargs['BLOCK_M'], f[0].kwargs['BLOCK_N'], b[0].kwargs['BLOCK_M'])\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    from dropkey.kernels import triton_dropkey as tk

    assert proc.stdout.split() == [
        str(forward), str(backward_float32),
        str(tk.FORWARD_TUNING[0][0]), str(tk.FORWARD_TUNING[0][1]), str(tk.BACKWARD_TUNING_FLOAT32[0][0]),
    ]


_HASH_IR = """
import json
from dropkey.kernels import triton_aot as aot

compiled, _ = aot.compiled_kernel(aot.KernelBuild("hash_mask", block_m=16, block_n=16), "sm_90")
print(json.dumps(compiled.asm["ttir"]))
"""


@needs_compiler
def test_the_compiled_hash_is_unsigned_32_bit_arithmetic(tmp_path):
    """The GPU mask equals hash_mask.py's only if every hash step wraps at 32 bits and compares unsigned.

    The interpreter tests check the values, but a compiler that typed the 32-bit constants
    (0x85EBCA6B > 2**31) as int64, or shifted arithmetically, would change the GPU mask alone.
    """
    proc = subprocess.run(
        [sys.executable, "-c", _HASH_IR], env=_compiler_env(tmp_path), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    ttir = json.loads(proc.stdout.strip().splitlines()[-1])
    hashing = [
        line
        for line in ttir.splitlines()
        if re.search(r"%(h|rows|flags)_\d+ = arith\.(muli|shrui|shrsi|xori|addi)", line)
    ]
    assert len(hashing) >= 30  # fmix32 three times (slice, row, tile): 5 steps each, plus the mixing
    assert all(line.rstrip().split(" loc(")[0].endswith(("i32", "xi32>")) for line in hashing), hashing
    assert not any("shrsi" in line for line in hashing)
    # 0x85EBCA6B, 0xC2B2AE35
    assert "arith.constant dense<-2048144789>" in ttir and "arith.constant dense<-1028477387>" in ttir
    assert re.search(r"%flags_\d+ = arith\.cmpi ule", ttir)  # h <= T * 2**8 - 1, unsigned


# --------------------------------------------------------------------------- benchmarks/triton_resources.py

_ROOT = Path(__file__).resolve().parents[1]


def _resources_script():
    spec = importlib.util.spec_from_file_location("triton_resources", _ROOT / "benchmarks" / "triton_resources.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@needs_triton
def test_resource_summary_and_mask_cost_tables_from_given_results():
    script = _resources_script()
    assert {b.kernel for b in script.UNMASKED} == {"forward", "backward_dkdv", "backward_dq"}
    assert all(not b.drop and b.dtype == "bfloat16" and b.head_dim == 64 for b in script.UNMASKED)
    base = script.UNMASKED[0]
    masked = dataclasses.replace(base, drop=True)
    other = dataclasses.replace(masked, block_m=64)
    results = [
        aot.KernelResources(masked, "sm_90", registers=200, shared_bytes=1024, spill_store_bytes=0, spill_load_bytes=0,
                            sass_instructions=1500),
        aot.KernelResources(other, "sm_90", registers=255, shared_bytes=1024, spill_store_bytes=8, spill_load_bytes=8,
                            sass_instructions=900),
    ]
    unmasked = [aot.KernelResources(base, "sm_90", registers=150, shared_bytes=1024, sass_instructions=1000)]
    costs = script.mask_cost(results, unmasked)
    assert costs == [
        {"arch": "sm_90", "kernel": base.kernel, "config": base.label, "unmasked": 1000, "masked": 1500, "ratio": 1.5}
    ]
    (group,) = script.group_summary(results)
    assert (group["candidates"], group["launchable"], group["spill_free"], group["least_spill_bytes"]) == (2, 2, 1, 0)
    meta = {"git_commit": "abc", "triton": "3.9.0", "torch": "2.13", "machine": "x", "compilations": 2, "failed": 0,
            "unlaunchable": [], "command": "c"}
    text = script.render(meta, [group], results, costs)
    assert "| sm_90 | forward | 1000 | 1500 | 1.50x |" in text and "not measured" in text.lower()


@needs_compiler
@pytest.mark.slow
def test_resource_script_writes_its_tables(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(_ROOT / "benchmarks" / "triton_resources.py"), "--arch", "sm_90", "--head-dims", "64",
         "--jobs", "2", "--output", str(tmp_path)],
        env=_compiler_env(tmp_path), capture_output=True, text=True, timeout=1800,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    data = json.loads((tmp_path / "triton_resources.json").read_text())
    assert data["meta"]["failed"] == 0 and len(data["mask_cost"]) == 3
    assert all(cost["ratio"] > 1.1 for cost in data["mask_cost"])
    assert "## What the mask costs" in (tmp_path / "triton_resources.md").read_text()
