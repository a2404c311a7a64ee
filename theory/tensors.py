"""Torch tensors in, torch tensors out, without importing torch.

The numeric API computes in float64 numpy. A torch tensor argument (any float or
integer dtype, any device) is detected duck-typed through ``sys.modules``: if torch
was never imported, nothing can be a tensor, so :mod:`theory` never imports torch
itself (the layering rule: theory depends on numpy, scipy, sympy and mpmath only).
The tensor is detached, copied to the CPU as float64 and computed on; the result
goes back as a **float64** tensor on the input's device. Float64 because that is
the precision of the result (about 1e-13 relative): casting to a float32 input's
dtype would silently discard it; callers who want the input's dtype write
``.to(p.dtype)``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import numpy as np


def torch_tensor_device(value: object) -> object | None:
    """The device of ``value`` if it is a torch tensor, else None (torch is never imported here)."""
    torch = sys.modules.get("torch")
    if torch is None or not isinstance(value, torch.Tensor):
        return None
    return value.device


def to_numpy(value: object, *, name: str = "p") -> tuple[object, Callable[[np.ndarray], object]]:
    """``(array_like, restore)``: a torch tensor becomes a float64 numpy array on the CPU and
    ``restore`` turns a numpy result into a float64 tensor on its device; anything else
    passes through unchanged, with ``restore`` the identity."""
    device = torch_tensor_device(value)
    if device is None:
        return value, _identity
    torch = sys.modules["torch"]
    if value.dtype == torch.bool or value.is_complex():
        raise ValueError(f"{name} must hold real numbers, got dtype {value.dtype}")
    array = value.detach().to(device="cpu", dtype=torch.float64).numpy()

    def restore(result: np.ndarray) -> object:
        return torch.as_tensor(result, dtype=torch.float64).to(device)

    return array, restore


def _identity(result: np.ndarray) -> np.ndarray:
    return result
