"""The specification every attention backend is tested against: masked softmax with the all-dropped fallback.

:func:`masked_softmax` is the torch home of the masked softmax (numpy's is
:func:`theory.conventions.renormalise_kept`); :func:`reference_masked_attention` is
``masked_softmax(q k^T * scale, keep) @ v``, the ``reference`` backend. The argument checks of
the attention ops (q, k, v, scale, keep masks) live here too, so that the dispatcher
(:mod:`dropkey.functional`) and the kernels (:mod:`dropkey.kernels`) share them without
importing each other. docs/theory.md section 1 defines the all-dropped conventions.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from theory.checks import check_bool, check_real
from theory.conventions import ALL_DROPPED_CONVENTIONS, DEFAULT, check_all_dropped

__all__ = [
    "ALL_DROPPED_CONVENTIONS",
    "DEFAULT",
    "HALF",
    "KERNEL_CONVENTION_CODES",
    "check_input",
    "check_keep",
    "check_qkv",
    "check_scale",
    "check_training",
    "masked_softmax",
    "reference_attention_output",
    "reference_logits",
    "reference_masked_attention",
]

#: Dtypes whose softmax is computed in float32.
HALF = (torch.float16, torch.bfloat16)
#: The integer codes of the conventions in the compiled kernels (``dropkey_cpu.cpp`` and the Triton kernels).
KERNEL_CONVENTION_CODES = {"zero": 0, "uniform": 1, "undropped": 2}


def check_qkv(q: object, k: object, v: object) -> None:
    """q (..., Nq, d), k (..., Nk, d), v (..., Nk, dv): floating tensors of one dtype and device, Nk >= 1."""
    for name, tensor in (("q", q), ("k", k), ("v", v)):
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
        if not tensor.is_floating_point():
            raise ValueError(
                f"{name} must have a floating dtype (float16, bfloat16, float32, float64), got {tensor.dtype}"
            )
        if tensor.dim() < 2:
            raise ValueError(f"{name} must have shape (..., N, d) with at least 2 dims, got {tuple(tensor.shape)}")
    assert isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor) and isinstance(v, torch.Tensor)
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k must share the feature size d: q {tuple(q.shape)}, k {tuple(k.shape)}")
    if k.shape[-2] != v.shape[-2]:
        raise ValueError(f"k and v must have the same number of keys Nk: k {tuple(k.shape)}, v {tuple(v.shape)}")
    if k.shape[-2] == 0:
        raise ValueError(f"k and v must have at least one key (Nk >= 1), got k {tuple(k.shape)}")
    if q.shape[-1] == 0:
        raise ValueError(f"q and k must have a feature size d >= 1 (the logits are q . k), got q {tuple(q.shape)}")
    if not (q.shape[:-2] == k.shape[:-2] == v.shape[:-2]):
        raise ValueError(
            f"q, k, v must share their leading (batch, head) dims: {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )


def check_input(x: object, name: str, shape: tuple[Optional[int], ...], layout: str) -> torch.Tensor:
    """A floating tensor with ``len(shape)`` dims whose sizes equal ``shape``'s (None: any size);
    ``layout`` names the dims in the message, e.g. ``"(B, N, C)"``."""
    fits = isinstance(x, torch.Tensor) and x.is_floating_point() and x.dim() == len(shape)
    if not fits or any(want is not None and got != want for got, want in zip(x.shape, shape, strict=True)):
        got = f"{x.dtype} of shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        wanted = ", ".join("*" if size is None else str(size) for size in shape)
        raise ValueError(f"{name} must be a floating tensor {layout} = ({wanted}), got {got}")
    return x


def check_scale(scale: object, q: torch.Tensor) -> float:
    """The logit scale: ``1 / sqrt(d)`` for None, else a positive finite real number."""
    if scale is None:
        return 1.0 / math.sqrt(q.shape[-1])
    return check_real(scale, "scale", 0.0, None, low_open=True)


def check_training(training: object) -> bool:
    return check_bool(training, "training")


def check_keep(keep: object, target: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """A bool keep mask (True = kept) broadcastable to ``target`` on ``device``."""
    if not isinstance(keep, torch.Tensor) or keep.dtype != torch.bool:
        got = keep.dtype if isinstance(keep, torch.Tensor) else type(keep).__name__
        raise ValueError(f"keep must be a torch.bool tensor (True = kept), got {got}")
    try:
        broadcast = torch.broadcast_shapes(keep.shape, target)
    except RuntimeError:
        broadcast = None
    if broadcast != torch.Size(target):
        raise ValueError(f"keep of shape {tuple(keep.shape)} must be broadcastable to the logits' shape {target}")
    if keep.device != device:
        raise ValueError(f"keep must be on the device of the inputs ({device}), got {keep.device}")
    return keep


def masked_softmax(logits: torch.Tensor, keep: Optional[torch.Tensor], *, all_dropped: str = DEFAULT) -> torch.Tensor:
    """Softmax over the last dim restricted to the entries with ``keep == True``.

    logits: (..., N) floating tensor. keep: bool tensor broadcastable to ``logits``
    (True = kept), or None (keep all: plain softmax). Rows without a kept entry
    follow ``all_dropped`` ("zero": 0, "uniform": 1/N, "undropped": plain softmax).
    A NaN logit makes its row NaN even where ``keep`` drops it (NaN in, NaN out).
    Half dtypes are computed in float32 and returned in the input dtype. Never NaN
    for finite logits; differentiable (dropped entries get zero gradient).
    """
    convention = check_all_dropped(all_dropped)
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point():
        got = logits.dtype if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"logits must be a floating torch.Tensor, got {got}")
    if logits.dim() < 1:
        raise ValueError("logits must have at least one dim (..., N)")
    work = logits.float() if logits.dtype in HALF else logits
    if keep is None:
        return torch.softmax(work, dim=-1).to(logits.dtype)
    keep = check_keep(keep, tuple(logits.shape), logits.device)
    keep = keep.expand(*keep.shape[:-1], logits.shape[-1])
    alive = keep.any(dim=-1, keepdim=True)  # (..., 1) broadcastable to logits
    safe = keep | ~alive  # all-dropped rows: keep everything (no empty softmax)
    # a dropped NaN logit stays NaN (NaN in, NaN out: the mask never hides it, as in SDPA and the kernels)
    weights = torch.softmax(work.masked_fill(~safe & ~torch.isnan(work), float("-inf")), dim=-1)
    if convention == "zero":
        weights = weights.masked_fill(~alive, 0.0)
    elif convention == "uniform":
        uniform = torch.full((), 1.0 / logits.shape[-1], dtype=weights.dtype, device=weights.device)
        weights = torch.where(alive, weights, uniform)
    return weights.to(logits.dtype)


def reference_logits(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """``(q @ k^T) * scale``, the reference order of operations; float32 for half dtypes.

    Half inputs are multiplied in float32 (the softmax runs in float32 anyway): a float16 product
    overflows at |q . k| > 65504, i.e. at scaled logits of about 3e4 for d = 4, where every other
    backend (which accumulates in float32) is still exact. The weights come back in the input dtype
    through :func:`reference_attention_output`.
    """
    if q.dtype in HALF:
        return torch.matmul(q.float(), k.float().transpose(-2, -1)) * scale
    return torch.matmul(q, k.transpose(-2, -1)) * scale


def reference_attention_output(weights: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``weights @ v`` in v's dtype (weights from :func:`reference_logits` are float32 for half inputs)."""
    return weights.to(v.dtype).matmul(v)


def reference_masked_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor, convention: str, scale: float
) -> torch.Tensor:
    """``masked_softmax(q k^T * scale, keep) @ v`` on checked inputs: the ``reference`` backend."""
    return reference_attention_output(masked_softmax(reference_logits(q, k, scale), keep, all_dropped=convention), v)
