"""The Triton DropKey kernels compiled for a named GPU architecture on a machine without a GPU.

Size (about 540 lines): a developer tool (the compile check and its command line) around one
list of kernel builds; its parts only make sense together.

Triton's compiler (Python -> MLIR -> LLVM -> PTX) and NVIDIA's assembler ``ptxas``
(shipped inside the triton wheel) need no GPU and no driver. This module compiles each
kernel of :mod:`dropkey.kernels.triton_dropkey` as a launch on that architecture would:
the same argument types, the same constexprs, each of the autotuner's candidates, and the
16-element alignment Triton infers for a ViT's fused-qkv layout (aligned pointers, strides
that are multiples of the head dim). It then reads what the hardware would get:

- registers per thread, and bytes spilled to local memory (``ptxas -v``, as Triton runs it);
- shared memory per block (Triton's metadata), against the architecture's opt-in limit;
- whether the tile products became tensor-core instructions (``wgmma`` on Hopper, ``mma``
  on Ampere/Ada) -- float32 runs exact IEEE products on CUDA cores by design;
- the kernel's machine instructions (``cuobjdump -sass``, also in the wheel), so the cost of
  the mask can be read as the count with r > 0 against r = 0 (a static count, not a timing).

What this catches that the interpreter cannot: the interpreter runs the kernels as numpy,
so code the compiler rejects (a type it cannot unify, a shape a tensor-core product does
not take) passes every interpreted test and fails at the first launch on a GPU. What it
cannot tell: speed and numerics on real hardware (``benchmarks/bench_gpu.py`` and the
``gpu`` tests).

It must run in a process where triton is not interpreted: ``TRITON_INTERPRET=1`` (set by
tests/conftest.py on machines without CUDA) replaces the kernels by Python functions.
The command line is ``python -m dropkey.kernels.triton_aot --arch sm_90 --scope smoke``
(``benchmarks/triton_resources.py`` writes the committed table).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import logging
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import torch

from theory.conventions import ALL_DROPPED_CONVENTIONS, DEFAULT, check_all_dropped

__all__ = [
    "ARCHITECTURES",
    "ALL_DROPPED",
    "DTYPES",
    "GpuArchitecture",
    "KernelBuild",
    "KernelResources",
    "SCOPES",
    "TILED_KERNELS",
    "builds",
    "compile_build",
    "compile_builds",
    "compiled_kernel",
    "main",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GpuArchitecture:
    """A CUDA compute capability and the per-block limits a kernel must fit.

    ``max_shared_bytes``: the opt-in maximum of shared memory per block (CUDA C++
    Programming Guide, "Technical Specifications per Compute Capability": 163 KB on 8.0,
    99 KB on 8.6 and 8.9, 227 KB on 9.0). ``registers_per_block``: 64 K 32-bit
    registers per block on all of them.
    """

    name: str
    capability: int
    max_shared_bytes: int
    examples: str
    registers_per_block: int = 65536


ARCHITECTURES = {
    arch.name: arch
    for arch in (
        GpuArchitecture("sm_80", 80, 163 * 1024, "A100"),
        GpuArchitecture("sm_86", 86, 99 * 1024, "A40, RTX 30xx"),
        GpuArchitecture("sm_89", 89, 99 * 1024, "L4, L40, RTX 40xx"),
        GpuArchitecture("sm_90", 90, 227 * 1024, "H100, H200"),
    )
}
KERNELS = ("forward", "backward_dkdv", "backward_dq", "backward_delta", "hash_mask")
DTYPES = ("float16", "bfloat16", "float32")
ALL_DROPPED = ALL_DROPPED_CONVENTIONS
SCOPES = ("smoke", "tuning")
TILED_KERNELS = ("forward", "backward_dkdv", "backward_dq")  # the kernels with autotuned (BLOCK_M, BLOCK_N)
_TRITON_DTYPE = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}


@dataclass(frozen=True)
class KernelBuild:
    """One compilation: a kernel, its element dtype, head dim (d = dv), mode and launch configuration."""

    kernel: str
    dtype: str = "float16"
    head_dim: int = 64
    all_dropped: str = DEFAULT
    drop: bool = True
    block_m: int = 64
    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self) -> None:
        if self.kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, got {self.kernel!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if not 1 <= self.head_dim <= 256:
            raise ValueError(f"head_dim must be in [1, 256], got {self.head_dim}")
        check_all_dropped(self.all_dropped)
        for name in ("block_m", "block_n", "num_warps"):
            value = getattr(self, name)
            if value < 1 or value & (value - 1):
                raise ValueError(f"{name} must be a power of two >= 1, got {value}")
        if self.num_stages < 1:
            raise ValueError(f"num_stages must be >= 1, got {self.num_stages}")

    @property
    def mode(self) -> str:
        """The all-dropped convention, with ",r=0" when the mask is off."""
        return f"{self.all_dropped}{'' if self.drop else ',r=0'}"

    @property
    def label(self) -> str:
        return (
            f"{self.kernel}[{self.dtype},d={self.head_dim},{self.mode},"
            f"{self.block_m}x{self.block_n},w{self.num_warps},s{self.num_stages}]"
        )


@dataclass(frozen=True)
class KernelResources:
    """What one compilation gave: per-thread registers, spills, shared memory, tensor-core use, or the error."""

    build: KernelBuild
    arch: str
    error: Optional[str] = None
    registers: Optional[int] = None
    spill_store_bytes: Optional[int] = None
    spill_load_bytes: Optional[int] = None
    stack_bytes: Optional[int] = None
    shared_bytes: Optional[int] = None
    tensor_core: Optional[str] = None  # "wgmma", "mma" or "none"
    sass_instructions: Optional[int] = None  # machine instructions in the kernel (cuobjdump -sass), loops counted once
    compile_seconds: float = 0.0

    @property
    def compiled(self) -> bool:
        return self.error is None

    @property
    def fits(self) -> bool:
        """Launchable on the architecture: shared memory and the block's registers within its limits."""
        if not self.compiled:
            return False
        arch = ARCHITECTURES[self.arch]
        threads = self.build.num_warps * 32
        return self.shared_bytes <= arch.max_shared_bytes and self.registers * threads <= arch.registers_per_block

    @property
    def spills(self) -> bool:
        return bool(self.spill_store_bytes or self.spill_load_bytes)

    def as_dict(self) -> dict:
        row = dataclasses.asdict(self)
        row.update(label=self.build.label, fits=self.fits)
        return row


def _tuning(kernel: str, dtype: str) -> tuple[tuple[int, int, int, int], ...]:
    """The autotuner's (BLOCK_M, BLOCK_N, num_warps, num_stages) candidates for a kernel and dtype, or its fixed
    launch."""
    from dropkey.kernels import triton_dropkey as tk

    if kernel in TILED_KERNELS:
        return tk.tuning_candidates(kernel, getattr(torch, dtype))
    if kernel == "backward_delta":
        return ((tk.DELTA_BLOCK_M, 16, 4, 3),)  # Triton's default warps and stages; no BLOCK_N
    return ((*tk.HASH_MASK_BLOCKS, 4, 3),)


def builds(scope: str = "smoke", *, head_dims: Sequence[int] = (64,)) -> list[KernelBuild]:
    """The compilations of a check.

    ``smoke``: every kernel in every dtype at each head dim, the tiled kernels with their
    first autotune candidate in the default ``uniform`` mode, plus (float16) the other two
    all-dropped conventions and r = 0 -- each code path the launches can take.
    ``tuning``: every autotune candidate of the tiled kernels in every dtype at each head
    dim (``uniform``, the mode with the most live state), for the resource table.
    """
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    if not head_dims:
        raise ValueError("head_dims must name at least one head dim")
    out: list[KernelBuild] = []
    for head_dim in head_dims:
        for dtype in DTYPES:
            for kernel in TILED_KERNELS:
                candidates = _tuning(kernel, dtype) if scope == "tuning" else _tuning(kernel, dtype)[:1]
                for m, n, w, s in candidates:
                    out.append(KernelBuild(kernel, dtype, head_dim, "uniform", True, m, n, w, s))
            if scope == "smoke":
                m, n, w, s = _tuning("backward_delta", dtype)[0]
                out.append(
                    KernelBuild("backward_delta", dtype, head_dim, block_m=m, block_n=n, num_warps=w, num_stages=s)
                )
        if scope == "smoke":
            for kernel in TILED_KERNELS:
                m, n, w, s = _tuning(kernel, "float16")[0]
                for mode, drop in (("zero", True), ("undropped", True), ("uniform", False)):
                    out.append(KernelBuild(kernel, "float16", head_dim, mode, drop, m, n, w, s))
    if scope == "smoke":
        m, n, w, s = _tuning("hash_mask", "float32")[0]
        out.append(KernelBuild("hash_mask", "float32", head_dims[0], block_m=m, block_n=n, num_warps=w, num_stages=s))
    return out


# --------------------------------------------------------------------------- one compilation


# Pointer arguments by name -> element type ("X" = the build's dtype).
_POINTERS = {
    "Q": "X", "K": "X", "V": "X", "ATTN_OUT": "X", "DO": "X", "DQ": "X", "DK": "X", "DV": "X",
    "LSE": "fp32", "DELTA": "fp32", "DEAD": "i8", "OUT": "i8",
}
_FLOATS = ("qk_scale", "scale")
_STRIDE = re.compile(r"^s[a-z]{2,3}$")  # sqb, sqh, sqm, skn, sdm, ...


def _jit_function(kernel: str):
    from dropkey.kernels import triton_dropkey as tk

    if tk.INTERPRETED:
        raise RuntimeError(
            "the Triton kernels are interpreted in this process (TRITON_INTERPRET is set), so they cannot be "
            "compiled for a GPU: run the check in a process without TRITON_INTERPRET"
        )
    return {
        "forward": tk._fwd_kernel,
        "backward_dkdv": tk._bwd_dkdv_kernel,
        "backward_dq": tk._bwd_dq_kernel,
        "backward_delta": tk._bwd_delta_kernel,
        "hash_mask": tk._hash_mask_kernel,
    }[kernel]


def _constexprs(build: KernelBuild) -> dict[str, object]:
    """The constexpr values the launch in triton_dropkey passes for this build on a GPU."""
    from dropkey.kernels import triton_dropkey as tk

    block_d = tk._pow2(build.head_dim)
    if build.kernel == "hash_mask":
        return {"BLOCK_M": build.block_m, "BLOCK_N": build.block_n}
    if build.kernel == "backward_delta":
        return {"HEAD_DV": build.head_dim, "BLOCK_DV": block_d, "BLOCK_M": build.block_m}
    return {
        "HEAD_D": build.head_dim, "HEAD_DV": build.head_dim, "BLOCK_D": block_d, "BLOCK_DV": block_d,
        "BLOCK_M": build.block_m, "BLOCK_N": build.block_n,
        "CONVENTION": tk.CONVENTION_CODES[build.all_dropped], "DROP": build.drop,
        "DOT": tk._dot_mode(getattr(torch, build.dtype)),  # compiled (not interpreted) here
    }


def _signature(fn, build: KernelBuild, constexprs: dict[str, object]) -> tuple[dict[str, str], dict]:
    """(argument types, alignment attributes) of ``fn`` for this build, as Triton's launcher would infer them.

    Pointers from torch allocations are 16-byte aligned; strides of a fused-qkv layout are
    multiples of the head dim, so 16-divisible when it is. Sizes (H, Nq, Nk) are not
    assumed divisible (a ViT has 197 tokens). Seeds and thresholds are int32 patterns.
    """
    signature: dict[str, str] = {}
    attrs: dict = {}
    aligned_strides = build.head_dim % 16 == 0
    for index, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in _POINTERS:
            element = _POINTERS[name]
            signature[name] = "*" + (_TRITON_DTYPE[build.dtype] if element == "X" else element)
            attrs[(index,)] = [["tt.divisibility", 16]]
        elif name in _FLOATS:
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
            if aligned_strides and _STRIDE.match(name):
                attrs[(index,)] = [["tt.divisibility", 16]]
    return signature, attrs


_REGISTERS = re.compile(r"Used (\d+) registers")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def _ptxas_numbers(log: str) -> tuple[int, int, int, int]:
    """(registers, stack frame, spill stores, spill loads) from ``ptxas -v``'s report on one kernel."""
    registers = _REGISTERS.search(log)
    frame = _FRAME.search(log)
    if registers is None or frame is None:
        raise RuntimeError(f"could not read ptxas's resource report from:\n{log}")
    stack, stores, loads = (int(x) for x in frame.groups())
    return int(registers.group(1)), stack, stores, loads


_SASS_INSTRUCTION = re.compile(r"^\s+/\*[0-9a-f]{4,}\*/\s+\S")


def _sass_instructions(cubin: bytes) -> Optional[int]:
    """Machine instructions in a cubin, from the cuobjdump that ships with triton (None if it cannot run)."""
    import triton

    with tempfile.TemporaryDirectory(prefix="dropkey-sass-") as folder:
        path = os.path.join(folder, "kernel.cubin")
        with open(path, "wb") as handle:
            handle.write(cubin)
        try:
            sass = subprocess.run(
                [triton.knobs.nvidia.cuobjdump.path, "-sass", path],
                capture_output=True,
                text=True,
                check=True,
                timeout=120,
            ).stdout
        except (OSError, subprocess.SubprocessError) as error:
            logger.warning("cuobjdump could not disassemble a kernel: %s", error)
            return None
    return sum(1 for line in sass.splitlines() if _SASS_INSTRUCTION.match(line))


def _tensor_core(ptx: str) -> str:
    if "wgmma.mma_async" in ptx:
        return "wgmma"
    if re.search(r"\bmma\.sync", ptx):
        return "mma"
    return "none"


def _describe(error: BaseException) -> str:
    """The root cause first (Triton wraps it once per enclosing function), then the chain that carried it."""
    chain = [error]
    while chain[-1].__cause__ is not None and len(chain) < 32:
        chain.append(chain[-1].__cause__)
    texts = [f"{type(e).__name__}: {str(e).strip()}" for e in reversed(chain)]
    return texts[0] if len(texts) == 1 else texts[0] + "\n\nraised through:\n" + "\n".join(texts[1:])


def _compile_options() -> dict[str, object]:
    from dropkey.kernels import triton_dropkey as tk

    return dict(tk.COMPILE_OPTIONS)


def compiled_kernel(build: KernelBuild, arch: str = "sm_90"):
    """(Triton's CompiledKernel, ptxas's report) of one build for ``arch``; raises what the compiler raises.

    The kernel's ``asm`` holds every stage: ``ttir``, ``ttgir``, ``llir``, ``ptx``, ``cubin``.
    """
    if arch not in ARCHITECTURES:
        raise ValueError(f"arch must be one of {tuple(ARCHITECTURES)}, got {arch!r}")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = _jit_function(build.kernel)
    constexprs = _constexprs(build)
    signature, attrs = _signature(fn, build, constexprs)
    source = ASTSource(fn, signature, constexprs=constexprs, attrs=attrs)
    target = GPUTarget("cuda", ARCHITECTURES[arch].capability, 32)
    options = {"num_warps": build.num_warps, "num_stages": build.num_stages, **_compile_options()}
    log = io.StringIO()
    # A fresh compilation every time (a cache hit would skip ptxas and its report), into a
    # throwaway cache (the artefacts are read from memory); Triton prints ptxas's report when
    # dump_ptxas_log is on.
    with (
        tempfile.TemporaryDirectory(prefix="dropkey-triton-aot-") as cache,
        triton.knobs.cache.scope(), triton.knobs.compilation.scope(), triton.knobs.nvidia.scope(),
        contextlib.redirect_stdout(log),
    ):
        triton.knobs.cache.dir = cache
        triton.knobs.compilation.always_compile = True
        triton.knobs.nvidia.dump_ptxas_log = True
        compiled = triton.compile(source, target=target, options=options)
    return compiled, log.getvalue()


def compile_build(build: KernelBuild, arch: str = "sm_90") -> KernelResources:
    """Compiles one build for ``arch`` (a key of :data:`ARCHITECTURES`); compile errors are returned, not raised."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"arch must be one of {tuple(ARCHITECTURES)}, got {arch!r}")
    _jit_function(build.kernel)  # interpreted kernels are a usage error, raised, not a compiler finding
    start = time.perf_counter()
    try:
        compiled, log = compiled_kernel(build, arch)
    except Exception as error:  # noqa: BLE001 - every compiler failure is a finding to report
        return KernelResources(build, arch, error=_describe(error), compile_seconds=time.perf_counter() - start)
    seconds = time.perf_counter() - start
    registers, stack, stores, loads = _ptxas_numbers(log)
    return KernelResources(
        build, arch,
        registers=registers, spill_store_bytes=stores, spill_load_bytes=loads, stack_bytes=stack,
        shared_bytes=int(compiled.metadata.shared), tensor_core=_tensor_core(compiled.asm["ptx"]),
        sass_instructions=_sass_instructions(compiled.asm["cubin"]), compile_seconds=seconds,
    )


def _compile_pair(pair: tuple[KernelBuild, str]) -> KernelResources:
    return compile_build(*pair)


def compile_builds(
    items: Iterable[KernelBuild], archs: Sequence[str] = ("sm_90",), *, jobs: int = 1, progress: bool = False
) -> list[KernelResources]:
    """Compiles every build for every architecture, in ``jobs`` processes; results in input order."""
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    for arch in archs:
        if arch not in ARCHITECTURES:
            raise ValueError(f"arch must be one of {tuple(ARCHITECTURES)}, got {arch!r}")
    items = list(items)
    pairs = [(build, arch) for arch in archs for build in items]
    if jobs == 1:
        results = map(_compile_pair, pairs)
        pool = contextlib.nullcontext()
    else:
        pool = ProcessPoolExecutor(max_workers=jobs)
    with pool as executor:
        if executor is not None:
            results = executor.map(_compile_pair, pairs)
        if progress:
            from tqdm import tqdm

            results = tqdm(results, total=len(pairs), desc="compiling", unit="kernel")
        out = list(results)
    for row in out:
        if not row.compiled:
            logger.warning("%s on %s did not compile: %s", row.build.label, row.arch, row.error.splitlines()[0])
    return out


# --------------------------------------------------------------------------- reading the results


def unlaunchable(results: Sequence[KernelResources]) -> list[tuple[str, str, str, int, str]]:
    """(arch, kernel, dtype, head dim, mode) groups none of whose autotune candidates compiles and fits.

    The autotuner drops a candidate that fails (out of shared memory); a group with no
    candidate left would fail at launch.
    """
    groups: dict[tuple, bool] = {}
    for row in results:
        b = row.build
        key = (row.arch, b.kernel, b.dtype, b.head_dim, b.mode)
        groups[key] = groups.get(key, False) or row.fits
    return [key for key, ok in groups.items() if not ok]


def render_table(results: Sequence[KernelResources]) -> str:
    """A Markdown table: one row per compilation."""
    lines = [
        "| arch | kernel | dtype | d | mode | BLOCK_M x BLOCK_N | warps | stages | registers | spill st/ld (B) "
        "| shared (KiB) | tensor cores | SASS instructions | fits |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in results:
        b = row.build
        tiles = f"{b.block_m} x {b.block_n}" if b.kernel in TILED_KERNELS else f"{b.block_m}"
        if row.compiled:
            cells = (
                f"{row.registers}", f"{row.spill_store_bytes}/{row.spill_load_bytes}",
                f"{row.shared_bytes / 1024:.1f}", row.tensor_core or "?", f"{row.sass_instructions or '?'}",
                "yes" if row.fits else "**no**",
            )
        else:
            first_line = row.error.splitlines()[0][:80].replace("|", "\\|")
            cells = ("-", "-", "-", "-", "-", f"**compile error**: {first_line}")
        lines.append(
            f"| {row.arch} | {b.kernel} | {b.dtype} | {b.head_dim} | {b.mode} | {tiles} | {b.num_warps} "
            f"| {b.num_stages} | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- command line


def _head_dims(text: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--head-dims must be comma-separated integers in [1, 256], got {text!r}"
        ) from None
    if not dims or any(not 1 <= d <= 256 for d in dims):
        raise argparse.ArgumentTypeError(f"--head-dims must be comma-separated integers in [1, 256], got {text!r}")
    return dims


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"--jobs must be >= 1, got {value}")
    return value


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m dropkey.kernels.triton_aot",
        description=(
            "Compile the Triton DropKey kernels for GPU architectures without a GPU; "
            "print registers, spills, shared memory."
        ),
    )
    parser.add_argument(
        "--arch", action="append", choices=tuple(ARCHITECTURES), help="target (repeatable; default sm_90)"
    )
    parser.add_argument(
        "--scope", choices=SCOPES, default="smoke", help="smoke: every code path once; tuning: every autotune candidate"
    )
    parser.add_argument("--head-dims", type=_head_dims, default=(64,), help="comma-separated head dims (default 64)")
    parser.add_argument(
        "--jobs", type=_positive, default=max(1, min(4, os.cpu_count() or 1)), help="compiler processes"
    )
    parser.add_argument("--json", help="also write every result to this JSON file (atomically)")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Prints the table; exit status 1 if a kernel failed to compile or a group has no launchable candidate."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    archs = args.arch or ["sm_90"]
    results = compile_builds(
        builds(args.scope, head_dims=args.head_dims), archs, jobs=args.jobs, progress=sys.stderr.isatty()
    )
    print(render_table(results), end="")
    failed = [row for row in results if not row.compiled]
    stranded = unlaunchable(results)
    print(
        f"\n{len(results)} compilations, {len(failed)} failed, {sum(r.spills for r in results)} spill; "
        f"groups without a launchable candidate: {stranded or 'none'}"
    )
    if args.json:
        from dropkey.storage import write_json_atomic

        write_json_atomic(args.json, [row.as_dict() for row in results])
    return 1 if failed or stranded else 0


if __name__ == "__main__":  # pragma: no cover - exercised through a subprocess in the tests
    sys.exit(main())
