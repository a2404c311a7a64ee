"""Fused DropKey kernels and their hash mask.

- ``backend="triton"``: fused FlashAttention-2-style Triton kernels (CUDA; the interpreter on
  CPU for tests), :mod:`dropkey.kernels.triton_dropkey`, imported only when used; needs
  ``pip install "dropkey-lab[triton]"`` (else :class:`TritonUnavailableError`);
- ``backend="cpp"``: one fused C++ CPU kernel for float32 (:mod:`dropkey.kernels.cpu_kernel`,
  compiled at first use and cached; else :class:`CppKernelUnavailableError`);
- both draw the counter-based hash mask of :mod:`dropkey.kernels.hash_mask` inside the kernel,
  so ``mask="hash"`` on any other backend is their exact specification;
- the ``fused`` backend's chunked paths: :mod:`dropkey.kernels.fused` (matmuls, any device) and
  :mod:`dropkey.kernels.fused_flash` (torch's CPU flash kernels).

How they work and why: docs/attention.md.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Optional

from dropkey.kernels.cpu_kernel import CppKernelUnavailableError, cpp_attention, cpp_available
from dropkey.kernels.hash_mask import HASH_BITS, hash_drop_mask, hash_seed, hash_seed_tensor, hash_threshold
from theory.conventions import DEFAULT

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
    all_dropped: str = DEFAULT,
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
