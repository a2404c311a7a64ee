"""The ``fused`` backend's chunk schedule and its matmul path (any device, any floating dtype).

The fused backend computes masked attention one chunk of (batch, head) slices at a time, so
that no N x N float tensor of the whole input ever exists: :class:`Chunks` is the schedule,
:class:`FusedMaskedAttention` the custom-autograd function on plain matmuls (chunk weights in
reused buffers, recomputed in backward). On CPU the same schedule drives torch's flash kernels
(:mod:`dropkey.kernels.fused_flash`); :mod:`dropkey.functional` picks between the two. How and
why it is built this way: docs/attention.md ("The fused backend").
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from dropkey.masks import BernoulliStream, pack_bits, unpack_bits
from dropkey.reference import HALF

__all__ = [
    "CHUNK_LOGITS",
    "FLASH_CHUNK_BYTES_PER_LOGIT",
    "INT_VIEW",
    "MIN_CHUNK_LOGITS",
    "Chunks",
    "FusedMaskedAttention",
    "as_4d",
    "chunk_4d",
    "flash_chunk_logits",
]

# Logits per chunk of the fused backend's chunked matmul path: n / 16 for n logits,
# clamped to [MIN_CHUNK_LOGITS, CHUNK_LOGITS]. Its three float work buffers
# (weights, bias, grad) then take 0.5-2 MiB each: cache-resident, and a bounded fraction
# of a byte per logit, while the chunks stay few enough that the Python loop costs
# little. The flash path sizes its chunks by bytes instead (:func:`flash_chunk_logits`).
CHUNK_LOGITS = 1 << 19
MIN_CHUNK_LOGITS = 1 << 17
# Bytes per logit (of the whole input) that a flash-path chunk's bias and its copy of the
# output may take together (the 1-bit mask and the kernel's per-row state come on top).
FLASH_CHUNK_BYTES_PER_LOGIT = 0.6



class Chunks:
    """The fused backend's schedule: ranges [lo, hi) of the S = prod(lead) (batch, head) slices.

    About ``budget / (Nq * Nk)`` slices per chunk (by default budget = n / 16 logits,
    clamped to [MIN_CHUNK_LOGITS, CHUNK_LOGITS]). With two leading dims (B, H) no
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
            budget = max(MIN_CHUNK_LOGITS, min(CHUNK_LOGITS, (self.slices * per_slice) >> 4))
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

    def __init__(self, saved: torch.Tensor, packed: bool, chunks: Chunks, nq: int, nk: int) -> None:
        self.saved, self.packed, self.chunks, self.nq, self.nk = saved, packed, chunks, nq, nk
        size = -(-chunks.largest * chunks.per_slice // 8) * 8
        self.flags = torch.empty(size, dtype=torch.bool, device=saved.device) if packed else None
        self.stream: Optional[BernoulliStream] = None

    @classmethod
    def from_stream(
        cls, stream: BernoulliStream, chunks: Chunks, nq: int, nk: int, device: torch.device
    ) -> "_ChunkMasks":
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
INT_VIEW = {
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
    int_dtype, pattern = INT_VIEW[bias.dtype]
    bias.view(int_dtype).copy_(drop.view(torch.uint8)).mul_(pattern)
    if half_buffer is None:
        torch.baddbmm(bias, q, kt, alpha=scale, out=buffer)
    else:
        torch.baddbmm(bias, q, kt, alpha=scale, out=half_buffer)
        buffer.copy_(half_buffer)
    torch.softmax(buffer, dim=-1, out=buffer)
    return _fix_dead_rows(buffer, drop, q, kt, scale, convention)


class FusedMaskedAttention(torch.autograd.Function):
    """softmax(q k^T * scale, masked) @ v on plain matmuls, chunked over the (batch, head) slices.

    The fused backend off the CPU flash kernels (other devices, other dtypes, empty
    inputs); on CPU see :class:`FlashMaskedAttention`.

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
        work = torch.float32 if q.dtype in HALF else q.dtype
        chunks = Chunks(lead, nq, nk)
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
        work = torch.float32 if q.dtype in HALF else q.dtype
        half = work != q.dtype
        chunks = Chunks(lead, nq, nk)
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
            fixed = _chunk_weights(
                weights, bias[: hi - lo], hb, qc, kc.transpose(-2, -1), masks.read(index), scale, convention
            )
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



def as_4d(t: torch.Tensor, lead: tuple[int, ...]) -> torch.Tensor:
    """(..., N, d) as (batch, heads, N, d): a view (a copy only for 3+ leading dims that do not flatten)."""
    if len(lead) == 2:
        return t
    if len(lead) == 1:
        return t.unsqueeze(1)
    if not lead:
        return t.unsqueeze(0).unsqueeze(0)
    return t.reshape(math.prod(lead[:-1]), lead[-1], *t.shape[-2:])




def flash_chunk_logits(slices: int, nq: int, nk: int, d: int, itemsize: int) -> int:
    """Logits per chunk of the flash path: its bias (Nq * Nk) and output copy (Nq * d) per slice, at
    ``itemsize`` bytes, take at most FLASH_CHUNK_BYTES_PER_LOGIT bytes per logit of the whole
    input; clamped to [MIN_CHUNK_LOGITS, 2 * CHUNK_LOGITS] (fewer, larger chunks
    than the matmul path: each costs a Python round of small ops and copies of its results)."""
    logits = slices * nq * nk
    fair = int(FLASH_CHUNK_BYTES_PER_LOGIT * logits / (itemsize * (1.0 + d / nk)))
    return max(MIN_CHUNK_LOGITS, min(2 * CHUNK_LOGITS, fair))




def chunk_4d(t: torch.Tensor, heads: int, lo: int, hi: int) -> torch.Tensor:
    """Slices [lo, hi) of the flattened (batch, heads) of a 4-D tensor, as a 4-D view."""
    if hi - lo >= heads:  # whole batch entries
        return t[lo // heads : hi // heads]
    b = lo // heads
    return t[b : b + 1, lo - b * heads : hi - b * heads]


