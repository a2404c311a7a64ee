"""Keep masks for DropKey and its structured variants (True = the logit takes part).

Size (about 540 lines): the Bernoulli sampler, its bit packing and the structured masks drawn
with it; the fused backend and every regulariser share them.

All masks are ``torch.bool`` tensors (one byte per logit). The fused attention
backend does not even hold that: it draws the same flags piece by piece from a
:class:`BernoulliStream` and keeps them bit-packed (:func:`pack_bits`, 1 bit per logit).

Random numbers
--------------
Every mask is drawn from independent Bernoulli trials (see :class:`BernoulliStream`):
on CPU with ``min(r, 1 - r) <= 0.15`` by *geometric gap sampling* (the gaps between
successive dropped entries of an i.i.d. Bernoulli(r) sequence are i.i.d.
Geometric(r), drawn by inversion of a float64 uniform made of 53 bits of a numpy
PCG64 stream seeded from the torch generator), which costs O(min(r, 1 - r) * n)
random numbers instead of n; otherwise by comparing one float32 uniform per entry
with ``r``. The draw is
reproducible: pass a :class:`torch.Generator` or an ``int`` seed (a fresh generator
on ``device`` seeded with it). The same generator state, shape and ratio always
give the same mask, whichever attention backend consumes it.

Structured variants (DropKey-Block / DropKey-Cross)
---------------------------------------------------
Keys are ``num_prefix_tokens`` prefix tokens (class / distillation / register
tokens) followed by the ``H * W`` patch tokens in row-major order (timm's layout),
so ``Nk == num_prefix_tokens + H * W``. Independently for every leading index and
every query, each patch position is a *seed* with probability ``gamma`` and every
seed drops the keys of its footprint (a ``side x side`` square, or a plus of arm
``arm``, centred on the seed and clipped at the grid border). A patch key ``j`` is
kept iff no seed lies in its *coverage set*, whose size ``c_j`` (smaller at the
border) is computed exactly, so the dropped fraction of patch keys has expectation

    mean_j [1 - (1 - gamma) ** c_j]

and :func:`calibrated_seed_rate` solves ``mean_j [1 - (1 - gamma) ** c_j] = drop_ratio``
numerically (Brent's method, tolerance 1e-15): the expected fraction of dropped
patch keys equals ``drop_ratio`` exactly, border clipping included. Individual
keys near the border are dropped less often than interior ones; only the mean is
calibrated. Prefix tokens are not on the grid: each is dropped independently with
probability ``drop_ratio`` (plain DropKey), so the expected dropped fraction over
*all* keys is ``drop_ratio`` too.
"""

from __future__ import annotations

import functools
import logging
import math
import numbers
import sys
from collections.abc import Sequence
from typing import Optional, Union

import numpy as np
import torch

from theory.checks import check_choice, check_drop_ratio, check_int

logger = logging.getLogger(__name__)

__all__ = [
    "GeneratorLike",
    "BernoulliStream",
    "bernoulli_drop_mask",
    "block_keep_mask",
    "block_seed_rate",
    "calibrated_seed_rate",
    "check_generator",
    "check_grid",
    "coverage_counts",
    "cross_keep_mask",
    "cross_seed_rate",
    "dropattention_keep_mask",
    "dropkey_keep_mask",
    "pack_bits",
    "resolve_generator",
    "unpack_bits",
    "validate_drop_ratio",
]

GeneratorLike = Union[torch.Generator, int, None]

# Random draws per step of the CPU samplers: n / 256 for a mask of n entries,
# clamped to [_MIN_CHUNK, _CHUNK], so their temporaries (at most 24 bytes per draw)
# stay below 0.1 byte per mask entry (beyond a 0.4 MiB floor) whatever the size.
_CHUNK = 1 << 20
_MIN_CHUNK = 1 << 14
# Geometric gap sampling is used when min(r, 1 - r) <= this (it then beats one
# uniform per entry on CPU); otherwise one float32 uniform per entry, ``U < r``
# (granularity 2**-24 in r).
_GEOMETRIC_MAX = 0.15
_ONE = torch.tensor(1.0, dtype=torch.float64)  # 1 + alpha * x in one pass: torch.add(_ONE, x, alpha=...)


# --------------------------------------------------------------------------- validation


def validate_drop_ratio(drop_ratio: object, name: str = "drop_ratio") -> float:
    """``drop_ratio`` as a float in [0, 1) (a one-element real tensor too) or ValueError naming ``name``."""
    if isinstance(drop_ratio, torch.Tensor) and drop_ratio.numel() == 1 and not drop_ratio.dtype.is_complex:
        drop_ratio = float(drop_ratio.item())
    return check_drop_ratio(drop_ratio, name)


def _validate_shape(shape: object, min_dims: int = 2, name: str = "shape") -> tuple[int, ...]:
    if isinstance(shape, torch.Size):
        shape = tuple(shape)
    if not isinstance(shape, Sequence) or isinstance(shape, (str, bytes)):
        raise ValueError(f"{name} must be a sequence of non-negative ints, got {shape!r}")
    out = [check_int(size, f"{name}[{i}]", 0) for i, size in enumerate(shape)]
    if len(out) < min_dims:
        raise ValueError(f"{name} must have at least {min_dims} dimensions (..., Nq, Nk), got {tuple(out)}")
    return tuple(out)


def _validate_positive_int(value: object, name: str) -> int:
    return check_int(value, name, 1)


def check_grid(grid: object, name: str = "grid") -> tuple[int, int]:
    """A patch grid (rows, cols) of integers >= 1, as a tuple; ValueError naming ``name`` otherwise."""
    if not isinstance(grid, Sequence) or isinstance(grid, (str, bytes)) or len(grid) != 2:
        raise ValueError(f"{name} must be a pair (rows, cols) of integers >= 1, got {grid!r}")
    return check_int(grid[0], f"{name}[0]", 1), check_int(grid[1], f"{name}[1]", 1)


def _validate_grid(grid: object, keys: int, num_prefix_tokens: object) -> tuple[int, int, int]:
    height, width = check_grid(grid)
    prefix = check_int(num_prefix_tokens, "num_prefix_tokens", 0)
    if keys != prefix + height * width:
        raise ValueError(
            f"shape[-1] (Nk={keys}) must equal num_prefix_tokens + H * W = {prefix} + {height} * {width}"
        )
    return height, width, prefix


def check_generator(generator: object, name: str = "generator") -> torch.Generator | int | None:
    """A :class:`torch.Generator`, an int seed (what ``Generator.manual_seed`` takes) or None; ValueError otherwise."""
    if generator is None or isinstance(generator, torch.Generator):
        return generator
    if isinstance(generator, bool) or not isinstance(generator, numbers.Integral):
        raise ValueError(f"{name} must be a torch.Generator, an int seed or None, got {type(generator).__name__}")
    return check_int(generator, name, -(2**63), 2**64 - 1)


def resolve_generator(generator: GeneratorLike, device: torch.device | str | None = None) -> torch.Generator | None:
    """A :class:`torch.Generator` from ``generator``: ``None`` (global RNG), a generator, or an int seed
    (a fresh generator on ``device`` seeded with it)."""
    checked = check_generator(generator)
    if not isinstance(checked, int):
        return checked
    fresh = torch.Generator(device=torch.device(device) if device is not None else "cpu")
    fresh.manual_seed(checked)
    return fresh


def _device_for(generator: torch.Generator | None, device: torch.device | str | None) -> torch.device:
    if device is None:
        return generator.device if generator is not None else torch.device("cpu")
    dev = torch.device(device)
    if generator is not None and generator.device.type != dev.type:
        raise ValueError(
            f"generator is on {generator.device} but the mask is drawn on {dev}: pass a generator of that device"
        )
    return dev


# --------------------------------------------------------------------------- Bernoulli sampling


def _chunk_size(n: int) -> int:
    return max(_MIN_CHUNK, min(_CHUNK, n >> 8))


class BernoulliStream:
    """The drop flags of ``n`` i.i.d. Bernoulli(``drop_ratio``) entries, produced in order, in pieces.

    ``fill(out)`` writes the next ``out.numel()`` flags (True = dropped) into the
    1-D bool tensor ``out``. The random numbers are drawn in refills of a size
    that depends on ``n`` only, so the flags are the same however the consumer
    slices the sequence: filling ``n`` entries at once (:func:`bernoulli_drop_mask`)
    or piece by piece (the fused attention backend, which then never holds the
    whole mask) gives identical masks from the same generator state. CPU only.

    Sampling: with ``p = min(r, 1 - r) <= 0.15``, geometric gaps between the rare
    entries (``G = floor(log(1 - U) / log(1 - p))`` with ``U`` a float64 uniform on
    multiples of 2**-53 in [0, 1), so ``1 - U > 0`` is exact and ``P(G >= k) = (1 - p) ** k``
    up to float64 rounding; O(p n) random numbers). The uniforms come from numpy's
    PCG64 (several times cheaper per number than torch's CPU Mersenne Twister),
    seeded through :class:`numpy.random.SeedSequence` by 4 x 62 bits drawn from
    ``generator`` when the stream is made: the torch generator stays the one
    source of randomness and advances by one draw per stream. Otherwise
    (``0.15 < r < 0.85``) one float32 uniform per entry from ``generator``,
    ``U < r`` (r resolved to 2**-24). Temporaries are bounded by the refill size
    (< 0.1 byte per entry).
    """

    def __init__(self, n: int, drop_ratio: float, generator: torch.Generator | None = None) -> None:
        self.n = int(n)
        self.ratio = validate_drop_ratio(drop_ratio)
        self.generator = generator
        self.cursor = 0  # index of the next entry to produce
        r = self.ratio
        self.geometric = r == 0.0 or not (_GEOMETRIC_MAX < r < 1.0 - _GEOMETRIC_MAX)
        # refill size: a function of (n, r) only, so that slicing never changes the draws
        self.refill = max(1, min(_chunk_size(self.n), self.n))
        if self.geometric:
            self.rare_value = r <= 0.5  # the flag of the rare entries
            p = r if r <= 0.5 else 1.0 - r
            expected = self.n * p
            self.refill = max(1, min(_chunk_size(self.n), int(expected + 6.0 * math.sqrt(expected + 1.0)) + 16))
            self.inv_log_q = 1.0 / math.log1p(-p) if p > 0.0 else 0.0
            self.p = p
            self.uniforms: Optional[np.random.Generator] = None
            if p > 0.0:
                words = torch.randint(0, 1 << 62, (4,), dtype=torch.int64, generator=generator)
                self.uniforms = np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(w) for w in words])))
            self.pending = torch.empty(0, dtype=torch.int64)  # absolute positions of rare entries not yet written
            self.last = -1  # position of the last rare entry generated
        else:
            self.uniform = torch.empty(0)
            self.offset = 0

    def _refill_positions(self) -> None:
        assert self.uniforms is not None
        # G = floor(log(1 - U) / log(1 - p)) >= 0 with U in [0, 1) a multiple of 2**-53 (1 - U exact, > 0);
        # the gap to the next rare entry is G + 1, computed as floor(log(1 - U) / log(1 - p) + 1)
        uniform = torch.from_numpy(self.uniforms.random(self.refill))
        gaps = torch.rsub(uniform, 1.0).log_()
        gaps = torch.add(_ONE, gaps, alpha=self.inv_log_q)
        if self.p < 1e-9:  # keep float -> int64 in range (a gap past n ends the stream anyway)
            gaps.clamp_(max=float(self.n))
        gaps = gaps.to(torch.int64)  # truncation == floor for non-negative values
        gaps[0] += self.last  # so that the running sum gives absolute positions
        positions = torch.cumsum(gaps, 0)
        self.last = int(positions[-1])
        self.pending = positions  # only called once every pending position was written

    def fill(self, out: torch.Tensor) -> torch.Tensor:
        """Write the next ``out.numel()`` drop flags into the contiguous 1-D bool ``out``; return it."""
        count = out.numel()
        if self.cursor + count > self.n:
            raise ValueError(f"BernoulliStream of {self.n} entries asked for {self.cursor + count}")
        lo, hi = self.cursor, self.cursor + count
        self.cursor = hi
        if self.geometric:
            out.fill_(not self.rare_value)
            if self.p == 0.0 or count == 0:
                return out
            while True:
                if self.pending.numel():
                    inside = int(torch.searchsorted(self.pending, hi))  # positions are strictly increasing
                    if inside:
                        out.index_fill_(0, self.pending[:inside] - lo, self.rare_value)
                        self.pending = self.pending[inside:]
                if self.last >= hi - 1:  # every rare entry below hi is written
                    return out
                self._refill_positions()  # pending is empty here
        done = 0
        while done < count:
            if self.offset == self.uniform.numel():
                self.uniform = torch.rand(self.refill, generator=self.generator)
                self.offset = 0
            take = min(count - done, self.uniform.numel() - self.offset)
            torch.lt(self.uniform[self.offset : self.offset + take], self.ratio, out=out[done : done + take])
            self.offset += take
            done += take
        return out


def bernoulli_drop_mask(
    shape: Sequence[int],
    drop_ratio: float,
    *,
    generator: GeneratorLike = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Bool tensor of ``shape`` with i.i.d. entries, True (dropped) with probability ``drop_ratio``.

    CPU: :class:`BernoulliStream` (geometric gap sampling for ``min(r, 1 - r) <= 0.15``,
    exact up to float64 rounding; otherwise a float32 uniform per entry, ``U < r``);
    temporaries are bounded, so the mask (1 byte per entry) is the only per-entry
    memory. Other devices: ``torch.rand(shape) < r``.
    """
    shape = _validate_shape(shape, min_dims=0)
    r = validate_drop_ratio(drop_ratio)
    gen = resolve_generator(generator, device)
    dev = _device_for(gen, device)
    if r == 0.0:
        return torch.zeros(shape, dtype=torch.bool, device=dev)
    if dev.type != "cpu":
        return torch.rand(shape, generator=gen, device=dev) < r
    out = torch.empty(shape, dtype=torch.bool, device=dev)
    BernoulliStream(out.numel(), r, gen).fill(out.view(-1))
    return out


# --------------------------------------------------------------------------- bit packing

_LITTLE_ENDIAN = sys.byteorder == "little"
# (8 bytes of 0/1, read as a little-endian int64) * _GATHER >> 56 == sum_i byte_i << i
_GATHER = 0x0102040810204080
_SPREAD = 0x0101010101010101  # byte b -> b in all 8 bytes
_SELECT = 0x8040201008040201 - (1 << 64)  # bit i of byte i (as a signed int64)


def pack_bits(flags: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Pack a contiguous 1-D bool tensor whose length is a multiple of 8 into uint8
    (bit i of byte j = flags[8 j + i])."""
    if flags.dtype != torch.bool or flags.dim() != 1 or flags.numel() % 8:
        raise ValueError("flags must be a 1-D bool tensor whose length is a multiple of 8")
    if out is None:
        out = torch.empty(flags.numel() // 8, dtype=torch.uint8, device=flags.device)
    aligned = flags.is_contiguous() and flags.storage_offset() % 8 == 0
    if _LITTLE_ENDIAN and aligned:
        words = flags.view(torch.uint8).view(torch.int64)
        # the packed byte is the top byte of each product: byte 7 of 8 in little-endian memory
        return out.copy_((words * _GATHER).view(torch.uint8)[7::8])
    weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.int32, device=flags.device)
    return out.copy_((flags.view(-1, 8).to(torch.int32) * weights).sum(dim=-1))


def unpack_bits(packed: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_bits` into the contiguous 1-D bool ``out`` of length 8 * len(packed)."""
    if out.numel() != 8 * packed.numel():
        raise ValueError("out must hold 8 flags per packed byte")
    as_bytes = out.view(torch.uint8)
    if _LITTLE_ENDIAN and out.is_contiguous() and out.storage_offset() % 8 == 0:
        # replicate each byte into the 8 bytes of an int64, keep bit i in byte i, then 2**i -> 1
        words = as_bytes.view(torch.int64)
        torch.mul(packed.to(torch.int64), _SPREAD, out=words).bitwise_and_(_SELECT)
    else:
        bits = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=packed.device)
        torch.bitwise_and(packed.unsqueeze(-1), bits, out=as_bytes.view(-1, 8))
    as_bytes.clamp_(max=1)  # 0 / 1 bytes: valid bools
    return out


def dropkey_keep_mask(
    shape: Sequence[int],
    drop_ratio: float,
    *,
    generator: GeneratorLike = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """DropKey keep mask of ``shape = (..., Nq, Nk)``: every entry kept independently w.p. ``1 - drop_ratio``.

    Returns a bool tensor of ``shape`` (True = kept). Same generator state -> same mask.
    """
    shape = _validate_shape(shape)
    return bernoulli_drop_mask(shape, drop_ratio, generator=generator, device=device).logical_not_()


def dropattention_keep_mask(
    shape: Sequence[int],
    drop_ratio: float,
    *,
    generator: GeneratorLike = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """DropAttention-style key dropout, shared by all queries.

    ``shape = (..., Nq, Nk)`` is the logits' shape; returns a bool mask of shape
    ``(..., 1, Nk)``: each key of each leading index (batch, head) kept w.p.
    ``1 - drop_ratio``, the same for every query. A softmax over the kept keys equals
    post-softmax column dropout followed by renormalisation of each row.
    """
    shape = _validate_shape(shape)
    return dropkey_keep_mask((*shape[:-2], 1, shape[-1]), drop_ratio, generator=generator, device=device)


# --------------------------------------------------------------------------- structured variants


def _footprint(kind: str, size: int) -> list[tuple[int, int]]:
    """Offsets (dy, dx) a seed drops: a side x side square or a plus of arm ``size``."""
    if kind == "block":
        low = -((size - 1) // 2)  # odd side: centred; even side: one more cell after the seed
        return [(dy, dx) for dy in range(low, low + size) for dx in range(low, low + size)]
    if kind == "cross":
        return [(0, 0)] + [(s * a, 0) for a in range(1, size + 1) for s in (-1, 1)] + [
            (0, s * a) for a in range(1, size + 1) for s in (-1, 1)
        ]
    raise ValueError(f"kind must be 'block' or 'cross', got {kind!r}")


@functools.lru_cache(maxsize=256)
def coverage_counts(grid: tuple[int, int], kind: str = "block", size: int = 3) -> np.ndarray:
    """(H, W) int array: c_j = number of seed positions whose clipped footprint covers patch j."""
    height, width = grid
    counts = np.zeros((height, width), dtype=np.int64)
    for dy, dx in _footprint(kind, size):
        # seed at (y - dy, x - dx) covers (y, x): count the seeds that lie inside the grid
        ys = slice(max(dy, 0), height + min(dy, 0))
        xs = slice(max(dx, 0), width + min(dx, 0))
        counts[ys, xs] += 1
    counts.setflags(write=False)
    return counts


@torch.compiler.disable  # a cached scalar solve (numpy, scipy): torch.compile cannot trace numpy's setflags
@functools.lru_cache(maxsize=1024)
def _solve_seed_rate(drop_ratio: float, grid: tuple[int, int], kind: str, size: int) -> float:
    from scipy.optimize import brentq

    if drop_ratio == 0.0:
        return 0.0
    counts = coverage_counts(grid, kind, size).ravel().astype(np.float64)
    values, multiplicity = np.unique(counts, return_counts=True)
    weights = multiplicity / counts.size

    def excess(gamma: float) -> float:
        # mean_j [1 - (1 - gamma)^c_j] - r, with log1p for accuracy at small gamma
        return float(np.dot(weights, -np.expm1(values * np.log1p(-gamma)))) - drop_ratio

    # excess(0) = -r < 0 and excess(drop_ratio) >= 0 since c_j >= 1
    return float(brentq(excess, 0.0, drop_ratio, xtol=1e-15, rtol=4 * np.finfo(float).eps, maxiter=500))


def calibrated_seed_rate(
    drop_ratio: float, grid: Sequence[int], *, kind: str = "block", side: int = 3, arm: int = 1
) -> float:
    """Seed probability gamma with mean_j [1 - (1 - gamma)^c_j] == drop_ratio (border clipping included).

    ``kind`` is ``"block"`` (square of side ``side``) or ``"cross"`` (plus of arm ``arm``).
    """
    r = validate_drop_ratio(drop_ratio)
    check_choice(kind, "kind", ("block", "cross"))
    size = _validate_positive_int(side, "side") if kind == "block" else _validate_positive_int(arm, "arm")
    g = check_grid(grid)
    return _solve_seed_rate(r, g, kind, size)


def block_seed_rate(drop_ratio: float, grid: Sequence[int], *, side: int = 3) -> float:
    """Calibrated seed rate of DropKey-Block (see :func:`calibrated_seed_rate`)."""
    return calibrated_seed_rate(drop_ratio, grid, kind="block", side=side)


def cross_seed_rate(drop_ratio: float, grid: Sequence[int], *, arm: int = 1) -> float:
    """Calibrated seed rate of DropKey-Cross (see :func:`calibrated_seed_rate`)."""
    return calibrated_seed_rate(drop_ratio, grid, kind="cross", arm=arm)


def _dilate(seeds: torch.Tensor, kind: str, size: int) -> torch.Tensor:
    """OR of shifted copies of the (..., H, W) bool ``seeds``: the union of clipped footprints."""
    height, width = seeds.shape[-2:]
    if kind == "block":  # separable: dilate along W, then along H
        low = -((size - 1) // 2)
        rows = seeds.clone()
        for dx in range(low, low + size):
            if dx == 0 or abs(dx) >= width:
                continue
            if dx > 0:
                rows[..., :, dx:].logical_or_(seeds[..., :, :-dx])
            else:
                rows[..., :, :dx].logical_or_(seeds[..., :, -dx:])
        out = rows.clone()
        for dy in range(low, low + size):
            if dy == 0 or abs(dy) >= height:
                continue
            if dy > 0:
                out[..., dy:, :].logical_or_(rows[..., :-dy, :])
            else:
                out[..., :dy, :].logical_or_(rows[..., -dy:, :])
        return out
    out = seeds.clone()
    for dy, dx in _footprint(kind, size):
        if (dy, dx) == (0, 0) or abs(dy) >= height or abs(dx) >= width:
            continue
        dst_y = slice(max(dy, 0), height + min(dy, 0))
        src_y = slice(max(-dy, 0), height + min(-dy, 0))
        dst_x = slice(max(dx, 0), width + min(dx, 0))
        src_x = slice(max(-dx, 0), width + min(-dx, 0))
        out[..., dst_y, dst_x].logical_or_(seeds[..., src_y, src_x])
    return out


def _structured_keep_mask(
    shape: object,
    drop_ratio: object,
    grid: object,
    num_prefix_tokens: object,
    kind: str,
    size: int,
    generator: GeneratorLike,
    device: torch.device | str | None,
) -> torch.Tensor:
    shape = _validate_shape(shape)
    r = validate_drop_ratio(drop_ratio)
    height, width, prefix = _validate_grid(grid, shape[-1], num_prefix_tokens)
    gen = resolve_generator(generator, device)
    dev = _device_for(gen, device)
    gamma = _solve_seed_rate(r, (height, width), kind, size)
    lead = shape[:-1]  # (..., Nq)
    seeds = bernoulli_drop_mask((*lead, height, width), gamma, generator=gen, device=dev)
    dropped = _dilate(seeds, kind, size).reshape(*lead, height * width)
    keep = torch.empty(shape, dtype=torch.bool, device=dev)
    if prefix:
        keep[..., :prefix] = bernoulli_drop_mask((*lead, prefix), r, generator=gen, device=dev).logical_not_()
    torch.logical_not(dropped, out=keep[..., prefix:])
    return keep


def block_keep_mask(
    shape: Sequence[int],
    drop_ratio: float,
    *,
    grid: Sequence[int],
    num_prefix_tokens: int = 1,
    side: int = 3,
    generator: GeneratorLike = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """DropKey-Block keep mask of ``shape = (..., Nq, Nk)``, ``Nk = num_prefix_tokens + H * W``.

    Per leading index and query, seeds ~ Bernoulli(:func:`block_seed_rate`) on the
    ``grid = (H, W)`` patch grid; each seed drops the ``side x side`` window centred
    on it (clipped at the border; an even side extends one more cell after the seed).
    Expected dropped fraction of patch keys == ``drop_ratio``; prefix keys dropped
    independently w.p. ``drop_ratio``. Returns bool (True = kept).
    """
    size = _validate_positive_int(side, "side")
    return _structured_keep_mask(shape, drop_ratio, grid, num_prefix_tokens, "block", size, generator, device)


def cross_keep_mask(
    shape: Sequence[int],
    drop_ratio: float,
    *,
    grid: Sequence[int],
    num_prefix_tokens: int = 1,
    arm: int = 1,
    generator: GeneratorLike = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """DropKey-Cross keep mask: like :func:`block_keep_mask` with a plus of arm ``arm`` per seed."""
    size = _validate_positive_int(arm, "arm")
    return _structured_keep_mask(shape, drop_ratio, grid, num_prefix_tokens, "cross", size, generator, device)

