"""Fused DropKey kernels: a Triton FlashAttention-2 kernel, a C++ CPU kernel and their hash mask.

Fused Triton backend (``backend="triton"``)
--------------------------------------------
``dropkey_attention(q, k, v, r, backend="triton")`` runs DropKey inside a fused
FlashAttention-2-style Triton kernel (forward and backward, online softmax, the
attention weights recomputed in the backward): each score tile has its dropped
logits set to -inf before the running row maximum, with no rescale, and rows
whose keys are all dropped follow ``all_dropped`` ("zero", "uniform",
"undropped"), with exact gradients. The drop mask is never stored, not even as
bits: it is a pure function of (seed, slice, query, key), a counter-based hash
(MurmurHash3's 32-bit finaliser; :mod:`dropkey.kernels.hash_mask`) compared
with ``round(r * 2**24)``, so only O(N) per (batch, head) is kept for the
backward and no N x N state at all. The seed is drawn from ``generator`` with
one ``torch.randint`` call (an int seed or ``torch.manual_seed`` makes runs
reproducible). On CUDA, ``backend="auto"`` picks this kernel whenever triton is
importable (float16, bfloat16, float32), and SDPA with a boolean mask
otherwise. The other backends can use the very same mask with
``mask="hash"`` -- e.g. ``dropkey_attention(q, k, v, r, generator=7,
backend="reference", mask="hash")`` equals ``backend="triton"`` with
``generator=7`` up to float rounding -- which is how the kernel is tested
(on CPU, through the Triton interpreter: ``TRITON_INTERPRET=1``); and
:mod:`dropkey.kernels.triton_aot` compiles it for named GPU architectures on a
machine without a GPU (Triton's compiler and ptxas: registers, spills, shared
memory, tensor-core use), which the interpreter cannot check. Triton is an
optional dependency: ``pip install "dropkey-lab[triton]"``; without it
everything else works and ``backend="triton"`` raises
:class:`TritonUnavailableError`. Under ``torch.compile`` the kernel call is a
graph break.

Fused C++ CPU backend (``backend="cpp"``)
------------------------------------------
``dropkey_attention(q, k, v, r, backend="cpp")`` runs DropKey in one C++ kernel on
CPU float32 tensors (:mod:`dropkey.kernels.cpu_kernel`, source
``dropkey_cpu.cpp``): tiles of query rows through torch's own BLAS, the same hash
mask drawn inline and recomputed in the backward, only the row log-sum-exp kept.
It is compiled with the system C++ compiler at first use (about a second) and
cached; on CPU, ``backend="auto"`` picks it for float32 whenever it builds and
falls back to the ``fused`` backend (Bernoulli mask) otherwise. Like ``triton``
it always uses ``mask="hash"``, so ``backend="reference", mask="hash"`` is its
exact specification. It is registered as torch custom ops with its seed drawn as a
tensor, so :func:`torch.compile` keeps it inside the graph.

Public names: :func:`hash_drop_mask`, :func:`hash_seed`, :func:`hash_seed_tensor`, :func:`hash_threshold`,
:data:`HASH_BITS` (pure torch, always importable), :func:`triton_available`,
:func:`triton_attention` and :class:`TritonUnavailableError`; :func:`cpp_available`,
:func:`cpp_attention` and :class:`CppKernelUnavailableError`. The kernels
themselves live in :mod:`dropkey.kernels.triton_dropkey` (imported only when
used; importing it requires triton).
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Optional

from dropkey.kernels.cpu_kernel import CppKernelUnavailableError, cpp_attention, cpp_available
from dropkey.kernels.hash_mask import HASH_BITS, hash_drop_mask, hash_seed, hash_seed_tensor, hash_threshold

if TYPE_CHECKING:
    import torch

__all__ = [
    "CppKernelUnavailableError",
    "HASH_BITS",
    "TritonUnavailableError",
    "cpp_attention",
    "cpp_available",
    "hash_drop_mask",
    "hash_seed",
    "hash_seed_tensor",
    "hash_threshold",
    "triton_attention",
    "triton_available",
]

INSTALL_HINT = 'pip install "dropkey-lab[triton]" (or pip install triton)'


class TritonUnavailableError(RuntimeError):
    """``backend="triton"`` was asked for but the ``triton`` package cannot be imported."""


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    """True when ``import triton`` works (cached)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def triton_attention(
    q: "torch.Tensor",
    k: "torch.Tensor",
    v: "torch.Tensor",
    drop_ratio: float,
    *,
    seed: int,
    all_dropped: str = "uniform",
    scale: Optional[float] = None,
) -> "torch.Tensor":
    """DropKey attention by the fused Triton kernels with the hash mask of ``seed`` (an int in [0, 2**64)).

    Equals the reference backend on ``hash_drop_mask(seed, (..., Nq, Nk),
    drop_ratio)``, values and gradients. Prefer ``dropkey_attention(...,
    backend="triton")``, which validates its inputs and draws ``seed`` from a
    generator. Raises :class:`TritonUnavailableError` without triton.
    """
    try:
        from dropkey.kernels import triton_dropkey
    except ImportError as error:
        raise TritonUnavailableError(f"backend='triton' needs the triton package: {INSTALL_HINT}") from error
    return triton_dropkey.triton_dropkey_attention(q, k, v, drop_ratio, seed=seed, all_dropped=all_dropped, scale=scale)
