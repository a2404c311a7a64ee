"""Fused DropKey attention in Triton: FlashAttention-2 forward and backward with the hash mask.

Size (about 600 lines): the Triton kernels and the autograd function that launches them share
private tile helpers and launch constants; they are kept in one module so that a change to the
mask or the tiling is one diff, tested as one unit (tests/test_triton_kernel.py, triton_aot).

Importing this module needs ``triton`` (``pip install "dropkey-lab[triton]"``);
:mod:`dropkey.functional` imports it only when the ``triton`` backend runs.

Forward (one program per (query block, slice)): the score tile ``s = q k^T *
scale`` (float32 accumulation; exact float32 products for float32 inputs), the
DropKey drop flags of the tile from the counter-based hash
(:mod:`dropkey.kernels.hash_mask`, recomputed, never stored) set dropped logits
to -inf *before* the running row maximum, then the online softmax (``exp2`` with
the scale folded into log2 units) accumulates ``p @ v``. No rescale. Guards keep
every step finite while a row has seen no kept key (running max -inf). Saved for
backward: q, k, v, the output, the row log-sum-exp (float32) and a per-row
all-dropped flag (int8): O(N) per slice, no N x N state. NaN in, NaN out: a NaN
logit hidden by the mask (a NaN key, dropped in some rows) is noted per row on the
tile already in registers (one compare and row max per logit) and makes that row's
output and log-sum-exp NaN, as on the reference backend (an all-dropped row
follows its convention).

All-dropped rows (running max still -inf at the end), per ``all_dropped``:

- ``zero``: output 0; log-sum-exp +inf, so the backward's recomputed weights are
  exactly 0: zero gradient to q, k, v;
- ``uniform``: output mean_j v_j, from a running sum of the V tiles kept alongside
  the accumulator (only in this mode); log-sum-exp +inf as for ``zero``, and the
  dK/dV kernel adds the row's ``dO / Nk`` to every key's dV (the exact gradient of
  a mean), with zero gradient to q and k;
- ``undropped``: if a query block has a dead row (probability ~ block * r**Nk), a
  second, unmasked pass over the keys computes the plain softmax of that block;
  its rows replace the dead ones and their log-sum-exp is the plain one. The
  backward treats a dead row's mask as all-kept, i.e. the gradient of plain
  attention for that row.

Backward (FlashAttention-2): ``delta_i = rowsum(dO_i * O_i)`` (a small kernel),
then a dK/dV kernel (one program per key block, looping over query blocks) and a
dQ kernel (one program per query block, looping over key blocks), each
recomputing ``P = exp2(s - lse)`` on its own tiles with the mask recomputed from
the hash (tile shapes differ from the forward's: the mask does not care), and
``dS = P * (dP - delta)``.

Devices: CUDA tensors run the compiled kernels (autotuned block sizes). CPU
tensors run only under the Triton interpreter: ``TRITON_INTERPRET=1`` must be set
before triton itself is first imported (triton decorates its own library functions
then; note that ``import torch._dynamo`` imports triton), as tests/conftest.py does
on machines without CUDA; it is slow and meant for testing. Under the interpreter
bfloat16 dots run on float32 copies of their operands (its dot cannot read
bfloat16; see ``_score``). Dtypes: float16, bfloat16, float32; head dims up to 256.
"""

from __future__ import annotations

import math
import os
from typing import Optional

import torch

try:
    import triton
    import triton.language as tl
except ImportError as error:  # pragma: no cover - exercised only without triton
    raise ImportError('the triton backend needs the triton package: pip install "dropkey-lab[triton]"') from error

from dropkey.kernels.hash_mask import hash_threshold
from dropkey.reference import KERNEL_CONVENTION_CODES
from theory.conventions import DEFAULT, check_all_dropped

__all__ = ["CONVENTION_CODES", "INTERPRETED", "SUPPORTED_DTYPES", "triton_dropkey_attention", "triton_hash_drop_mask"]

CONVENTION_CODES = KERNEL_CONVENTION_CODES
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256
_LOG2E = 1.4426950408889634
# Block sizes (query block, key block) under the interpreter: small, so small test
# shapes span several tiles. Tests may change them (forward and backward separately).
INTERPRET_FWD_BLOCKS = (16, 16)
INTERPRET_BWD_BLOCKS = (16, 16)


# --------------------------------------------------------------------------- hash (Triton twin of hash_mask.py)


@triton.jit
def _fmix32(h):
    h ^= h >> 16
    h *= 0x85EBCA6B
    h ^= h >> 13
    h *= 0xC2B2AE35
    h ^= h >> 16
    return h


@triton.jit
def _slice_key(seed_lo, seed_hi, bh):
    """fmix32(seed_lo ^ fmix32(seed_hi + s * 0x9E3779B1)), uint32 (seeds arrive as int32 bit patterns)."""
    lo = seed_lo.to(tl.uint32, bitcast=True)
    hi = seed_hi.to(tl.uint32, bitcast=True)
    return _fmix32(_fmix32(hi + bh.to(tl.uint32) * 0x9E3779B1) ^ lo)


@triton.jit
def _row_keys(slice_key, rows):
    """fmix32(slice_key ^ (i * 0x85EBCA77)) for a vector of query indices (int32 >= 0)."""
    return _fmix32(slice_key ^ (rows.to(tl.uint32) * 0x85EBCA77))


@triton.jit
def _col_terms(cols):
    """j * 0xC2B2AE3D for a vector of key indices."""
    return cols.to(tl.uint32) * 0xC2B2AE3D


@triton.jit
def _dropped(row_keys, col_terms, hash_limit):
    """Drop flags of a tile: fmix32(row_key + col_term) <= hash_limit; operands pre-broadcast.

    ``hash_limit`` = T * 2**8 - 1 (an int32 bit pattern, from ``_hash_limit``), so the test
    equals hash_mask.py's ``(h >> 8) < T`` for T >= 1 with one instruction less per logit.
    """
    return _fmix32(row_keys + col_terms) <= hash_limit.to(tl.uint32, bitcast=True)


@triton.jit(do_not_specialize=["seed_lo", "seed_hi", "hash_limit"])
def _hash_mask_kernel(OUT, NQ, NK, seed_lo, seed_hi, hash_limit, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Writes the drop flags (int8) of slice program_id(1) as the attention kernels compute them."""
    bh = tl.program_id(1)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = _row_keys(_slice_key(seed_lo, seed_hi, bh), offs_m)
    base = OUT + bh.to(tl.int64) * NQ * NK
    for start_n in range(0, NK, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        flags = _dropped(rows[:, None], _col_terms(offs_n)[None, :], hash_limit)
        inside = (offs_m[:, None] < NQ) & (offs_n[None, :] < NK)
        tl.store(base + offs_m[:, None] * NK + offs_n[None, :], flags.to(tl.int8), mask=inside)


# --------------------------------------------------------------------------- tile helpers


@triton.jit
def _score(a, b_t, DOT: tl.constexpr):
    """a @ b_t with float32 accumulation.

    DOT = 0: native (tensor cores for half dtypes); 1: float32 inputs, exact float32
    products (no TF32); 2: operands upcast to float32 first: bfloat16 under the
    interpreter, whose dot cannot read bfloat16 (the products of two bfloat16 values
    are exact in float32, so this is the native result up to summation order).
    """
    if DOT == 2:
        return tl.dot(a.to(tl.float32), b_t.to(tl.float32), input_precision="ieee")
    if DOT == 1:
        return tl.dot(a, b_t, input_precision="ieee")
    return tl.dot(a, b_t)


@triton.jit
def _slice_ptr(PTR, bh, H, stride_b, stride_h):
    """PTR advanced to slice bh = b * H + h of a (B, H, N, d) tensor with batch/head strides."""
    return PTR + (bh // H).to(tl.int64) * stride_b + (bh % H).to(tl.int64) * stride_h


@triton.jit
def _tile_offsets(rows, row_stride, n_rows, cols, n_cols):
    """(offsets, in-bounds mask) of the tile [rows, cols] of a row-major (n_rows, n_cols) view."""
    return rows[:, None] * row_stride + cols[None, :], (rows[:, None] < n_rows) & (cols[None, :] < n_cols)


@triton.jit
def _load_tile(base, rows, row_stride, n_rows, cols, n_cols):
    offsets, inside = _tile_offsets(rows, row_stride, n_rows, cols, n_cols)
    return tl.load(base + offsets, mask=inside, other=0.0)


@triton.jit
def _store_tile(base, rows, row_stride, n_rows, cols, n_cols, value):
    offsets, inside = _tile_offsets(rows, row_stride, n_rows, cols, n_cols)
    tl.store(base + offsets, value.to(base.dtype.element_ty), mask=inside)


@triton.jit
def _row_stats(PTR, bh, NQ, offs_m, other):
    """Per-row values (log-sum-exp, delta, dead flags) of slice bh, ``other`` past NQ."""
    return tl.load(PTR + bh.to(tl.int64) * NQ + offs_m, mask=offs_m < NQ, other=other)


@triton.jit
def _kept(rows, cols, inside, hash_limit, undropped_rows, DROP: tl.constexpr, UNDROP: tl.constexpr):
    """Keep flags of a tile (operands pre-broadcast): inside and not hash-dropped; ``undropped_rows`` keep all.

    One return statement: the compiler types every return of a function, even one in a
    branch a constexpr rules out, and ``inside`` may be a (1, BLOCK) row.
    """
    keep = inside
    if DROP:
        dropped = _dropped(rows, cols, hash_limit)
        if UNDROP:
            dropped = dropped & ~undropped_rows
        keep = inside & ~dropped
    return keep


# --------------------------------------------------------------------------- forward


@triton.jit
def _online_softmax(
    q, rows, k_base, skn, v_base, svn, NK, qk_scale, hash_limit, offs_d, offs_dv,
    HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_DV: tl.constexpr, DROP: tl.constexpr, SUM_V: tl.constexpr, DOT: tl.constexpr,
):
    """One pass over the key blocks: running max m (log2 units), sum l, accumulator acc (and sum of V rows),
    and per row whether any key is kept and whether any logit, kept or dropped, is NaN (the loads pad with 0).

    The max skips NaN, so m = -inf does not mean "no key kept" (a NaN q row, or one whose only kept
    logit is NaN): the kept flags are counted instead."""
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    v_sum = tl.zeros([BLOCK_DV], tl.float32)
    nan_i = tl.zeros([BLOCK_M], tl.int32)
    kept_i = tl.zeros([BLOCK_M], tl.int32) + (1 - DROP)  # without drops every row keeps its NK >= 1 keys
    for start_n in range(0, NK, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_tile(k_base, offs_n, skn, NK, offs_d, HEAD_D)
        v = _load_tile(v_base, offs_n, svn, NK, offs_dv, HEAD_DV)
        keep = _kept(rows[:, None], _col_terms(offs_n)[None, :], (offs_n < NK)[None, :], hash_limit, 0, DROP, False)
        scores = _score(q, tl.trans(k), DOT) * qk_scale
        if DROP:  # a dropped NaN logit is not in the max below: note it here (kept NaN reach l and acc)
            nan_i = tl.maximum(nan_i, tl.max((scores != scores).to(tl.int32), 1))
            kept_i = tl.maximum(kept_i, tl.max(keep.to(tl.int32), 1))
        s = tl.where(keep, scores, float("-inf"))  # dropped before the max
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no (-inf) - (-inf) while a row is empty
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _score(p.to(v.dtype), v, DOT)
        m_i = m_new
        if SUM_V:
            v_sum += tl.sum(v.to(tl.float32), 0)
    return m_i, l_i, acc, v_sum, kept_i == 0, nan_i != 0


@triton.jit(do_not_specialize=["seed_lo", "seed_hi", "hash_limit"])
def _fwd_kernel(
    Q, K, V, ATTN_OUT, LSE, DEAD,
    sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sob, soh, som,
    H, NQ, NK, qk_scale, seed_lo, seed_hi, hash_limit,
    HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CONVENTION: tl.constexpr, DROP: tl.constexpr, DOT: tl.constexpr,
):
    bh = tl.program_id(1)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = _load_tile(_slice_ptr(Q, bh, H, sqb, sqh), offs_m, sqm, NQ, offs_d, HEAD_D)
    k_base = _slice_ptr(K, bh, H, skb, skh)
    v_base = _slice_ptr(V, bh, H, svb, svh)
    rows = _row_keys(_slice_key(seed_lo, seed_hi, bh), offs_m)
    m_i, l_i, acc, v_sum, empty, nan_rows = _online_softmax(
        q, rows, k_base, skn, v_base, svn, NK, qk_scale, hash_limit, offs_d, offs_dv,
        HEAD_D, HEAD_DV, BLOCK_M, BLOCK_N, BLOCK_DV, DROP, CONVENTION == 1, DOT,
    )
    dead = empty & (offs_m < NQ)  # empty: no key kept (then l = 0 and m = -inf)
    l_safe = tl.where(empty, 1.0, l_i)
    # NaN in, NaN out: a row with a NaN logit, even a dropped one, is NaN (all-dropped rows: their convention)
    l_safe = tl.where(nan_rows & ~empty, float("nan"), l_safe)
    out = acc / l_safe[:, None]
    lse = tl.where(dead, float("inf"), m_i + tl.log2(l_safe))  # +inf: zero weights in the backward
    if CONVENTION == 1:
        out = tl.where(dead[:, None], (v_sum / NK)[None, :], out)
    if CONVENTION == 2:
        if tl.max(dead.to(tl.int32), 0) > 0:  # rare: a dead row in this block -> plain softmax pass
            m2, l2, acc2, _, _, _ = _online_softmax(
                q, rows, k_base, skn, v_base, svn, NK, qk_scale, hash_limit, offs_d, offs_dv,
                HEAD_D, HEAD_DV, BLOCK_M, BLOCK_N, BLOCK_DV, False, False, DOT,
            )
            out = tl.where(dead[:, None], acc2 / l2[:, None], out)
            lse = tl.where(dead, m2 + tl.log2(l2), lse)
    _store_tile(_slice_ptr(ATTN_OUT, bh, H, sob, soh), offs_m, som, NQ, offs_dv, HEAD_DV, out)
    tl.store(LSE + bh.to(tl.int64) * NQ + offs_m, lse, mask=offs_m < NQ)
    tl.store(DEAD + bh.to(tl.int64) * NQ + offs_m, dead.to(tl.int8), mask=offs_m < NQ)


# --------------------------------------------------------------------------- backward


@triton.jit
def _bwd_delta_kernel(
    ATTN_OUT, DO, DELTA, sob, soh, som, sdb, sdh, sdm, H, NQ,
    HEAD_DV: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """delta_i = rowsum(dO_i * O_i) in float32."""
    bh = tl.program_id(1)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    o = _load_tile(_slice_ptr(ATTN_OUT, bh, H, sob, soh), offs_m, som, NQ, offs_dv, HEAD_DV)
    do = _load_tile(_slice_ptr(DO, bh, H, sdb, sdh), offs_m, sdm, NQ, offs_dv, HEAD_DV)
    tl.store(DELTA + bh.to(tl.int64) * NQ + offs_m, tl.sum(o.to(tl.float32) * do.to(tl.float32), 1), mask=offs_m < NQ)


@triton.jit(do_not_specialize=["seed_lo", "seed_hi", "hash_limit"])
def _bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DEAD, DK, DV,
    sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sdb, sdh, sdm,
    H, NQ, NK, qk_scale, scale, seed_lo, seed_hi, hash_limit,
    HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CONVENTION: tl.constexpr, DROP: tl.constexpr, DOT: tl.constexpr,
):
    """dK, dV of one key block, looping over the query blocks (tiles held transposed: keys x queries)."""
    bh = tl.program_id(1)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    k = _load_tile(_slice_ptr(K, bh, H, skb, skh), offs_n, skn, NK, offs_d, HEAD_D)
    v = _load_tile(_slice_ptr(V, bh, H, svb, svh), offs_n, svn, NK, offs_dv, HEAD_DV)
    q_base = _slice_ptr(Q, bh, H, sqb, sqh)
    do_base = _slice_ptr(DO, bh, H, sdb, sdh)
    slice_key = _slice_key(seed_lo, seed_hi, bh)
    cols = _col_terms(offs_n)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    dead_do = tl.zeros([BLOCK_DV], tl.float32)
    for start_m in range(0, NQ, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q = _load_tile(q_base, offs_m, sqm, NQ, offs_d, HEAD_D)
        do = _load_tile(do_base, offs_m, sdm, NQ, offs_dv, HEAD_DV)
        lse = _row_stats(LSE, bh, NQ, offs_m, float("inf"))
        delta = _row_stats(DELTA, bh, NQ, offs_m, 0.0)
        dead = _row_stats(DEAD, bh, NQ, offs_m, 0) != 0
        inside = (offs_n < NK)[:, None]  # rows past NQ need no mask: their lse loads as +inf, so P = 0
        keep_t = _kept(
            _row_keys(slice_key, offs_m)[None, :], cols[:, None], inside, hash_limit, dead[None, :], DROP,
            CONVENTION == 2,
        )
        s_t = tl.where(keep_t, _score(k, tl.trans(q), DOT) * qk_scale, float("-inf"))
        p_t = tl.exp2(s_t - lse[None, :])  # 0 where dropped, and on zero/uniform dead rows (lse = +inf)
        dv += _score(p_t.to(do.dtype), do, DOT)
        ds_t = p_t * (_score(v, tl.trans(do), DOT) - delta[None, :])
        dk += _score(ds_t.to(q.dtype), q, DOT)
        if CONVENTION == 1:  # uniform dead rows: o = mean_j v_j, so dV_j += dO / Nk
            dead_do += tl.sum(tl.where(dead[:, None], do.to(tl.float32), 0.0), 0)
    if CONVENTION == 1:
        dv += (dead_do / NK)[None, :]
    _store_tile(DK + bh.to(tl.int64) * NK * HEAD_D, offs_n, HEAD_D, NK, offs_d, HEAD_D, dk * scale)
    _store_tile(DV + bh.to(tl.int64) * NK * HEAD_DV, offs_n, HEAD_DV, NK, offs_dv, HEAD_DV, dv)


@triton.jit(do_not_specialize=["seed_lo", "seed_hi", "hash_limit"])
def _bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DEAD, DQ,
    sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sdb, sdh, sdm,
    H, NQ, NK, qk_scale, scale, seed_lo, seed_hi, hash_limit,
    HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CONVENTION: tl.constexpr, DROP: tl.constexpr, DOT: tl.constexpr,
):
    """dQ of one query block, looping over the key blocks."""
    bh = tl.program_id(1)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = _load_tile(_slice_ptr(Q, bh, H, sqb, sqh), offs_m, sqm, NQ, offs_d, HEAD_D)
    do = _load_tile(_slice_ptr(DO, bh, H, sdb, sdh), offs_m, sdm, NQ, offs_dv, HEAD_DV)
    lse = _row_stats(LSE, bh, NQ, offs_m, float("inf"))
    delta = _row_stats(DELTA, bh, NQ, offs_m, 0.0)
    dead = _row_stats(DEAD, bh, NQ, offs_m, 0) != 0
    rows = _row_keys(_slice_key(seed_lo, seed_hi, bh), offs_m)
    k_base = _slice_ptr(K, bh, H, skb, skh)
    v_base = _slice_ptr(V, bh, H, svb, svh)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, NK, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_tile(k_base, offs_n, skn, NK, offs_d, HEAD_D)
        v = _load_tile(v_base, offs_n, svn, NK, offs_dv, HEAD_DV)
        inside = (offs_n < NK)[None, :]  # rows past NQ need no mask: their lse loads as +inf, so P = 0
        keep = _kept(
            rows[:, None], _col_terms(offs_n)[None, :], inside, hash_limit, dead[:, None], DROP, CONVENTION == 2
        )
        s = tl.where(keep, _score(q, tl.trans(k), DOT) * qk_scale, float("-inf"))
        p = tl.exp2(s - lse[:, None])
        ds = p * (_score(do, tl.trans(v), DOT) - delta[:, None])
        dq += _score(ds.to(k.dtype), k, DOT)
    _store_tile(DQ + bh.to(tl.int64) * NQ * HEAD_D, offs_m, HEAD_D, NQ, offs_d, HEAD_D, dq * scale)


# --------------------------------------------------------------------------- launch

INTERPRETED = not isinstance(_fwd_kernel, triton.runtime.JITFunction)

# Compiled (GPU): the autotuner's candidates, (BLOCK_M, BLOCK_N, num_warps, num_stages),
# timed per (Nq, Nk, head dims, mode). Half dtypes run their tile products on tensor cores;
# float32 runs exact IEEE products on CUDA cores, whose Triton lowering keeps whole operand
# rows per thread, so it gets smaller tiles. In float32 on sm_90 at d = 64, 14 of the 18 half
# candidates made ptxas spill 6-39 KB per thread (the other four 0.25-2.8 KB); these spill
# nothing (benchmarks/results/triton_resources.md, by dropkey.kernels.triton_aot, no GPU).
FORWARD_TUNING = ((128, 64, 4, 3), (128, 32, 4, 3), (64, 64, 4, 3), (128, 128, 8, 3), (64, 32, 4, 2), (128, 64, 8, 2))
BACKWARD_TUNING = ((64, 64, 4, 2), (32, 64, 4, 2), (64, 128, 8, 2), (128, 64, 8, 2), (32, 128, 4, 2), (64, 32, 4, 2))
FORWARD_TUNING_FLOAT32 = ((32, 32, 4, 2), (64, 32, 8, 2), (32, 64, 8, 2), (16, 32, 2, 2))
BACKWARD_TUNING_FLOAT32 = ((32, 32, 8, 2), (16, 32, 4, 2), (16, 64, 8, 2), (32, 16, 4, 2))
DELTA_BLOCK_M = 64  # the delta kernel's query block on GPU (16 under the interpreter)
# Compiler options of every launch, stated rather than left to the installed Triton's default:
# FMA contraction on (Triton 3.9 warns that its default turns off in 3.10; the kernels were
# tested with it on). The interpreter ignores them.
COMPILE_OPTIONS = {"enable_fp_fusion": True}
HASH_MASK_BLOCKS = (16, 16)  # triton_hash_drop_mask's (BLOCK_M, BLOCK_N)


def tuning_candidates(kernel: str, dtype: torch.dtype) -> tuple[tuple[int, int, int, int], ...]:
    """The autotuner's candidates of ``kernel`` ("forward", "backward_dkdv" or "backward_dq") for ``dtype``."""
    exact = dtype == torch.float32
    if kernel == "forward":
        return FORWARD_TUNING_FLOAT32 if exact else FORWARD_TUNING
    if kernel in ("backward_dkdv", "backward_dq"):
        return BACKWARD_TUNING_FLOAT32 if exact else BACKWARD_TUNING
    raise ValueError(f"kernel must be one of ('forward', 'backward_dkdv', 'backward_dq'), got {kernel!r}")


# DROPKEY_LAB_TRITON_AUTOTUNE=0 (read at import): launch each kernel with its first candidate,
# untimed. Each candidate is a separate compilation per mode and head dim, so this cuts the
# compile time of short runs and of test suites with many shapes (benchmarks/gpu_session.sh).
AUTOTUNE = os.environ.get("DROPKEY_LAB_TRITON_AUTOTUNE", "1").strip().lower() not in ("0", "false", "no", "off")

if not INTERPRETED:
    # One autotuner per (kernel, float32 or not): the tuner's candidates cannot depend on an
    # argument. The kernels only write their outputs (no accumulation into them), so the
    # tuner's repeated runs are harmless. One candidate: no timing at all.
    _TUNE_KEY = ["NQ", "NK", "HEAD_D", "HEAD_DV", "CONVENTION", "DROP", "DOT"]

    def _autotuned(kernel: str, fn, exact: bool):
        candidates = tuning_candidates(kernel, torch.float32 if exact else torch.float16)
        candidates = candidates if AUTOTUNE else candidates[:1]
        configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in candidates]
        return triton.autotune(configs, key=_TUNE_KEY)(fn)

    _LAUNCHES = {
        (kernel, exact): _autotuned(kernel, fn, exact)
        for kernel, fn in (
            ("forward", _fwd_kernel), ("backward_dkdv", _bwd_dkdv_kernel), ("backward_dq", _bwd_dq_kernel)
        )
        for exact in (False, True)
    }

    def _launch(kernel: str, dtype: torch.dtype):
        return _LAUNCHES[kernel, dtype == torch.float32]

else:

    def _launch(kernel: str, dtype: torch.dtype):
        return {"forward": _fwd_kernel, "backward_dkdv": _bwd_dkdv_kernel, "backward_dq": _bwd_dq_kernel}[kernel]


def _blocks(fixed: tuple[int, int]) -> dict[str, int]:
    """Explicit block sizes under the interpreter; the autotuner picks them on GPU."""
    return {"BLOCK_M": fixed[0], "BLOCK_N": fixed[1]} if INTERPRETED else {}


def _grid(count_name: str, count: int, slices: int):
    return lambda meta: (triton.cdiv(count, meta[count_name]), slices)


def _as_4d(t: torch.Tensor) -> torch.Tensor:
    """(..., N, d) as a (B, H, N, d) view (a copy only if the leading dims cannot be viewed so), unit last stride."""
    if t.dim() == 2:
        t = t.unsqueeze(0).unsqueeze(0)
    elif t.dim() == 3:
        t = t.unsqueeze(0)
    elif t.dim() > 4:
        try:
            t = t.view(-1, *t.shape[-3:])
        except RuntimeError:
            t = t.reshape(-1, *t.shape[-3:])
    if t.stride(-1) != 1:
        t = t.contiguous()
    return t


def _hash_limit(threshold: int) -> int:
    """T * 2**8 - 1 as an int32 bit pattern: a 32-bit hash h has (h >> 8) < T iff h <= it (unsigned; T >= 1).

    T = 2**24 (r within 2**-25 of 1) gives 2**32 - 1: every logit dropped. T = 0 (no mask)
    gives 0, which the kernels never read (their DROP switch is off).
    """
    if not 0 <= threshold <= 1 << 24:
        raise ValueError(f"threshold must be in [0, 2**24], got {threshold}")
    limit = (threshold << 8) - 1 if threshold else 0
    return limit - (1 << 32) if limit >= 1 << 31 else limit


def _split_seed(seed: int) -> tuple[int, int]:
    """The two 32-bit words of ``seed`` as int32 bit patterns (so the kernels always see int32 scalars)."""
    words = (seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF)
    return tuple(w - (1 << 32) if w >= (1 << 31) else w for w in words)  # type: ignore[return-value]


def _check_device(t: torch.Tensor) -> None:
    if t.device.type == "cpu" and not INTERPRETED:
        raise RuntimeError(
            "the triton backend runs on CUDA tensors; CPU tensors need the Triton interpreter: set "
            "TRITON_INTERPRET=1 in the environment before triton is first imported (slow, for tests)"
        )


def _dot_mode(dtype: torch.dtype) -> int:
    """The kernels' DOT switch (see _score): float32 exact; bfloat16 upcast under the interpreter; else native."""
    if dtype == torch.float32:
        return 1
    return 2 if INTERPRETED and dtype == torch.bfloat16 else 0


def _pow2(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


class _TritonDropKey(torch.autograd.Function):
    """Fused DropKey attention with the hash mask; saves q, k, v, out, lse (float32) and dead flags (int8)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        seed: int,
        threshold: int,
        scale: float,
        convention: int,
    ) -> torch.Tensor:
        q4, k4, v4 = _as_4d(q), _as_4d(k), _as_4d(v)
        batch, heads, nq, d = q4.shape
        nk, dv = k4.shape[-2], v4.shape[-1]
        slices = batch * heads
        out = torch.empty(batch, heads, nq, dv, dtype=q.dtype, device=q.device)
        lse = torch.empty(slices, nq, dtype=torch.float32, device=q.device)
        dead = torch.empty(slices, nq, dtype=torch.int8, device=q.device)
        if slices and nq:
            seed_lo, seed_hi = _split_seed(seed)
            _launch("forward", q.dtype)[_grid("BLOCK_M", nq, slices)](
                q4, k4, v4, out, lse, dead,
                q4.stride(0), q4.stride(1), q4.stride(2), k4.stride(0), k4.stride(1), k4.stride(2),
                v4.stride(0), v4.stride(1), v4.stride(2), out.stride(0), out.stride(1), out.stride(2),
                heads, nq, nk, scale * _LOG2E, seed_lo, seed_hi, _hash_limit(threshold),
                HEAD_D=d, HEAD_DV=dv, BLOCK_D=_pow2(d), BLOCK_DV=_pow2(dv),
                CONVENTION=convention, DROP=threshold > 0, DOT=_dot_mode(q.dtype),
                **_blocks(INTERPRET_FWD_BLOCKS), **COMPILE_OPTIONS,
            )
        ctx.save_for_backward(q4, k4, v4, out, lse, dead)
        ctx.shapes = (q.shape, k.shape, v.shape)
        ctx.params = (seed, threshold, scale, convention)
        return out.view(*q.shape[:-1], dv)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor):  # type: ignore[override]
        q4, k4, v4, out, lse, dead = ctx.saved_tensors
        q_shape, k_shape, v_shape = ctx.shapes  # type: ignore[attr-defined]
        seed, threshold, scale, convention = ctx.params  # type: ignore[attr-defined]
        batch, heads, nq, d = q4.shape
        nk, dv = k4.shape[-2], v4.shape[-1]
        slices = batch * heads
        launch = bool(slices and nq)
        alloc = torch.empty if launch else torch.zeros  # no query: zero gradients to k and v
        grad_q = alloc(batch, heads, nq, d, dtype=q4.dtype, device=q4.device)
        grad_k = alloc(batch, heads, nk, d, dtype=k4.dtype, device=k4.device)
        grad_v = alloc(batch, heads, nk, dv, dtype=v4.dtype, device=v4.device)
        if launch:
            do = grad.reshape(batch, heads, nq, dv)
            if do.stride(-1) != 1:
                do = do.contiguous()
            delta = torch.empty(slices, nq, dtype=torch.float32, device=q4.device)
            block = 16 if INTERPRETED else DELTA_BLOCK_M
            _bwd_delta_kernel[(triton.cdiv(nq, block), slices)](
                out, do, delta, out.stride(0), out.stride(1), out.stride(2), do.stride(0), do.stride(1), do.stride(2),
                heads, nq, HEAD_DV=dv, BLOCK_DV=_pow2(dv), BLOCK_M=block, **COMPILE_OPTIONS,
            )
            seed_lo, seed_hi = _split_seed(seed)
            strides = (
                q4.stride(0), q4.stride(1), q4.stride(2), k4.stride(0), k4.stride(1), k4.stride(2),
                v4.stride(0), v4.stride(1), v4.stride(2), do.stride(0), do.stride(1), do.stride(2),
            )
            common = (heads, nq, nk, scale * _LOG2E, scale, seed_lo, seed_hi, _hash_limit(threshold))
            meta = dict(
                HEAD_D=d, HEAD_DV=dv, BLOCK_D=_pow2(d), BLOCK_DV=_pow2(dv),
                CONVENTION=convention, DROP=threshold > 0, DOT=_dot_mode(q4.dtype),
                **_blocks(INTERPRET_BWD_BLOCKS), **COMPILE_OPTIONS,
            )
            _launch("backward_dkdv", q4.dtype)[_grid("BLOCK_N", nk, slices)](
                q4, k4, v4, do, lse, delta, dead, grad_k, grad_v, *strides, *common, **meta
            )
            _launch("backward_dq", q4.dtype)[_grid("BLOCK_M", nq, slices)](
                q4, k4, v4, do, lse, delta, dead, grad_q, *strides, *common, **meta
            )
        return grad_q.view(q_shape), grad_k.view(k_shape), grad_v.view(v_shape), None, None, None, None


@torch.compiler.disable  # a graph break under torch.compile: dynamo does not trace into the launches
def triton_dropkey_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    drop_ratio: float,
    *,
    seed: int,
    all_dropped: str = DEFAULT,
    scale: Optional[float] = None,
) -> torch.Tensor:
    """DropKey attention by the fused Triton kernels with the hash mask of ``seed``: (..., Nq, dv).

    The low-level entry behind ``dropkey_attention(..., backend="triton")`` (which
    validates q, k, v and draws ``seed`` from its ``generator``). Equals the
    reference backend on ``hash_drop_mask(seed, (..., Nq, Nk), drop_ratio)``.
    """
    from dropkey.kernels.hash_mask import _check_seed

    convention = check_all_dropped(all_dropped)
    if q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"the triton backend supports dtypes {SUPPORTED_DTYPES}, got {q.dtype}")
    if max(q.shape[-1], v.shape[-1]) > MAX_HEAD_DIM:
        raise ValueError(
            f"the triton backend supports head dims up to {MAX_HEAD_DIM}, got d={q.shape[-1]}, dv={v.shape[-1]}"
        )
    _check_device(q)
    threshold = hash_threshold(drop_ratio)
    scale_value = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return _TritonDropKey.apply(q, k, v, _check_seed(seed), threshold, scale_value, CONVENTION_CODES[convention])


def triton_hash_drop_mask(
    seed: int, shape: tuple[int, ...], drop_ratio: float, *, device: torch.device | str
) -> torch.Tensor:
    """The drop flags (bool, True = dropped) exactly as the attention kernels compute them: for tests."""
    from dropkey.kernels.hash_mask import _check_seed

    dev = torch.device(device)
    probe = torch.empty(0, device=dev)
    _check_device(probe)
    nq, nk = shape[-2], shape[-1]
    slices = math.prod(shape[:-2])
    out = torch.zeros(slices, nq, nk, dtype=torch.int8, device=dev)
    threshold = hash_threshold(drop_ratio)
    if out.numel() and threshold:  # T = 0: nothing dropped (the kernel's test needs T >= 1)
        seed_lo, seed_hi = _split_seed(_check_seed(seed))
        block_m, block_n = HASH_MASK_BLOCKS
        _hash_mask_kernel[(triton.cdiv(nq, block_m), slices)](
            out, nq, nk, seed_lo, seed_hi, _hash_limit(threshold), BLOCK_M=block_m, BLOCK_N=block_n, **COMPILE_OPTIONS
        )
    return out.bool().view(*shape)
