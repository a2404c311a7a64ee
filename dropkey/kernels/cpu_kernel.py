"""The ``cpp`` backend: DropKey attention fused in one C++ CPU kernel (float32).

The kernel (``dropkey_cpu.cpp`` beside this file) computes attention one tile of
query rows at a time with torch's own BLAS (``sgemm_`` from libtorch_cpu), draws
each tile's drop flags inline from the counter-based hash of
:mod:`dropkey.kernels.hash_mask` (bit for bit the mask of
``hash_drop_mask(seed, ...)``, so the ``reference`` backend with ``mask="hash"``
is its exact specification), and recomputes the flags in the backward. It keeps
no N x N state: only the log-sum-exp, one float per query row.

Build. The source is compiled at first use with the system C++ compiler
(``$CXX``, else ``c++``/``g++``/``clang++``) as ``-O3 -march=native -fopenmp``
(``-mcpu=native`` off x86; 512-bit vectors where the x86 CPU has them) and cached under ``$DROPKEY_LAB_KERNEL_CACHE``
(default ``~/.cache/dropkey-lab/kernels``), keyed by the source, the flags, the compiler,
torch and the CPU's feature flags (``-march=native`` code must not run on another
CPU). The library is written to a temporary file and renamed into place, so
concurrent builds (e.g. DDP ranks) are safe; a cached library that fails to load is
rebuilt. Integrity: each build records the library's size and SHA-256 in a sidecar
(``dropkey_cpu.so.sha256.json``, written atomically after the library), and a cached library
is loaded only when it is a regular file owned by this user, not writable by group or
others, and matches its sidecar; anything else (truncated, planted, replaced, no sidecar)
is rebuilt, never loaded, so a truncated file never reaches ``ctypes.CDLL``. A cache
folder that another user owns or could write to (or one under a folder others can write
without the sticky bit) is not used at all: the kernel is built into a fresh private
temporary folder for this process instead, with a warning (:mod:`dropkey.kernels.kernel_cache`,
docs/attention.md). Set ``DROPKEY_LAB_CPP=0`` to disable the kernel. When it cannot be
built (no compiler, no OpenMP, a torch without ``sgemm_``) :func:`cpp_available`
is False, the reason is logged once and kept in :func:`cpp_unavailable_reason`,
``backend="auto"`` falls back to ``fused`` and ``backend="cpp"`` raises
:class:`CppKernelUnavailableError`.

Scope: CPU float32 tensors with head dims >= 1 (other dtypes: the ``fused``
backend). Any strides are read in place as long as the feature dim has unit
stride. Threads: ``torch.get_num_threads()``; the forward splits work over
(batch x head, query tile) pairs, the backward over batch x head slices only, so
the backward of a single slice runs on one thread. Results are bit-identical
whatever the thread count. The kernel is registered as two torch custom ops
(``dropkey_lab::cpp_dropkey_forward`` / ``_backward``) with autograd and fake
(shape) implementations, and its seed travels as a tensor, so :func:`torch.compile`
keeps it in the graph (``fullgraph=True`` works with the global RNG); eager calls run
the same two functions through a plain autograd function, skipping torch.library's
dispatch (about 0.15 ms per call).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

import torch

from dropkey.kernels import hash_mask
from dropkey.kernels.fused import as_4d
from dropkey.kernels.hash_mask import hash_drop_mask, hash_threshold
from dropkey.kernels.kernel_cache import install_library, private_folder, verified_library
from dropkey.reference import KERNEL_CONVENTION_CODES, reference_masked_attention
from theory.conventions import DEFAULT, check_all_dropped

logger = logging.getLogger(__name__)

__all__ = [
    "CONVENTION_CODES",
    "CppKernelUnavailableError",
    "SOURCE",
    "cpp_attention",
    "cpp_available",
    "cpp_unavailable_reason",
    "kernel_library_path",
    "seed_tensor",
]

SOURCE = Path(__file__).with_name("dropkey_cpu.cpp")
CONVENTION_CODES = KERNEL_CONVENTION_CODES
# -march/-mcpu=native: the cache key includes the CPU. On x86, 512-bit vectors where the CPU has
# them (GCC and clang otherwise prefer 256 bits): the hash, exp and reductions run 16 lanes wide.
_FLAGS = ("-O3", "-fopenmp", "-fPIC", "-shared", "-std=c++17") + (
    ("-march=native", "-mprefer-vector-width=512")
    if platform.machine().lower() in ("x86_64", "amd64", "i686", "i386")
    else ("-mcpu=native",)
)
_DISABLE_ENV = "DROPKEY_LAB_CPP"
_CACHE_ENV = "DROPKEY_LAB_KERNEL_CACHE"


class CppKernelUnavailableError(RuntimeError):
    """``backend="cpp"`` was asked for but the C++ kernel could not be built or loaded."""


class _Strides(ctypes.Structure):
    _fields_ = [("b", ctypes.c_int64), ("h", ctypes.c_int64), ("n", ctypes.c_int64)]


class _Shape(ctypes.Structure):
    _fields_ = [
        ("batch", ctypes.c_int64),
        ("heads", ctypes.c_int64),
        ("nq", ctypes.c_int),
        ("nk", ctypes.c_int),
        ("d", ctypes.c_int),
        ("dv", ctypes.c_int),
    ]


# --------------------------------------------------------------------------- build and load


def _torch_lib_dir() -> Path:
    return Path(torch.__file__).parent / "lib"


def _compiler() -> Optional[str]:
    for name in filter(None, (os.environ.get("CXX"), "c++", "g++", "clang++")):
        path = shutil.which(name)
        if path:
            return path
    return None


def _cpu_identity() -> str:
    """The CPU's model and feature flags (Linux) or the platform string: what -march=native depends on."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.platform() + platform.processor()
    lines = [line for line in text.splitlines() if line.startswith(("flags", "model name", "Features", "CPU part"))]
    return "\n".join(sorted(set(lines)))


def _compiler_version(compiler: str) -> str:
    try:
        done = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as error:
        return f"unknown ({error})"
    return done.stdout.strip()


def _cache_root() -> Path:
    configured = os.environ.get(_CACHE_ENV)
    if configured:
        return Path(configured)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dropkey-lab" / "kernels"


def kernel_library_path(compiler: Optional[str] = None) -> Path:
    """Where the compiled kernel for this source, compiler, torch and CPU lives (built or not)."""
    compiler = compiler or _compiler() or "none"
    key = hashlib.sha256()
    for part in (SOURCE.read_bytes(), " ".join(_FLAGS).encode(), _compiler_version(compiler).encode(),
                 torch.__version__.encode(), str(_torch_lib_dir()).encode(), _cpu_identity().encode(),
                 sys.platform.encode()):
        key.update(part)
        key.update(b"\0")
    return _cache_root() / key.hexdigest()[:24] / "dropkey_cpu.so"


def _build(compiler: str, target: Path) -> None:
    """Compile SOURCE into ``target`` (atomically), then record its digest beside it (atomically);
    raises CppKernelUnavailableError with the compiler's output."""
    target.parent.mkdir(parents=True, exist_ok=True)
    lib = _torch_lib_dir()
    handle, temporary = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(handle)
    command = [compiler, *_FLAGS, str(SOURCE), "-o", temporary, f"-L{lib}", "-ltorch_cpu", f"-Wl,-rpath,{lib}"]
    logger.info("compiling the DropKey CPU kernel: %s", " ".join(command))
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            raise CppKernelUnavailableError(
                f"compiling {SOURCE.name} failed ({' '.join(command)}):\n{(done.stdout + done.stderr)[-4000:]}"
            )
        os.chmod(temporary, 0o755)  # whatever the umask: group or others must not be able to write it
        install_library(temporary, target)
    except (OSError, subprocess.SubprocessError) as error:
        raise CppKernelUnavailableError(f"compiling {SOURCE.name} with {compiler} failed: {error}") from error
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


def _bind(library: ctypes.CDLL) -> ctypes.CDLL:
    pointer, strides, shape = ctypes.c_void_p, _Strides, _Shape
    scalars = [ctypes.c_float, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_int, ctypes.c_int]
    library.dropkey_cpu_forward.argtypes = [pointer, strides] * 4 + [pointer, shape] + scalars
    library.dropkey_cpu_forward.restype = ctypes.c_int
    library.dropkey_cpu_backward.argtypes = (
        [pointer, strides] * 4 + [pointer] + [pointer, strides] * 4 + [shape] + scalars
    )
    library.dropkey_cpu_backward.restype = ctypes.c_int
    return library


@functools.lru_cache(maxsize=1)
def _load() -> tuple[Optional[ctypes.CDLL], str]:
    """(library, "") or (None, why not). Builds on a cache miss; rebuilds a cached library that fails to load."""
    if os.environ.get(_DISABLE_ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return None, f"disabled by {_DISABLE_ENV}={os.environ[_DISABLE_ENV]}"
    compiler = _compiler()
    if compiler is None:
        return None, "no C++ compiler found (set CXX, or install g++ or clang++)"
    try:
        target = kernel_library_path(compiler)
        problem = private_folder(target.parent)
        if problem is not None:
            logger.warning(
                "the kernel cache %s is not private (%s): building the DropKey CPU kernel into a fresh private "
                "folder for this process instead (set %s to a folder only you can write)", target.parent, problem,
                _CACHE_ENV,
            )
            return _load_private(compiler, target.name), ""
        for attempt in range(2):
            if not verified_library(target):
                _build(compiler, target)
            try:
                return _bind(ctypes.CDLL(str(target))), ""
            except (OSError, AttributeError) as error:
                if attempt:
                    raise CppKernelUnavailableError(f"loading {target} failed: {error}") from error
                logger.warning("cached DropKey CPU kernel %s does not load (%s); rebuilding", target, error)
                target.unlink(missing_ok=True)
    except (CppKernelUnavailableError, OSError) as error:
        logger.warning("the DropKey C++ CPU kernel is unavailable (backend='auto' uses 'fused'): %s", error)
        return None, str(error)
    raise AssertionError("unreachable")  # pragma: no cover


def _load_private(compiler: str, name: str) -> ctypes.CDLL:
    """Build into a fresh folder only this user can read (``mkdtemp``: mode 0700), load, then remove it
    (the loaded library stays mapped)."""
    folder = Path(tempfile.mkdtemp(prefix="dropkey-kernel-"))
    try:
        target = folder / name
        _build(compiler, target)
        try:
            return _bind(ctypes.CDLL(str(target)))
        except (OSError, AttributeError) as error:
            raise CppKernelUnavailableError(f"loading {target} failed: {error}") from error
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@torch.compiler.assume_constant_result  # a tracer calls it once and keeps the answer
def cpp_available() -> bool:
    """True when the C++ kernel is built (or cached) and loads; the first call may compile it (about 2 s)."""
    return _load()[0] is not None


def cpp_unavailable_reason() -> str:
    """Why :func:`cpp_available` is False ("" when it is True)."""
    return _load()[1]


def _unavailable() -> CppKernelUnavailableError:
    return CppKernelUnavailableError(
        f"backend='cpp' needs the C++ CPU kernel, which is unavailable: {cpp_unavailable_reason()}"
    )


def _library() -> ctypes.CDLL:
    library = _load()[0]
    if library is None:
        raise _unavailable()
    return library


# --------------------------------------------------------------------------- autograd


def _readable(t: torch.Tensor) -> torch.Tensor:
    """``t`` (B, H, N, d) if BLAS can read its rows in place (unit feature stride, row stride >= d and
    within BLAS's 32-bit leading dimension), else a copy."""
    if t.stride(-1) == 1 and (t.shape[-2] <= 1 or t.shape[-1] <= t.stride(-2) < 2**31):
        return t
    return t.contiguous()


def _strides(t: torch.Tensor) -> _Strides:
    # a single-row tensor's row stride is never used and may be anything; BLAS wants one >= d
    return _Strides(t.stride(0), t.stride(1), t.stride(2) if t.shape[2] > 1 else t.shape[3])


# The kernel as two torch custom ops (forward, backward) with autograd: torch.compile and
# other tracers see opaque ops with known output shapes instead of a ctypes call, so a
# compiled model keeps the kernel without a graph break. The seed travels as a tensor (read
# inside the op), so drawing it needs no host sync (``.item()``) in the traced code either.
# Outputs live in (batch, N, heads, d) memory and are returned as such (the caller
# transposes): what a ViT's transpose(1, 2).reshape and a fused qkv's backward want.


def _forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seed: torch.Tensor, threshold: int, scale: float, convention: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out (B, Nq, H, dv), lse (B, H, Nq)) from q, k, v (B, H, N, d): one kernel call."""
    q, k, v = _readable(q), _readable(k), _readable(v)
    batch, heads, nq, d = q.shape
    nk, dv = k.shape[-2], v.shape[-1]
    out_bnhd = torch.empty(batch, nq, heads, dv, dtype=torch.float32)
    out = out_bnhd.transpose(1, 2)
    lse = torch.empty(batch, heads, nq, dtype=torch.float32)
    status = _library().dropkey_cpu_forward(
        q.data_ptr(), _strides(q), k.data_ptr(), _strides(k), v.data_ptr(), _strides(v), out.data_ptr(), _strides(out),
        lse.data_ptr(), _Shape(batch, heads, nq, nk, d, dv), scale, hash_mask.seed_word(seed), threshold, convention,
        torch.get_num_threads(),
    )
    if status != 0:  # the Python side validates first: this is a bug, not bad input
        raise RuntimeError(f"dropkey_cpu_forward rejected its arguments (shape {tuple(q.shape)}, {tuple(k.shape)})")
    return out_bnhd, lse


@torch.library.custom_op("dropkey_lab::cpp_dropkey_forward", mutates_args=(), device_types="cpu")
def _forward_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seed: torch.Tensor, threshold: int, scale: float, convention: int
) -> tuple[torch.Tensor, torch.Tensor]:
    return _forward(q, k, v, seed, threshold, scale, convention)


@_forward_op.register_fake
def _forward_shapes(q, k, v, seed, threshold, scale, convention):  # type: ignore[no-untyped-def]
    batch, heads, nq, _ = q.shape
    return q.new_empty(batch, nq, heads, v.shape[-1]), q.new_empty(batch, heads, nq)


def _backward(
    grad_bnhd: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out_bnhd: torch.Tensor,
    lse: torch.Tensor, seed: torch.Tensor, threshold: int, scale: float, convention: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv), each (B, N, H, d), from the gradient of the forward's (B, Nq, H, dv) output."""
    q, k, v = _readable(q), _readable(k), _readable(v)
    out, grad, lse = out_bnhd.transpose(1, 2), _readable(grad_bnhd.transpose(1, 2)), lse.contiguous()
    batch, heads, nq, d = q.shape
    nk, dv = k.shape[-2], v.shape[-1]
    grads = [torch.empty(batch, n, heads, size, dtype=torch.float32) for n, size in ((nq, d), (nk, d), (nk, dv))]
    grad_q, grad_k, grad_v = (g.transpose(1, 2) for g in grads)
    status = _library().dropkey_cpu_backward(
        q.data_ptr(), _strides(q), k.data_ptr(), _strides(k), v.data_ptr(), _strides(v), out.data_ptr(), _strides(out),
        lse.data_ptr(), grad.data_ptr(), _strides(grad), grad_q.data_ptr(), _strides(grad_q),
        grad_k.data_ptr(), _strides(grad_k), grad_v.data_ptr(), _strides(grad_v),
        _Shape(batch, heads, nq, nk, d, dv), scale, hash_mask.seed_word(seed), threshold, convention,
        torch.get_num_threads(),
    )
    if status != 0:
        raise RuntimeError(f"dropkey_cpu_backward rejected its arguments (shape {tuple(q.shape)}, {tuple(k.shape)})")
    return grads[0], grads[1], grads[2]


@torch.library.custom_op("dropkey_lab::cpp_dropkey_backward", mutates_args=(), device_types="cpu")
def _backward_op(
    grad_bnhd: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out_bnhd: torch.Tensor,
    lse: torch.Tensor, seed: torch.Tensor, threshold: int, scale: float, convention: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward(grad_bnhd, q, k, v, out_bnhd, lse, seed, threshold, scale, convention)


@_backward_op.register_fake
def _backward_shapes(grad_bnhd, q, k, v, out_bnhd, lse, seed, threshold, scale, convention):  # type: ignore[no-untyped-def]
    batch, heads, nq, d = q.shape
    nk, dv = k.shape[-2], v.shape[-1]
    return q.new_empty(batch, nq, heads, d), q.new_empty(batch, nk, heads, d), q.new_empty(batch, nk, heads, dv)


def _save(ctx, inputs, output) -> None:  # type: ignore[no-untyped-def]
    """What both autograd paths keep: q, k, v, the output, the lse and the seed (no N x N state)."""
    q, k, v, seed, threshold, scale, convention = inputs
    out_bnhd, lse = output
    ctx.save_for_backward(q, k, v, out_bnhd, lse, seed)
    ctx.args = (threshold, scale, convention)


def _input_grads(ctx, grad_bnhd, backward):  # type: ignore[no-untyped-def]
    """Gradients of (q, k, v, seed, threshold, scale, convention) by ``backward`` (the op or the plain function)."""
    q, k, v, out_bnhd, lse, seed = ctx.saved_tensors
    grad_q, grad_k, grad_v = backward(grad_bnhd, q, k, v, out_bnhd, lse, seed, *ctx.args)
    return grad_q.transpose(1, 2), grad_k.transpose(1, 2), grad_v.transpose(1, 2), None, None, None, None


def _setup_context(ctx, inputs, output) -> None:  # type: ignore[no-untyped-def]
    _save(ctx, inputs, output)
    ctx.mark_non_differentiable(output[1])  # lse


_forward_op.register_autograd(
    lambda ctx, grad_bnhd, grad_lse: _input_grads(ctx, grad_bnhd, _backward_op), setup_context=_setup_context
)


class _EagerDropKey(torch.autograd.Function):
    """The same forward and backward without torch.library's dispatch, which costs about 0.15 ms per
    attention call: what eager code runs (the custom ops are what tracers see)."""

    @staticmethod
    def forward(ctx, *inputs):  # type: ignore[no-untyped-def, override]
        output = _forward(*inputs)
        _save(ctx, inputs, output)
        return output[0]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_bnhd):  # type: ignore[no-untyped-def, override]
        return _input_grads(ctx, grad_bnhd, _backward)


def seed_tensor(seed: "int | torch.Tensor") -> torch.Tensor:
    """A hash seed (an int in [0, 2**64), or a one-element int64 CPU tensor such as
    :func:`~dropkey.kernels.hash_seed_tensor` draws) as the kernel's one-element int64 tensor."""
    if isinstance(seed, torch.Tensor) and seed.device.type != "cpu":
        raise ValueError(f"seed must be an int or a one-element int64 CPU tensor, got a tensor on {seed.device}")
    return hash_mask.seed_tensor(seed)


def cpp_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    drop_ratio: float,
    *,
    seed: "int | torch.Tensor",
    all_dropped: str = DEFAULT,
    scale: Optional[float] = None,
) -> torch.Tensor:
    """DropKey attention by the C++ CPU kernel with the hash mask of ``seed``: (..., Nq, dv).

    ``seed``: an int in [0, 2**64) or a one-element int64 CPU tensor holding it (two's
    complement above 2**63), as :func:`~dropkey.kernels.hash_seed_tensor` draws it.

    q (..., Nq, d), k (..., Nk, d), v (..., Nk, dv): float32 CPU tensors with
    the same leading dims. Equals the ``reference`` backend on
    ``hash_drop_mask(seed, (..., Nq, Nk), drop_ratio)``, values and gradients.
    Prefer ``dropkey_attention(..., backend="cpp")``, which validates q, k, v
    and draws ``seed`` from a generator. Raises :class:`CppKernelUnavailableError`
    when the kernel cannot be built.
    """
    convention = check_all_dropped(all_dropped)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.device.type != "cpu" or t.dtype != torch.float32:
            raise ValueError(
                f"backend='cpp' runs on CPU float32 tensors; {name} is {t.dtype} on {t.device} "
                "(use backend='fused' for other dtypes, 'triton' or 'sdpa' on CUDA)"
            )
    seed_value = seed_tensor(seed)
    threshold = hash_threshold(drop_ratio)
    scale_value = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    lead, nq, nk = tuple(q.shape[:-2]), q.shape[-2], k.shape[-2]
    if min(q.numel(), k.numel(), v.numel()) == 0:
        # degenerate sizes (no query, no feature): the specification computes them exactly
        keep = hash_drop_mask(seed_value, (*lead, nq, nk), drop_ratio).logical_not_()
        return reference_masked_attention(q, k, v, keep, convention, scale_value)
    if not cpp_available():  # before anything is recorded
        raise _unavailable()
    args = (as_4d(q, lead), as_4d(k, lead), as_4d(v, lead), seed_value, threshold, scale_value,
            CONVENTION_CODES[convention])
    if torch.compiler.is_compiling():
        out = _forward_op(*args)[0]  # (batch, Nq, heads, dv)
    else:
        out = _EagerDropKey.apply(*args)
    return out.transpose(1, 2).reshape(*lead, nq, v.shape[-1])
