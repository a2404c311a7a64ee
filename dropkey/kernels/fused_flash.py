"""The ``fused`` backend on CPU: torch's flash-attention kernels with DropKey as an additive 0 / -inf bias.

:class:`FlashMaskedAttention` runs ``aten::_scaled_dot_product_flash_attention_for_cpu`` and its
backward on one chunk of (batch, head) slices at a time (the schedule of
:mod:`dropkey.kernels.fused`). A streamed Bernoulli mask is drawn in bounded pieces and kept
bit-packed (:func:`draw_packed`: 1 bit per logit); each chunk's bias is expanded from the packed
bytes through a 256 x 8 table. All-dropped rows are given a row of 0.0 bias (the kernel never
sees an empty row) and rewritten per convention. Details and measurements: docs/attention.md.
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import torch

from dropkey.kernels.fused import INT_VIEW, Chunks, as_4d, chunk_4d, flash_chunk_logits
from dropkey.masks import BernoulliStream, pack_bits

__all__ = ["FLASH_DTYPES", "FlashMaskedAttention", "all_dropped_rows", "draw_packed", "uses_flash"]

# torch's CPU flash-attention kernels (forward with log-sum-exp, backward), which take an
# additive float mask of the query's dtype; DropKey enters as a chunk of 0.0 / -inf biases.
FLASH_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _flash_ops() -> tuple[object, object]:
    return (
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default,
    )


def uses_flash(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether the fused backend runs on torch's CPU flash kernels (else the chunked matmul path)."""
    return (
        q.device.type == "cpu"
        and q.dtype in FLASH_DTYPES
        and q.numel() > 0
        and k.numel() > 0
        and not torch.compiler.is_compiling()
    )




@functools.lru_cache(maxsize=16)
def _bias_table(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(256, 8) table: row b holds the 8 biases (0.0 kept / -inf dropped) of the packed mask byte b."""
    bits = torch.arange(256, device=device).unsqueeze(1).bitwise_right_shift(torch.arange(8, device=device))
    return torch.zeros(256, 8, dtype=dtype, device=device).masked_fill_(bits.bitwise_and_(1).bool(), float("-inf"))




def draw_packed(
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
            rows = all_dropped_rows(part[:count].view(-1, nk), quick=False)
            if rows is not None:
                dead.append(rows.add_(start // nk))
    return packed, (torch.cat(dead) if dead else None)


_EIGHT_DROPPED = 0x0101010101010101  # 8 bytes of True read as one int64


def all_dropped_rows(drop: torch.Tensor, quick: bool = True) -> Optional[torch.Tensor]:
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
        self, chunks: Chunks, nq: int, nk: int, saved: torch.Tensor, packed: bool, dead: Optional[torch.Tensor]
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
            int_dtype, pattern = INT_VIEW[buffer.dtype]
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


class FlashMaskedAttention(torch.autograd.Function):
    """softmax(q k^T * scale, masked) @ v on torch's CPU flash kernels, chunked over (batch, head) slices.

    Same inputs as :class:`FusedMaskedAttention` (q, k, v of one head size). A
    streamed mask is drawn first, in bounded pieces, and bit-packed (:func:`draw_packed`);
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
        q4, k4, v4 = as_4d(q, lead), as_4d(k, lead), as_4d(v, lead)
        batch, heads = q4.shape[0], q4.shape[1]
        chunks = Chunks((batch, heads), nq, nk, flash_chunk_logits(batch * heads, nq, nk, d, q.element_size()))
        if stream is not None:
            pieces = 2 * chunks.largest * chunks.per_slice
            saved, dead = draw_packed(stream, chunks.slices * chunks.per_slice, nk, pieces, q.device)
        else:
            assert drop is not None
            saved, dead = drop, all_dropped_rows(drop)
        mask = _FlashMask(chunks, nq, nk, saved, stream is not None, dead)
        buffer = mask.buffer(q.dtype)
        single = len(chunks.ranges) == 1
        out4 = lse = None
        if not single:  # the layouts the kernel returns: (batch, N, heads, d) and (batch, N, heads)
            out4 = torch.empty(batch, nq, heads, d, dtype=q.dtype, device=q.device).transpose(1, 2)
        for index, (lo, hi) in enumerate(chunks.ranges):
            qc, kc, vc = chunk_4d(q4, heads, lo, hi), chunk_4d(k4, heads, lo, hi), chunk_4d(v4, heads, lo, hi)
            bias = mask.bias(index, buffer).view(*qc.shape[:2], nq, nk)
            o, lse_chunk = flash_forward(qc, kc, vc, attn_mask=bias, scale=scale)  # type: ignore[operator]
            if single:
                out4, lse = o, lse_chunk
            else:
                assert out4 is not None
                if lse is None:
                    lse = torch.empty(batch, nq, heads, dtype=lse_chunk.dtype, device=q.device).transpose(1, 2)
                o = chunk_4d(out4, heads, lo, hi).copy_(o)
                chunk_4d(lse, heads, lo, hi).copy_(lse_chunk)
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
        q4, k4, v4, out4, g4 = (as_4d(t, lead) for t in (q, k, v, out, grad))
        batch, heads = q4.shape[0], q4.shape[1]
        chunks = Chunks((batch, heads), nq, nk, flash_chunk_logits(batch * heads, nq, nk, d, q.element_size()))
        mask = _FlashMask(chunks, nq, nk, saved, ctx.packed, dead)  # type: ignore[attr-defined]
        buffer = mask.buffer(q.dtype)
        single = len(chunks.ranges) == 1
        grads: list[Optional[torch.Tensor]] = [None, None, None]
        if not single:
            grads = [
                torch.empty(batch, n, heads, d, dtype=q.dtype, device=q.device).transpose(1, 2) for n in (nq, nk, nk)
            ]
        for index, (lo, hi) in enumerate(chunks.ranges):
            qc, kc, vc = chunk_4d(q4, heads, lo, hi), chunk_4d(k4, heads, lo, hi), chunk_4d(v4, heads, lo, hi)
            bias = mask.bias(index, buffer).view(*qc.shape[:2], nq, nk)
            gc = chunk_4d(g4, heads, lo, hi)
            dead_rows = mask.dead[index]
            if dead_rows is not None:
                b, h, rows = _dead_index(dead_rows, nq, qc.shape[1])
                dead_grad = gc[b, h, rows]
                if convention != "undropped":
                    gc = gc.clone()
                    gc[b, h, rows] = 0.0
            chunk_grads = flash_backward(  # type: ignore[operator]
                gc, qc, kc, vc, chunk_4d(out4, heads, lo, hi), chunk_4d(lse, heads, lo, hi), 0.0, False,
                attn_mask=bias, scale=scale,
            )
            if single:
                grads = list(chunk_grads)
            else:
                for full, part in zip(grads, chunk_grads, strict=True):
                    assert full is not None
                    chunk_4d(full, heads, lo, hi).copy_(part)
            if dead_rows is not None and convention == "uniform":  # out = mean_j v_j: dv_j += g / Nk
                grad_v = chunk_4d(grads[2], heads, lo, hi)  # type: ignore[arg-type]
                share = (dead_grad / nk).unsqueeze(-2).expand(-1, nk, -1).to(grad_v.dtype)
                grad_v.index_put_((b, h), share, accumulate=True)
        grad_q, grad_k, grad_v = (g.view(t.shape) for g, t in zip(grads, (q, k, v), strict=True))  # type: ignore[union-attr]
        return grad_q, grad_k, grad_v, None, None, None, None


