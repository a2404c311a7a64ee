"""DropKey attention: exact, NaN-free and fast (Li et al., "DropKey for Vision Transformer", CVPR 2023).

During training every attention logit ``(..., query, key)`` is dropped independently
with probability ``drop_ratio`` (set to -inf before the softmax), with no rescaling:

    w_j = b_j p_j / sum_k b_k p_k,   b_j ~ Bernoulli(1 - drop_ratio),   o = sum_j w_j v_j.

A row whose keys are all dropped (probability ``r ** Nk``) follows a named
convention (``all_dropped``):

- ``zero``: weights 0, output 0;
- ``uniform`` (default): weights 1/Nk on every key, output mean_j v_j (what the
  paper's code does by accident in float32/bfloat16);
- ``undropped``: the plain softmax of the row, as if nothing were dropped.

No convention ever produces NaN, in any floating dtype, for finite q, k, v.

Backends (one function, several paths, all exact and tested against ``reference``):

``reference``
    The specification: materialise the bool keep mask, ``logits.masked_fill(~keep,
    -inf)``, softmax (float32 for half dtypes), fix all-dropped rows, ``@ v``. Plain
    torch autograd.
``sdpa``
    :func:`torch.nn.functional.scaled_dot_product_attention` with a boolean
    ``attn_mask`` (True = takes part). All-dropped rows are first given a full row
    of True (so SDPA never sees an empty row, whose output is NaN/garbage on CPU)
    and then fixed exactly: ``zero`` -> 0, ``uniform`` -> mean of v over keys,
    ``undropped`` -> the SDPA output itself (plain attention of that row).
``fused``
    On CPU (float32, float64, float16, bfloat16): torch's CPU flash-attention
    kernels (``aten::_scaled_dot_product_flash_attention_for_cpu`` and its backward,
    the ones ``F.scaled_dot_product_attention`` runs without a mask), given the
    DropKey mask as an additive bias of exactly 0.0 / -inf in the query's dtype, one
    chunk of (batch, head) slices at a time (sized so that a chunk's bias and its
    copy of the output take at most 0.6 byte per logit of the whole input, beyond a
    floor of 2**17 logits, and at most 2**20 logits).
    In :func:`dropkey_attention` the mask is drawn from a
    :class:`~dropkey.masks.BernoulliStream` (the very flags
    :func:`~dropkey.masks.dropkey_keep_mask` would draw from the same generator
    state) in bounded pieces and bit-packed at once: the whole bool mask never
    exists, and the only N x N state kept for backward is 1 bit per logit (plus the
    kernel's log-sum-exp, one float per row). Each chunk's bias is expanded from the
    packed bytes through a 256 x 8 table (one ``index_select``), in forward and again
    in backward. All-dropped rows are found while drawing (for rows of >= 15 keys
    only where a packed byte is 0xFF: at r = 0.1 practically never), given a row of
    0.0 bias (so the kernel never sees an empty row), and their output is rewritten
    per convention; backward zeroes their incoming gradient for ``zero`` and
    ``uniform`` (their output does not depend on the logits) and adds ``uniform``'s
    1/Nk share to dv. A head size d of q, k different from v's is zero-padded to one
    size (exact). A given mask (:func:`attention_from_keep_mask`: DropAttention,
    Block, Cross) becomes the bias by two vectorised integer passes (uint8 -> int
    copy, multiply by the bit pattern of -inf) and is what backward keeps.
    Elsewhere (other devices, other dtypes, empty inputs) the same custom-autograd
    structure runs on plain matmuls: per chunk ``baddbmm(bias, q, k^T)``, an
    in-place softmax (float32 for half dtypes), ``@ v``; all-dropped rows found from
    the NaN they leave; backward recomputes each chunk's weights and uses
    ``dlogits = w * (g v^T - rowsum(g * o))``. Under :func:`torch.compile` the same
    maths runs as plain differentiable ops (on a materialised bool mask).
``triton``
    Fused FlashAttention-2-style Triton kernels (forward and backward, online
    softmax, recomputation in backward; :mod:`dropkey.kernels.triton_dropkey`). The
    mask is never stored: each tile recomputes it from a counter-based hash of
    (seed, slice, query, key) (:mod:`dropkey.kernels.hash_mask`), so this backend
    always uses ``mask="hash"``. CUDA tensors (or the Triton interpreter on CPU, for
    tests); float16, bfloat16, float32. Needs ``pip install "dropkey-lab[triton]"``.
``cpp``
    One fused C++ kernel for CPU float32 (:mod:`dropkey.kernels.cpu_kernel`,
    compiled with the system compiler at first use and cached): per tile of query
    rows, ``scale * q k^T`` by torch's own BLAS, drop flags from the same hash
    inline, softmax, ``@ v``; the backward recomputes the tile and its flags. Only
    the row log-sum-exp is kept (no N x N state, not even a bit per logit). Always
    ``mask="hash"``. Reads permuted q, k, v (a fused qkv projection) in place.
``auto``
    On CPU ``cpp`` for float32 when the kernel builds and ``mask`` is not
    ``"bernoulli"``, else ``fused``; on CUDA ``triton`` when triton is importable, the dtype is
    float16/bfloat16/float32 and ``mask`` is not ``"bernoulli"``; else ``sdpa``
    (where SDPA has fused masked kernels).

``training=False`` or ``drop_ratio == 0`` returns plain attention computed by
:func:`plain_attention` with the same backend: bit-identical to
``F.scaled_dot_product_attention`` for every backend but ``reference``, and to the
reference plain path for ``reference``.

Masks (``mask=``). ``"bernoulli"`` (default of every backend but ``triton`` and ``cpp``):
:func:`dropkey.masks.bernoulli_drop_mask`; every such backend draws the same mask
from the same generator state, so ``generator=seed`` makes them agree (up to float
rounding). ``"hash"`` (the ``triton`` and ``cpp`` backends', and the default when
``auto`` picks one of them): :func:`dropkey.kernels.hash_drop_mask` of one seed
drawn by :func:`dropkey.kernels.hash_seed` from ``generator`` (one
``torch.randint``); the ``reference``, ``sdpa`` and ``fused`` backends materialise
that same mask, so ``mask="hash"`` makes every backend, ``triton`` and ``cpp``
included, agree. Under :func:`torch.compile` the seed stays a tensor
(:func:`dropkey.kernels.hash_seed_tensor`) and the mask is one opaque op, so the
graph does not break there. ``mask=None`` picks the resolved backend's own; see
:func:`resolve_backend`.
"""

from __future__ import annotations

import functools
import logging
import math
import numbers
from typing import Optional

import torch
import torch.nn.functional as F

from dropkey.masks import (
    BernoulliStream,
    GeneratorLike,
    bernoulli_drop_mask,
    pack_bits,
    resolve_generator,
    unpack_bits,
    validate_drop_ratio,
)

logger = logging.getLogger(__name__)

__all__ = [
    "ALL_DROPPED_CONVENTIONS",
    "BACKENDS",
    "HASH_BACKENDS",
    "attention_from_keep_mask",
    "dropkey_attention",
    "masked_softmax",
    "MASKS",
    "paper_dropkey_attention",
    "plain_attention",
    "post_softmax_dropout_attention",
    "resolve_backend",
]

ALL_DROPPED_CONVENTIONS = ("zero", "uniform", "undropped")
BACKENDS = ("auto", "reference", "sdpa", "fused", "triton", "cpp")
MASKS = ("bernoulli", "hash")
# Backends that take a given mask (attention_from_keep_mask): all but the two kernels,
# which compute their own hash mask.
_MASK_BACKENDS = ("auto", "reference", "sdpa", "fused")
HASH_BACKENDS = ("triton", "cpp")  # the kernels that compute their own hash mask (no given mask)

_HALF = (torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------- validation


def _check_convention(all_dropped: object) -> str:
    if all_dropped not in ALL_DROPPED_CONVENTIONS:
        raise ValueError(f"all_dropped must be one of {ALL_DROPPED_CONVENTIONS}, got {all_dropped!r}")
    return str(all_dropped)


def _check_backend(backend: object, allowed: tuple[str, ...] = BACKENDS) -> str:
    if backend not in allowed:
        raise ValueError(f"backend must be one of {allowed}, got {backend!r}")
    return str(backend)


def _check_qkv(q: object, k: object, v: object) -> None:
    for name, tensor in (("q", q), ("k", k), ("v", v)):
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
        if not tensor.is_floating_point():
            raise ValueError(f"{name} must have a floating dtype (float16, bfloat16, float32, float64), got {tensor.dtype}")
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
    if not (q.shape[:-2] == k.shape[:-2] == v.shape[:-2]):
        raise ValueError(
            f"q, k, v must share their leading (batch, head) dims: {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )


def _check_scale(scale: object, q: torch.Tensor) -> float:
    if scale is None:
        return 1.0 / math.sqrt(q.shape[-1])
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(float(scale)) or float(scale) <= 0:
        raise ValueError(f"scale must be a positive finite real number or None, got {scale!r}")
    return float(scale)


def _check_training(training: object) -> bool:
    if not isinstance(training, bool):
        raise ValueError(f"training must be a bool, got {training!r}")
    return training


def _check_keep(keep: object, target: tuple[int, ...], device: torch.device) -> torch.Tensor:
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


def _check_mask(mask: object) -> Optional[str]:
    if mask is not None and mask not in MASKS:
        raise ValueError(f"mask must be one of {MASKS} or None (the backend's own), got {mask!r}")
    return None if mask is None else str(mask)


def _resolve_backend(backend: str, device: torch.device) -> str:
    """Backend for a given mask: ``auto`` -> ``fused`` on CPU, ``sdpa`` elsewhere (never ``triton``)."""
    if backend == "auto":
        return "fused" if device.type == "cpu" else "sdpa"
    return backend


def resolve_backend(
    backend: str, device: torch.device | str, dtype: Optional[torch.dtype] = None, mask: Optional[str] = None
) -> tuple[str, str]:
    """(backend, mask) that :func:`dropkey_attention` uses for inputs on ``device`` of ``dtype``.

    ``auto`` becomes, unless ``mask="bernoulli"`` and for ``dtype`` None or one the
    kernel supports: on CPU ``cpp`` (float32) when the C++ kernel builds and loads
    (torch custom ops: :func:`torch.compile` traces them); on CUDA ``triton`` (float16,
    bfloat16, float32) when triton is importable. Otherwise ``auto`` is ``fused``
    on CPU and ``sdpa`` elsewhere. ``mask=None`` becomes ``"hash"`` for ``triton``
    and ``cpp`` and ``"bernoulli"`` otherwise. ``backend="triton"`` or ``"cpp"``
    with ``mask="bernoulli"`` raises ValueError (those kernels only hash).
    """
    name = _check_backend(backend)
    kind = _check_mask(mask)
    dev = torch.device(device)
    if name == "auto":
        name = _resolve_backend(name, dev)
        if kind != "bernoulli":
            if dev.type == "cuda" and dtype in (None, torch.float16, torch.bfloat16, torch.float32):
                from dropkey.kernels import triton_available

                if triton_available():
                    name = "triton"
            elif dev.type == "cpu" and dtype in (None, torch.float32):
                from dropkey.kernels import cpp_available

                if cpp_available():
                    name = "cpp"
    if kind is None:
        kind = "hash" if name in HASH_BACKENDS else "bernoulli"
    if name in HASH_BACKENDS and kind != "hash":
        raise ValueError(f"mask must be 'hash' (or None) with backend={name!r}: the kernel computes a hash mask")
    return name, kind


# --------------------------------------------------------------------------- softmax


def masked_softmax(logits: torch.Tensor, keep: Optional[torch.Tensor], *, all_dropped: str = "uniform") -> torch.Tensor:
    """Softmax over the last dim restricted to the entries with ``keep == True``.

    logits: (..., N) floating tensor. keep: bool tensor broadcastable to ``logits``
    (True = kept), or None (keep all: plain softmax). Rows without a kept entry
    follow ``all_dropped`` ("zero": 0, "uniform": 1/N, "undropped": plain softmax).
    Half dtypes are computed in float32 and returned in the input dtype. Never NaN
    for finite logits; differentiable (dropped entries get zero gradient).
    """
    convention = _check_convention(all_dropped)
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point():
        got = logits.dtype if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"logits must be a floating torch.Tensor, got {got}")
    if logits.dim() < 1:
        raise ValueError("logits must have at least one dim (..., N)")
    work = logits.float() if logits.dtype in _HALF else logits
    if keep is None:
        return torch.softmax(work, dim=-1).to(logits.dtype)
    keep = _check_keep(keep, tuple(logits.shape), logits.device)
    keep = keep.expand(*keep.shape[:-1], logits.shape[-1])
    alive = keep.any(dim=-1, keepdim=True)  # (..., 1) broadcastable to logits
    safe = keep | ~alive  # all-dropped rows: keep everything (no empty softmax)
    weights = torch.softmax(work.masked_fill(~safe, float("-inf")), dim=-1)
    if convention == "zero":
        weights = weights.masked_fill(~alive, 0.0)
    elif convention == "uniform":
        weights = torch.where(alive, weights, torch.full((), 1.0 / logits.shape[-1], dtype=weights.dtype, device=weights.device))
    return weights.to(logits.dtype)


# --------------------------------------------------------------------------- plain attention


def _reference_logits(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    return torch.matmul(q, k.transpose(-2, -1)) * scale


def plain_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: Optional[float] = None, backend: str = "auto"
) -> torch.Tensor:
    """Plain softmax attention, (..., Nq, d) from q (..., Nq, d), k (..., Nk, d), v (..., Nk, dv).

    ``reference``: ``softmax((q @ k^T) * scale)`` (float32 softmax for half dtypes) ``@ v``.
    Every other backend: ``F.scaled_dot_product_attention(q, k, v, scale=scale)``.
    This is what :func:`dropkey_attention` returns in eval mode or at ``drop_ratio == 0``.
    """
    _check_qkv(q, k, v)
    backend = _check_backend(backend)
    scale_value = _check_scale(scale, q)
    if backend == "reference":
        return masked_softmax(_reference_logits(q, k, scale_value), None).matmul(v)
    return F.scaled_dot_product_attention(q, k, v, scale=scale_value)


# --------------------------------------------------------------------------- backends


def _reference_masked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor, convention: str, scale: float) -> torch.Tensor:
    weights = masked_softmax(_reference_logits(q, k, scale), keep, all_dropped=convention)
    return weights.matmul(v)


def _sdpa_masked(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor, convention: str, scale: float, owned: bool
) -> torch.Tensor:
    """SDPA with a bool mask; empty rows get a full row of True first, then the exact fix-up."""
    nk = k.shape[-2]
    keep = keep.expand(*keep.shape[:-1], nk)
    # (..., Nq or 1, 1); a uint8 max is several times faster than bool any() on CPU
    dead = keep.view(torch.uint8).amax(dim=-1, keepdim=True) == 0
    # in place when the mask is ours; not under torch.compile: functionalising an in-place op on
    # the result of expand (even a no-op one) fails there (torch 2.13: "Subtraction ... two bool tensors")
    if owned and keep.is_contiguous() and not torch.compiler.is_compiling():
        safe = keep.logical_or_(dead)
    else:
        safe = keep | dead
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=safe, scale=scale)
    if convention == "zero":
        out = out.masked_fill(dead, 0.0)
    elif convention == "uniform":
        out = torch.where(dead, v.mean(dim=-2, keepdim=True), out)
    return out  # undropped: SDPA of a full row is plain attention of that row


# Logits per chunk of the fused backend's chunked matmul path: n / 16 for n logits,
# clamped to [_FUSED_MIN_CHUNK_LOGITS, _FUSED_CHUNK_LOGITS]. Its three float work buffers
# (weights, bias, grad) then take 0.5-2 MiB each: cache-resident, and a bounded fraction
# of a byte per logit, while the chunks stay few enough that the Python loop costs
# little. The flash path sizes its chunks by bytes instead (:func:`_flash_chunk_logits`).
_FUSED_CHUNK_LOGITS = 1 << 19
_FUSED_MIN_CHUNK_LOGITS = 1 << 17
# Bytes per logit (of the whole input) that a flash-path chunk's bias and its copy of the
# output may take together (the 1-bit mask and the kernel's per-row state come on top).
_FLASH_CHUNK_BYTES_PER_LOGIT = 0.6


class _Chunks:
    """The fused backend's schedule: ranges [lo, hi) of the S = prod(lead) (batch, head) slices.

    About ``budget / (Nq * Nk)`` slices per chunk (by default budget = n / 16 logits,
    clamped to [_FUSED_MIN_CHUNK_LOGITS, _FUSED_CHUNK_LOGITS]). With two leading dims (B, H) no
    chunk straddles two batch entries unless it covers whole ones, so a chunk of a
    non-flattenable (e.g. permuted ``qkv``) tensor is a view, or a copy of that
    chunk only (never of the whole tensor). ``offsets[i]`` is the byte offset of
    chunk i in the bit-packed mask (each chunk padded to whole bytes).
    """

    def __init__(self, lead: tuple[int, ...], nq: int, nk: int, budget: Optional[int] = None) -> None:
        self.lead = lead
        self.slices = math.prod(lead)
        per_slice = max(1, nq * nk)
        if budget is None:
            budget = max(_FUSED_MIN_CHUNK_LOGITS, min(_FUSED_CHUNK_LOGITS, (self.slices * per_slice) >> 4))
        chunk = max(1, min(self.slices, budget // per_slice))
        self.heads = lead[-1] if len(lead) == 2 and lead[-1] > 0 else 0
        if self.heads and chunk < self.heads:
            self.ranges = [
                (b * self.heads + h, b * self.heads + min(self.heads, h + chunk))
                for b in range(lead[0])
                for h in range(0, self.heads, chunk)
            ]
        else:
            step = (chunk // self.heads) * self.heads if self.heads else chunk
            self.ranges = [(lo, min(self.slices, lo + step)) for lo in range(0, self.slices, step)]
        self.largest = max((hi - lo for lo, hi in self.ranges), default=1)
        self.per_slice = nq * nk
        self.offsets = [0]
        for lo, hi in self.ranges:
            self.offsets.append(self.offsets[-1] + -(-(hi - lo) * per_slice // 8))

    def flat(self, t: torch.Tensor) -> Optional[torch.Tensor]:
        """``t`` as (S, N, d) if that is a view, else None (then :meth:`take` slices chunk by chunk)."""
        try:
            return t.view(self.slices, *t.shape[-2:])
        except RuntimeError:
            return None if self.heads else t.reshape(self.slices, *t.shape[-2:])

    def take(self, t: torch.Tensor, flat: Optional[torch.Tensor], lo: int, hi: int) -> torch.Tensor:
        """Slices [lo, hi) of ``t`` as a (hi - lo, N, d) tensor."""
        if flat is not None:
            return flat[lo:hi]
        heads = self.heads
        if hi - lo >= heads:  # whole batch entries: lo, hi are multiples of H
            return t[lo // heads : hi // heads].reshape(hi - lo, *t.shape[-2:])
        b = lo // heads
        return t[b, lo - b * heads : hi - b * heads]


class _ChunkMasks:
    """The fused backend's per-chunk drop masks (hi - lo, Nq, Nk), from a full bool tensor or a stream.

    From a :class:`~dropkey.masks.BernoulliStream` the whole mask never exists: each
    chunk's flags are drawn into a reused buffer and kept bit-packed (1 bit per
    logit) for backward, which unpacks them chunk by chunk.
    """

    def __init__(self, saved: torch.Tensor, packed: bool, chunks: _Chunks, nq: int, nk: int) -> None:
        self.saved, self.packed, self.chunks, self.nq, self.nk = saved, packed, chunks, nq, nk
        size = -(-chunks.largest * chunks.per_slice // 8) * 8
        self.flags = torch.empty(size, dtype=torch.bool, device=saved.device) if packed else None
        self.stream: Optional[BernoulliStream] = None

    @classmethod
    def from_stream(cls, stream: BernoulliStream, chunks: _Chunks, nq: int, nk: int, device: torch.device) -> "_ChunkMasks":
        masks = cls(torch.empty(chunks.offsets[-1], dtype=torch.uint8, device=device), True, chunks, nq, nk)
        masks.stream = stream
        return masks

    def _span(self, index: int) -> tuple[int, int, int, int]:
        lo, hi = self.chunks.ranges[index]
        count = (hi - lo) * self.chunks.per_slice
        return hi - lo, count, -(-count // 8) * 8, self.chunks.offsets[index]

    def draw(self, index: int) -> torch.Tensor:
        """Forward: the mask of chunk ``index`` (drawn and packed when streaming)."""
        if not self.packed:
            lo, hi = self.chunks.ranges[index]
            return self.saved[lo:hi]
        assert self.flags is not None and self.stream is not None
        rows, count, padded, start = self._span(index)
        flags = self.flags[:padded]
        self.stream.fill(flags[:count])
        if padded > count:
            flags[count:].fill_(False)
        pack_bits(flags, out=self.saved[start : start + padded // 8])
        return flags[:count].view(rows, self.nq, self.nk)

    def read(self, index: int) -> torch.Tensor:
        """Backward: the mask of chunk ``index`` again."""
        if not self.packed:
            lo, hi = self.chunks.ranges[index]
            return self.saved[lo:hi]
        assert self.flags is not None
        rows, count, padded, start = self._span(index)
        flags = unpack_bits(self.saved[start : start + padded // 8], self.flags[:padded])
        return flags[:count].view(rows, self.nq, self.nk)


def _fix_dead_rows(
    weights: torch.Tensor, drop: torch.Tensor, q: torch.Tensor, kt: torch.Tensor, scale: float, convention: str
) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """Rewrite, in place, the rows of ``weights`` (c, Nq, Nk) whose keys were all dropped.

    After ``masked_fill(-inf)`` and softmax such a row is NaN, so the candidates are
    found in O(c * Nq) (first column NaN) instead of a pass over the mask; each
    candidate is confirmed against ``drop`` (a NaN from non-finite inputs is left as
    it is). Returns the (slice, row) indices of the rewritten rows, or None.
    """
    candidates = torch.isnan(weights[..., 0])
    if not bool(candidates.any()):
        return None
    slices, rows = candidates.nonzero(as_tuple=True)
    confirmed = drop[slices, rows].all(dim=-1)
    slices, rows = slices[confirmed], rows[confirmed]
    if slices.numel() == 0:
        return None
    if convention == "zero":
        weights[slices, rows] = 0.0
    elif convention == "uniform":
        weights[slices, rows] = 1.0 / weights.shape[-1]
    else:  # undropped: the plain softmax of those rows
        logits = torch.matmul(q[slices, rows].unsqueeze(-2), kt[slices]).squeeze(-2) * scale
        weights[slices, rows] = torch.softmax(logits.to(weights.dtype), dim=-1)
    return slices, rows


# Integer view of each float dtype and the bit pattern of -inf read as that integer:
# -(2 ** mantissa_bits). ``bits(0) = +0.0`` and ``bits(1) * pattern = -inf``.
_INT_VIEW = {
    torch.float64: (torch.int64, -(1 << 52)),
    torch.float32: (torch.int32, -(1 << 23)),
    torch.float16: (torch.int16, -(1 << 10)),
    torch.bfloat16: (torch.int16, -(1 << 7)),
}


def _chunk_weights(
    buffer: torch.Tensor,
    bias: torch.Tensor,
    half_buffer: Optional[torch.Tensor],
    q: torch.Tensor,
    kt: torch.Tensor,
    drop: torch.Tensor,
    scale: float,
    convention: str,
) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """buffer <- masked softmax of scale * q @ kt for one chunk (all-dropped rows fixed); returns the fixed rows.

    The mask enters as an additive bias of exactly 0.0 / -inf, built with two
    vectorised integer passes (uint8 -> int copy, multiply by the bit pattern of
    -inf) and added inside the matmul (``baddbmm``): several times faster on CPU
    than ``masked_fill_`` with a bool mask, and exact (l + 0.0 == l).
    """
    int_dtype, pattern = _INT_VIEW[bias.dtype]
    bias.view(int_dtype).copy_(drop.view(torch.uint8)).mul_(pattern)
    if half_buffer is None:
        torch.baddbmm(bias, q, kt, alpha=scale, out=buffer)
    else:
        torch.baddbmm(bias, q, kt, alpha=scale, out=half_buffer)
        buffer.copy_(half_buffer)
    torch.softmax(buffer, dim=-1, out=buffer)
    return _fix_dead_rows(buffer, drop, q, kt, scale, convention)


class _FusedMaskedAttention(torch.autograd.Function):
    """softmax(q k^T * scale, masked) @ v on plain matmuls, chunked over the (batch, head) slices.

    The fused backend off the CPU flash kernels (other devices, other dtypes, empty
    inputs); on CPU see :class:`_FlashMaskedAttention`.

    q, k, v: (..., N, d), any strides. The mask comes either as ``drop`` (bool
    (S, Nq, Nk), S = prod(...), True = dropped) or as ``stream`` (a
    :class:`~dropkey.masks.BernoulliStream` of S * Nq * Nk flags, drawn chunk by
    chunk and kept bit-packed); all-dropped rows are fixed per ``convention``.
    Chunks are computed in reused float buffers (float32 for half dtypes), so the
    weights are never materialised whole: saved for backward are q, k, v (as
    given: no copies), the output and the mask (1 bit per logit when streamed);
    backward recomputes each chunk's weights (one extra q k^T matmul, as flash
    attention does) and uses ``dlogits = w * (g v^T - rowsum(g * o))``.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        drop: Optional[torch.Tensor],
        stream: Optional[BernoulliStream],
        scale: float,
        convention: str,
    ) -> torch.Tensor:
        lead, nq, nk, dv = tuple(q.shape[:-2]), q.shape[-2], k.shape[-2], v.shape[-1]
        work = torch.float32 if q.dtype in _HALF else q.dtype
        chunks = _Chunks(lead, nq, nk)
        if stream is not None:
            masks = _ChunkMasks.from_stream(stream, chunks, nq, nk, q.device)
        else:
            assert drop is not None
            masks = _ChunkMasks(drop, False, chunks, nq, nk)
        flat_q, flat_k, flat_v = chunks.flat(q), chunks.flat(k), chunks.flat(v)
        out = torch.empty(chunks.slices, nq, dv, dtype=q.dtype, device=q.device)
        size = (chunks.largest, nq, nk)
        buffer = torch.empty(size, dtype=work, device=q.device)
        bias = torch.empty(size, dtype=q.dtype, device=q.device)
        half_buffer = torch.empty(size, dtype=q.dtype, device=q.device) if work != q.dtype else None
        for index, (lo, hi) in enumerate(chunks.ranges):
            weights = buffer[: hi - lo]
            hb = None if half_buffer is None else half_buffer[: hi - lo]
            qc = chunks.take(q, flat_q, lo, hi)
            kc = chunks.take(k, flat_k, lo, hi)
            _chunk_weights(weights, bias[: hi - lo], hb, qc, kc.transpose(-2, -1), masks.draw(index), scale, convention)
            vc = chunks.take(v, flat_v, lo, hi)
            torch.matmul(weights if hb is None else hb.copy_(weights), vc, out=out[lo:hi])
        ctx.save_for_backward(q, k, v, masks.saved, out)
        ctx.scale = scale
        ctx.convention = convention
        ctx.packed = masks.packed
        return out.view(*lead, nq, dv)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor):  # type: ignore[override]
        q, k, v, saved_mask, out = ctx.saved_tensors
        scale: float = ctx.scale  # type: ignore[attr-defined]
        convention: str = ctx.convention  # type: ignore[attr-defined]
        lead, nq, nk = tuple(q.shape[:-2]), q.shape[-2], k.shape[-2]
        work = torch.float32 if q.dtype in _HALF else q.dtype
        half = work != q.dtype
        chunks = _Chunks(lead, nq, nk)
        masks = _ChunkMasks(saved_mask, ctx.packed, chunks, nq, nk)  # type: ignore[attr-defined]
        flat_q, flat_k, flat_v, flat_g = chunks.flat(q), chunks.flat(k), chunks.flat(v), chunks.flat(grad)
        grad_q = torch.empty(chunks.slices, nq, q.shape[-1], dtype=q.dtype, device=q.device)
        grad_k = torch.empty(chunks.slices, nk, k.shape[-1], dtype=k.dtype, device=k.device)
        grad_v = torch.empty(chunks.slices, nk, v.shape[-1], dtype=v.dtype, device=v.device)
        size = (chunks.largest, nq, nk)
        buffer = torch.empty(size, dtype=work, device=q.device)
        grad_buffer = torch.empty(size, dtype=work, device=q.device)
        bias = torch.empty(size, dtype=q.dtype, device=q.device)
        half_buffer = torch.empty(size, dtype=q.dtype, device=q.device) if half else None
        for index, (lo, hi) in enumerate(chunks.ranges):
            weights, grad_logits = buffer[: hi - lo], grad_buffer[: hi - lo]
            hb = None if half_buffer is None else half_buffer[: hi - lo]
            qc, kc, vc = chunks.take(q, flat_q, lo, hi), chunks.take(k, flat_k, lo, hi), chunks.take(v, flat_v, lo, hi)
            fixed = _chunk_weights(weights, bias[: hi - lo], hb, qc, kc.transpose(-2, -1), masks.read(index), scale, convention)
            g = chunks.take(grad, flat_g, lo, hi)
            row = (g.to(work) * out[lo:hi].to(work)).sum(dim=-1, keepdim=True)  # rowsum(g * o) = rowsum(w * dw)
            if hb is None:
                torch.matmul(weights.transpose(-2, -1), g, out=grad_v[lo:hi])
                torch.matmul(g, vc.transpose(-2, -1), out=grad_logits)
            else:
                torch.matmul(hb.copy_(weights).transpose(-2, -1), g, out=grad_v[lo:hi])
                torch.matmul(g, vc.transpose(-2, -1), out=hb)
                grad_logits.copy_(hb)
            grad_logits.sub_(row).mul_(weights)  # dropped / zeroed entries have w = 0 -> 0
            if fixed is not None and convention == "uniform":
                grad_logits[fixed] = 0.0  # uniform rows do not depend on the logits
            if hb is not None:
                grad_logits = hb.copy_(grad_logits)
            torch.baddbmm(grad_q[lo:hi], grad_logits, kc, beta=0.0, alpha=scale, out=grad_q[lo:hi])
            torch.baddbmm(grad_k[lo:hi], grad_logits.transpose(-2, -1), qc, beta=0.0, alpha=scale, out=grad_k[lo:hi])
        return _like(grad_q, q), _like(grad_k, k), _like(grad_v, v), None, None, None, None


def _like(flat: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(S, N, d) -> (..., N, d) with the leading dims of ``like``."""
    return flat.view(*like.shape[:-2], *flat.shape[-2:])


# --------------------------------------------------------------------------- fused, CPU: flash kernels

# torch's CPU flash-attention kernels (forward with log-sum-exp, backward), which take an
# additive float mask of the query's dtype; DropKey enters as a chunk of 0.0 / -inf biases.
_FLASH_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _flash_ops() -> tuple[object, object]:
    return (
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default,
    )


def _uses_flash(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether the fused backend runs on torch's CPU flash kernels (else the chunked matmul path)."""
    return (
        q.device.type == "cpu"
        and q.dtype in _FLASH_DTYPES
        and q.numel() > 0
        and k.numel() > 0
        and not torch.compiler.is_compiling()
    )


@functools.lru_cache(maxsize=16)
def _bias_table(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(256, 8) table: row b holds the 8 biases (0.0 kept / -inf dropped) of the packed mask byte b."""
    bits = torch.arange(256, device=device).unsqueeze(1).bitwise_right_shift(torch.arange(8, device=device))
    return torch.zeros(256, 8, dtype=dtype, device=device).masked_fill_(bits.bitwise_and_(1).bool(), float("-inf"))


def _as_4d(t: torch.Tensor, lead: tuple[int, ...]) -> torch.Tensor:
    """(..., N, d) as (batch, heads, N, d): a view (a copy only for 3+ leading dims that do not flatten)."""
    if len(lead) == 2:
        return t
    if len(lead) == 1:
        return t.unsqueeze(1)
    if not lead:
        return t.unsqueeze(0).unsqueeze(0)
    return t.reshape(math.prod(lead[:-1]), lead[-1], *t.shape[-2:])


def _flash_chunk_logits(slices: int, nq: int, nk: int, d: int, itemsize: int) -> int:
    """Logits per chunk of the flash path: its bias (Nq * Nk) and output copy (Nq * d) per slice, at
    ``itemsize`` bytes, take at most _FLASH_CHUNK_BYTES_PER_LOGIT bytes per logit of the whole
    input; clamped to [_FUSED_MIN_CHUNK_LOGITS, 2 * _FUSED_CHUNK_LOGITS] (fewer, larger chunks
    than the matmul path: each costs a Python round of small ops and copies of its results)."""
    logits = slices * nq * nk
    fair = int(_FLASH_CHUNK_BYTES_PER_LOGIT * logits / (itemsize * (1.0 + d / nk)))
    return max(_FUSED_MIN_CHUNK_LOGITS, min(2 * _FUSED_CHUNK_LOGITS, fair))


def _chunk_4d(t: torch.Tensor, heads: int, lo: int, hi: int) -> torch.Tensor:
    """Slices [lo, hi) of the flattened (batch, heads) of a 4-D tensor, as a 4-D view."""
    if hi - lo >= heads:  # whole batch entries
        return t[lo // heads : hi // heads]
    b = lo // heads
    return t[b : b + 1, lo - b * heads : hi - b * heads]


def _draw_packed(
    stream: BernoulliStream, n: int, nk: int, piece_logits: int, device: torch.device
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Draw all ``n`` flags of ``stream`` and pack them (1 bit per logit); also return the all-dropped rows.

    The flags are drawn in pieces of whole rows and whole bytes (a multiple of
    lcm(8, Nk), about ``piece_logits``) into one reused bool buffer, so the whole
    bool mask never exists. All-dropped rows (flat indices over (..., Nq)) are
    searched only in pieces where they can be: a run of Nk >= 15 dropped flags
    covers a whole byte of the packed mask, so a piece whose packed bytes are all
    below 0xFF (at r = 0.1: almost every piece) has none and its flags are not read
    again.
    """
    packed = torch.empty(-(-n // 8), dtype=torch.uint8, device=device)
    unit = math.lcm(8, nk)
    piece = max(unit, piece_logits // unit * unit)
    flags = torch.empty(-(-min(piece, n) // 8) * 8, dtype=torch.bool, device=device)
    dead: list[torch.Tensor] = []
    for start in range(0, n, piece):
        count = min(piece, n - start)
        padded = -(-count // 8) * 8
        part = flags[:padded]
        stream.fill(part[:count])
        if padded > count:
            part[count:].fill_(False)
        packed_part = pack_bits(part, out=packed[start // 8 : (start + padded) // 8])
        if nk < 15 or int(packed_part.max()) == 255:  # one fast reduction over the packed bytes
            rows = _all_dropped_rows(part[:count].view(-1, nk), quick=False)
            if rows is not None:
                dead.append(rows.add_(start // nk))
    return packed, (torch.cat(dead) if dead else None)


_EIGHT_DROPPED = 0x0101010101010101  # 8 bytes of True read as one int64


def _all_dropped_rows(drop: torch.Tensor, quick: bool = True) -> Optional[torch.Tensor]:
    """Flat indices over (..., Nq) of the rows of the bool ``drop`` (..., Nq, Nk) with every key dropped, or None.

    With ``quick`` and a contiguous mask, rows of Nk >= 15 keys are first ruled out
    by one comparison of the mask's aligned 8-byte words with eight Trues (such a
    row contains one); only when some word matches are the rows reduced.
    """
    nk = drop.shape[-1]
    flat = drop.view(-1) if drop.is_contiguous() else None
    if quick and flat is not None and nk >= 15 and flat.numel() % 8 == 0 and flat.storage_offset() % 8 == 0:
        if not bool(flat.view(torch.uint8).view(torch.int64).eq(_EIGHT_DROPPED).any()):
            return None
    rows = drop.view(torch.uint8).amin(dim=-1).view(-1).nonzero().squeeze(1)
    return rows if rows.numel() else None


class _FlashMask:
    """The mask of the flash path, chunk by chunk, as an additive bias (0.0 kept / -inf dropped).

    ``saved`` is the bit-packed mask (``packed``: expanded through a 256 x 8 table,
    one ``index_select``) or a bool drop mask (S, Nq, Nk) (two vectorised integer
    passes: uint8 -> int copy, multiply by the bit pattern of -inf). ``dead`` holds
    the flat (slice, query) indices of the all-dropped rows (or None); their bias
    row is all 0.0, so the kernel never sees an empty row.
    """

    def __init__(
        self, chunks: _Chunks, nq: int, nk: int, saved: torch.Tensor, packed: bool, dead: Optional[torch.Tensor]
    ) -> None:
        self.chunks, self.nq, self.nk, self.saved, self.packed = chunks, nq, nk, saved, packed
        self.dead: list[Optional[torch.Tensor]] = [None] * len(chunks.ranges)
        if dead is not None:
            for index, (lo, hi) in enumerate(chunks.ranges):
                inside = dead[(dead >= lo * nq) & (dead < hi * nq)]
                if inside.numel():
                    self.dead[index] = inside - lo * nq

    def buffer(self, dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(self.chunks.largest * self.chunks.per_slice + 16, dtype=dtype, device=self.saved.device)

    def bias(self, index: int, buffer: torch.Tensor) -> torch.Tensor:
        """Chunk ``index``'s bias as a (slices, Nq, Nk) view of ``buffer``."""
        lo, hi = self.chunks.ranges[index]
        count = (hi - lo) * self.chunks.per_slice
        if self.packed:
            start = lo * self.chunks.per_slice
            first, last = start // 8, -(-(start + count) // 8)
            table = _bias_table(buffer.dtype, buffer.device)
            rows = self.saved[first:last].to(torch.int32)  # packed bytes: rows of the table
            torch.index_select(table, 0, rows, out=buffer[: 8 * (last - first)].view(-1, 8))
            bias = buffer[start - 8 * first : start - 8 * first + count]
        else:
            int_dtype, pattern = _INT_VIEW[buffer.dtype]
            drop = self.saved[lo:hi]
            bias = buffer[:count]
            bias.view(int_dtype).view(drop.shape).copy_(drop.view(torch.uint8)).mul_(pattern)
        dead = self.dead[index]
        if dead is not None:
            bias.view(-1, self.nk).index_fill_(0, dead, 0.0)
        return bias.view(hi - lo, self.nq, self.nk)


def _dead_index(dead: torch.Tensor, nq: int, heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(batch, head, query) indices into a chunk's 4-D tensors of its flat all-dropped row indices."""
    slices, rows = dead.div(nq, rounding_mode="floor"), dead.remainder(nq)
    return slices.div(heads, rounding_mode="floor"), slices.remainder(heads), rows


class _FlashMaskedAttention(torch.autograd.Function):
    """softmax(q k^T * scale, masked) @ v on torch's CPU flash kernels, chunked over (batch, head) slices.

    Same inputs as :class:`_FusedMaskedAttention` (q, k, v of one head size). A
    streamed mask is drawn first, in bounded pieces, and bit-packed (:func:`_draw_packed`);
    then per chunk the mask becomes a cache-resident additive bias of the query's
    dtype (:class:`_FlashMask`), the flash forward kernel returns the output and the
    row log-sum-exp, and the all-dropped rows (given a full row of 0.0 bias) are
    rewritten per convention. Saved for backward: q, k, v, the output, the
    log-sum-exp (one float per row), the mask (bit-packed when streamed: 1 bit per
    logit) and the all-dropped rows' indices. Backward rebuilds each chunk's bias and
    runs the flash backward kernel, with the incoming gradient of zeroed / uniform
    all-dropped rows set to 0 (their output does not depend on the logits; the
    uniform rows' 1/Nk share goes to dv directly).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        drop: Optional[torch.Tensor],
        stream: Optional[BernoulliStream],
        scale: float,
        convention: str,
    ) -> torch.Tensor:
        flash_forward, _ = _flash_ops()
        lead, nq, nk, d = tuple(q.shape[:-2]), q.shape[-2], k.shape[-2], q.shape[-1]
        q4, k4, v4 = _as_4d(q, lead), _as_4d(k, lead), _as_4d(v, lead)
        batch, heads = q4.shape[0], q4.shape[1]
        chunks = _Chunks((batch, heads), nq, nk, _flash_chunk_logits(batch * heads, nq, nk, d, q.element_size()))
        if stream is not None:
            pieces = 2 * chunks.largest * chunks.per_slice
            saved, dead = _draw_packed(stream, chunks.slices * chunks.per_slice, nk, pieces, q.device)
        else:
            assert drop is not None
            saved, dead = drop, _all_dropped_rows(drop)
        mask = _FlashMask(chunks, nq, nk, saved, stream is not None, dead)
        buffer = mask.buffer(q.dtype)
        single = len(chunks.ranges) == 1
        out4 = lse = None
        if not single:  # the layouts the kernel returns: (batch, N, heads, d) and (batch, N, heads)
            out4 = torch.empty(batch, nq, heads, d, dtype=q.dtype, device=q.device).transpose(1, 2)
        for index, (lo, hi) in enumerate(chunks.ranges):
            qc, kc, vc = _chunk_4d(q4, heads, lo, hi), _chunk_4d(k4, heads, lo, hi), _chunk_4d(v4, heads, lo, hi)
            bias = mask.bias(index, buffer).view(*qc.shape[:2], nq, nk)
            o, l = flash_forward(qc, kc, vc, attn_mask=bias, scale=scale)  # type: ignore[operator]
            if single:
                out4, lse = o, l
            else:
                assert out4 is not None
                if lse is None:
                    lse = torch.empty(batch, nq, heads, dtype=l.dtype, device=q.device).transpose(1, 2)
                o = _chunk_4d(out4, heads, lo, hi).copy_(o)
                _chunk_4d(lse, heads, lo, hi).copy_(l)
            dead_rows = mask.dead[index]
            if dead_rows is not None and convention != "undropped":
                b, h, rows = _dead_index(dead_rows, nq, qc.shape[1])
                o[b, h, rows] = 0.0 if convention == "zero" else vc[b, h].mean(dim=-2).to(o.dtype)
        assert out4 is not None and lse is not None
        out = out4.view(*lead, nq, d)
        ctx.save_for_backward(q, k, v, out, lse, saved, dead)
        ctx.scale = scale
        ctx.convention = convention
        ctx.packed = stream is not None
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor):  # type: ignore[override]
        _, flash_backward = _flash_ops()
        q, k, v, out, lse, saved, dead = ctx.saved_tensors
        scale: float = ctx.scale  # type: ignore[attr-defined]
        convention: str = ctx.convention  # type: ignore[attr-defined]
        lead, nq, nk, d = tuple(q.shape[:-2]), q.shape[-2], k.shape[-2], q.shape[-1]
        q4, k4, v4, out4, g4 = (_as_4d(t, lead) for t in (q, k, v, out, grad))
        batch, heads = q4.shape[0], q4.shape[1]
        chunks = _Chunks((batch, heads), nq, nk, _flash_chunk_logits(batch * heads, nq, nk, d, q.element_size()))
        mask = _FlashMask(chunks, nq, nk, saved, ctx.packed, dead)  # type: ignore[attr-defined]
        buffer = mask.buffer(q.dtype)
        single = len(chunks.ranges) == 1
        grads: list[Optional[torch.Tensor]] = [None, None, None]
        if not single:
            grads = [torch.empty(batch, n, heads, d, dtype=q.dtype, device=q.device).transpose(1, 2) for n in (nq, nk, nk)]
        for index, (lo, hi) in enumerate(chunks.ranges):
            qc, kc, vc = _chunk_4d(q4, heads, lo, hi), _chunk_4d(k4, heads, lo, hi), _chunk_4d(v4, heads, lo, hi)
            bias = mask.bias(index, buffer).view(*qc.shape[:2], nq, nk)
            gc = _chunk_4d(g4, heads, lo, hi)
            dead_rows = mask.dead[index]
            if dead_rows is not None:
                b, h, rows = _dead_index(dead_rows, nq, qc.shape[1])
                dead_grad = gc[b, h, rows]
                if convention != "undropped":
                    gc = gc.clone()
                    gc[b, h, rows] = 0.0
            chunk_grads = flash_backward(  # type: ignore[operator]
                gc, qc, kc, vc, _chunk_4d(out4, heads, lo, hi), _chunk_4d(lse, heads, lo, hi), 0.0, False,
                attn_mask=bias, scale=scale,
            )
            if single:
                grads = list(chunk_grads)
            else:
                for full, part in zip(grads, chunk_grads):
                    assert full is not None
                    _chunk_4d(full, heads, lo, hi).copy_(part)
            if dead_rows is not None and convention == "uniform":  # out = mean_j v_j: dv_j += g / Nk
                grad_v = _chunk_4d(grads[2], heads, lo, hi)  # type: ignore[arg-type]
                share = (dead_grad / nk).unsqueeze(-2).expand(-1, nk, -1).to(grad_v.dtype)
                grad_v.index_put_((b, h), share, accumulate=True)
        grad_q, grad_k, grad_v = (g.view(t.shape) for g, t in zip(grads, (q, k, v)))  # type: ignore[union-attr]
        return grad_q, grad_k, grad_v, None, None, None, None


def _fused_streamed(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, stream: BernoulliStream, convention: str, scale: float
) -> torch.Tensor:
    """Fused backend drawing the DropKey mask chunk by chunk (CPU): the whole mask never exists."""
    return _fused_apply(q, k, v, None, stream, convention, scale)


def _fused_apply(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    drop: Optional[torch.Tensor],
    stream: Optional[BernoulliStream],
    convention: str,
    scale: float,
) -> torch.Tensor:
    """The fused backend's autograd function: flash kernels on CPU (zero-padding q, k or v to one
    head size when d != dv: exact), else the chunked matmul path."""
    if not _uses_flash(q, k):
        return _FusedMaskedAttention.apply(q, k, v, drop, stream, scale, convention)
    d, dv = q.shape[-1], v.shape[-1]
    if d == dv:
        return _FlashMaskedAttention.apply(q, k, v, drop, stream, scale, convention)
    if dv < d:
        return _FlashMaskedAttention.apply(q, k, F.pad(v, (0, d - dv)), drop, stream, scale, convention)[..., :dv]
    q, k = F.pad(q, (0, dv - d)), F.pad(k, (0, dv - d))
    return _FlashMaskedAttention.apply(q, k, v, drop, stream, scale, convention)


def _fused_masked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, drop: torch.Tensor, convention: str, scale: float) -> torch.Tensor:
    """Fused backend from a drop mask (True = dropped) broadcastable to (..., Nq, Nk)."""
    lead, nq, nk = q.shape[:-2], q.shape[-2], k.shape[-2]
    full = (*lead, nq, nk)
    if torch.compiler.is_compiling():
        # Under torch.compile: the same maths in plain differentiable ops, without
        # data-dependent branches, so the compiler traces and fuses it.
        dead = drop.expand(full).all(dim=-1, keepdim=True)
        logits = torch.matmul(q * scale, k.transpose(-2, -1))
        logits = logits.float() if q.dtype in _HALF else logits
        weights = torch.softmax(logits.masked_fill(drop & ~dead, float("-inf")), dim=-1)
        if convention != "undropped":
            weights = weights.masked_fill(dead, 0.0)
        out = torch.matmul(weights.to(v.dtype), v)
        if convention == "uniform":
            out = torch.where(dead, v.mean(dim=-2, keepdim=True), out)
        return out
    drop3 = drop.expand(full).reshape(-1, nq, nk)  # a view when drop is full and contiguous
    return _fused_apply(q, k, v, drop3, None, convention, scale)


def _dispatch(
    backend: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, drop: torch.Tensor, convention: str, scale: float, owned: bool
) -> torch.Tensor:
    """Masked attention from a *drop* mask (True = dropped) by ``backend`` (resolved)."""
    if backend == "fused":
        return _fused_masked(q, k, v, drop, convention, scale)
    keep = drop.logical_not_() if owned else ~drop
    if backend == "sdpa":
        return _sdpa_masked(q, k, v, keep, convention, scale, owned=True)
    return _reference_masked(q, k, v, keep, convention, scale)


# --------------------------------------------------------------------------- public API


def dropkey_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    drop_ratio: float,
    *,
    training: bool = True,
    all_dropped: str = "uniform",
    generator: GeneratorLike = None,
    backend: str = "auto",
    scale: Optional[float] = None,
    mask: Optional[str] = None,
) -> torch.Tensor:
    """DropKey attention: (..., Nq, dv) from q (..., Nq, d), k (..., Nk, d), v (..., Nk, dv).

    In training, every logit (..., query, key) is dropped independently with
    probability ``drop_ratio`` in [0, 1) before the softmax, with no rescaling; rows
    with all keys dropped follow ``all_dropped`` (see the module doc). With
    ``training=False`` or ``drop_ratio == 0`` this is exactly :func:`plain_attention`
    of the same backend. ``generator``: a :class:`torch.Generator`, an int seed (a
    fresh generator on q's device; for ``mask="hash"`` on the CPU) or None (global
    RNG; for ``mask="hash"`` the CPU one). ``scale`` defaults to ``1 / sqrt(d)``.
    ``backend``: one of :data:`BACKENDS`. ``mask``: one of :data:`MASKS` or None
    (the backend's own: ``"hash"`` for ``triton``, else ``"bernoulli"``).
    """
    _check_qkv(q, k, v)
    r = validate_drop_ratio(drop_ratio)
    training = _check_training(training)
    convention = _check_convention(all_dropped)
    resolved, kind = resolve_backend(backend, q.device, q.dtype, mask)
    scale_value = _check_scale(scale, q)
    if not training or r == 0.0:
        return plain_attention(q, k, v, scale=scale_value, backend=backend)
    shape = (*q.shape[:-2], q.shape[-2], k.shape[-2])
    if kind == "hash":
        from dropkey.kernels import hash_drop_mask, hash_seed, hash_seed_tensor

        if resolved == "triton":
            from dropkey.kernels import triton_attention

            return triton_attention(q, k, v, r, seed=hash_seed(generator), all_dropped=convention, scale=scale_value)
        # the seed stays a tensor: nothing for a tracer to break on (the kernel and the mask read it inside their ops)
        seed = hash_seed_tensor(generator)
        if resolved == "cpp":
            from dropkey.kernels import cpp_attention

            return cpp_attention(q, k, v, r, seed=seed, all_dropped=convention, scale=scale_value)
        drop = hash_drop_mask(seed, shape, r, device=q.device)
        return _dispatch(resolved, q, k, v, drop, convention, scale_value, owned=True)
    gen = resolve_generator(generator, q.device)
    if resolved == "fused" and q.device.type == "cpu" and not torch.compiler.is_compiling():
        if gen is not None and gen.device.type != "cpu":
            raise ValueError(f"generator is on {gen.device} but q is on {q.device}: pass a generator of that device")
        stream = BernoulliStream(math.prod(shape), r, gen)  # the very flags bernoulli_drop_mask(shape) would draw
        return _fused_streamed(q, k, v, stream, convention, scale_value)
    drop = bernoulli_drop_mask(shape, r, generator=gen, device=q.device)
    return _dispatch(resolved, q, k, v, drop, convention, scale_value, owned=True)


def attention_from_keep_mask(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    keep: torch.Tensor,
    *,
    all_dropped: str = "uniform",
    scale: Optional[float] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """``masked_softmax(q k^T * scale, keep) @ v`` by the chosen backend: (..., Nq, dv).

    keep: bool, True = kept, broadcastable to (..., Nq, Nk) (e.g. (..., 1, Nk) for
    DropAttention). ``keep`` is never modified. ``backend``: one of :data:`BACKENDS`
    but ``triton`` (which computes its own hash mask); ``auto`` never picks it.
    """
    _check_qkv(q, k, v)
    convention = _check_convention(all_dropped)
    backend = _check_backend(backend, _MASK_BACKENDS)
    scale_value = _check_scale(scale, q)
    keep = _check_keep(keep, (*q.shape[:-2], q.shape[-2], k.shape[-2]), q.device)
    resolved = _resolve_backend(backend, q.device)
    if resolved == "reference":
        return _reference_masked(q, k, v, keep, convention, scale_value)
    if resolved == "sdpa":
        return _sdpa_masked(q, k, v, keep, convention, scale_value, owned=False)
    return _fused_masked(q, k, v, keep.logical_not(), convention, scale_value)


def post_softmax_dropout_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    drop_ratio: float,
    *,
    training: bool = True,
    generator: GeneratorLike = None,
    scale: Optional[float] = None,
) -> torch.Tensor:
    """timm's ``attn_drop``: inverted dropout on the softmax weights, (..., Nq, dv).

    ``w = softmax(q k^T * scale)``; in training each weight is zeroed w.p.
    ``drop_ratio`` and the survivors divided by ``1 - drop_ratio`` (so E[w] is the
    plain softmax); then ``w @ v``. Eval or ``drop_ratio == 0``: the reference plain
    attention (bit-identical to ``plain_attention(..., backend="reference")``).
    The mask is :func:`dropkey.masks.dropkey_keep_mask` of the same generator.
    """
    _check_qkv(q, k, v)
    r = validate_drop_ratio(drop_ratio)
    training = _check_training(training)
    scale_value = _check_scale(scale, q)
    if not training or r == 0.0:
        return plain_attention(q, k, v, scale=scale_value, backend="reference")
    weights = masked_softmax(_reference_logits(q, k, scale_value), None)
    gen = resolve_generator(generator, q.device)
    drop = bernoulli_drop_mask(tuple(weights.shape), r, generator=gen, device=q.device)
    weights = (weights / (1.0 - r)).masked_fill(drop, 0.0)
    return weights.matmul(v)


def paper_dropkey_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    drop_ratio: float,
    *,
    generator: GeneratorLike = None,
    scale: Optional[float] = None,
) -> torch.Tensor:
    """The paper's two-line code, verbatim, for comparison only (NaN in float16!).

    ``attn = q k^T * scale; attn = attn + bernoulli(ones_like(attn) * r) * -1e12;
    softmax; @ v``. Materialises an N x N float mask; all-dropped rows are left to
    float accident (uniform in fp32/bf16, NaN in fp16).
    """
    _check_qkv(q, k, v)
    r = validate_drop_ratio(drop_ratio)
    scale_value = _check_scale(scale, q)
    gen = resolve_generator(generator, q.device)
    attn = (q @ k.transpose(-2, -1)) * scale_value
    attn = attn + torch.bernoulli(torch.ones_like(attn) * r, generator=gen) * -1e12
    return attn.softmax(dim=-1) @ v
