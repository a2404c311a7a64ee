"""The counter-based DropKey hash mask, in pure torch integer ops (the specification).

The drop flag of the logit (slice s, query i, key j) is a pure function of
``(seed, s, i, j)`` and ``drop_ratio``: no random state is consumed per entry, so
any kernel can recompute any tile of the mask in any order (the Triton kernel's
forward and backward tiles differ in shape) and the reference backend can
materialise exactly the same mask. ``s`` is the flat index of the leading
(batch, head, ...) dims in row-major order (``b * H + h`` for (B, H, N, d)).

The hash (all arithmetic modulo 2**32, on unsigned 32-bit words)::

    fmix32(h):  h ^= h >> 16; h *= 0x85EBCA6B; h ^= h >> 13; h *= 0xC2B2AE35; h ^= h >> 16
                (MurmurHash3's finaliser: a bijection of 32-bit words with full avalanche)
    seed_lo, seed_hi = seed mod 2**32, seed >> 32        (seed in [0, 2**64))
    slice_key = fmix32(seed_lo ^ fmix32(seed_hi + s * 0x9E3779B1))     one per slice
    row_key   = fmix32(slice_key ^ (i * 0x85EBCA77))                   one per query row
    bits      = fmix32(row_key + j * 0xC2B2AE3D)                       one per logit
    dropped   = (bits >> 8) < T,   T = floor(drop_ratio * 2**24 + 1/2)

The multipliers are odd, so for a fixed slice distinct rows get distinct row
keys and, within a row, distinct keys get distinct hash words (fmix32 is a
bijection). ``bits >> 8`` is a uniform 24-bit integer, so an entry is dropped with
probability exactly ``T / 2**24`` (within 2**-25 of ``drop_ratio``); the
comparison is an integer one, identical in torch and Triton. The per-logit cost
is one add and one fmix32 (two multiplies, three xor-shifts).

Torch has no unsigned 32-bit arithmetic, so words live in int64 tensors and each
32 x 32-bit product is formed from 16-bit halves (every partial product stays
below 2**49: exact, no reliance on signed overflow).

The two halves of the hash are public: :func:`hash_row_keys` (per slice and query,
O(slices * Nq)) and :func:`hash_column_terms` (per key), combined per logit by
:func:`hash_bits`; code that computes the mask itself (a FlexAttention ``score_mod``)
looks the row keys up instead of rehashing them per logit. Seeds may be ints or
one-element int64 tensors (:func:`seed_tensor`, :func:`seed_word`); under
:func:`torch.compile`, :func:`hash_drop_mask` is one custom op.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from dropkey.masks import GeneratorLike, _validate_shape, resolve_generator, validate_drop_ratio
from theory.checks import check_int

__all__ = [
    "HASH_BITS",
    "hash_bits",
    "hash_column_terms",
    "hash_drop_mask",
    "hash_row_keys",
    "hash_seed",
    "hash_seed_tensor",
    "hash_threshold",
    "seed_tensor",
    "seed_word",
]

HASH_BITS = 24  # resolution of the uniform compared with the threshold
_MASK32 = 0xFFFFFFFF
_MIX1, _MIX2 = 0x85EBCA6B, 0xC2B2AE35  # fmix32 multipliers
_SLICE, _ROW, _COL = 0x9E3779B1, 0x85EBCA77, 0xC2B2AE3D  # odd multipliers of the counters
_SEED_HIGH = 1 << 63  # hash_seed draws seeds in [0, 2**63 - 1)
# Logits per step of hash_drop_mask on CPU (16x that on other devices): its int64
# temporaries stay a few MiB (CPU) or a few hundred MiB (GPU) whatever the shape.
_CHUNK_LOGITS = 1 << 20


def hash_threshold(drop_ratio: float) -> int:
    """The integer threshold T = floor(drop_ratio * 2**24 + 1/2): a logit is dropped iff its 24-bit hash < T."""
    r = validate_drop_ratio(drop_ratio)
    return int(math.floor(r * (1 << HASH_BITS) + 0.5))  # r * 2**24 is exact in float64


def hash_seed(generator: GeneratorLike = None) -> int:
    """A seed in [0, 2**63 - 1) for the hash mask, from ONE ``torch.randint`` call.

    ``generator``: None (torch's default CPU generator, so ``torch.manual_seed``
    makes runs reproducible), an int (a fresh CPU generator seeded with it) or a
    :class:`torch.Generator` (drawn on its device; a CUDA generator costs one
    device-to-host sync). Each call advances the generator, so successive calls
    give new masks.
    """
    return int(hash_seed_tensor(generator).item())


def hash_seed_tensor(generator: GeneratorLike = None) -> torch.Tensor:
    """:func:`hash_seed`'s draw as a one-element int64 tensor on the generator's device (no host sync).

    ``int(hash_seed_tensor(g).item()) == hash_seed(g')`` for generators in the same state: the
    C++ kernel takes its seed this way, so traced code (``torch.compile``) needs no ``.item()``.
    """
    gen = resolve_generator(generator, "cpu")
    device = gen.device if gen is not None else torch.device("cpu")
    return torch.randint(0, _SEED_HIGH - 1, (1,), dtype=torch.int64, generator=gen, device=device)


def _check_seed(seed: object) -> int:
    """A hash seed: a 64-bit word, an integer in [0, 2**64 - 1]."""
    return check_int(seed, "seed", 0, (1 << 64) - 1)


def _check_count(name: str, value: object) -> None:
    check_int(value, name, 0)


def seed_tensor(seed: int | torch.Tensor) -> torch.Tensor:
    """A hash seed as a one-element int64 tensor: an int in [0, 2**64) (two's complement above
    2**63, on the CPU), or a one-element int64 tensor such as :func:`hash_seed_tensor` draws (as is)."""
    if isinstance(seed, torch.Tensor):
        if seed.dtype != torch.int64 or seed.numel() != 1:
            raise ValueError(
                f"seed must be an int or a one-element int64 tensor, got {seed.dtype} of shape {tuple(seed.shape)}"
            )
        return seed.reshape(1)
    value = _check_seed(seed)
    return torch.tensor([value - (1 << 64) if value >= 1 << 63 else value], dtype=torch.int64)


def seed_word(seed: int | torch.Tensor) -> int:
    """The 64-bit seed in [0, 2**64) of an int or a one-element int64 tensor (read two's complement; a host sync)."""
    if isinstance(seed, torch.Tensor):
        return int(seed_tensor(seed).reshape(()).item()) & ((1 << 64) - 1)
    return _check_seed(seed)


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for int64 ``x`` in [0, 2**32) and a constant c < 2**32, exactly."""
    low = (x & 0xFFFF) * c  # < 2**48
    high = ((x >> 16) * c) & 0xFFFF  # only its low 16 bits survive the shift by 16
    return (low + (high << 16)) & _MASK32


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    h = h ^ (h >> 16)
    h = _mul32(h, _MIX1)
    h = h ^ (h >> 13)
    h = _mul32(h, _MIX2)
    return h ^ (h >> 16)


def _slice_keys(seed: int, slices: torch.Tensor) -> torch.Tensor:
    low, high = seed & _MASK32, seed >> 32
    return _fmix32(_fmix32((_mul32(slices, _SLICE) + high) & _MASK32) ^ low)


def hash_row_keys(
    seed: int, slices: int, nq: int, *, first_slice: int = 0, device: torch.device | str | None = None
) -> torch.Tensor:
    """The row keys (int64 words in [0, 2**32)) of slices ``first_slice .. first_slice + slices - 1``:
    shape (slices, nq).

    ``row_keys[s, i] = fmix32(slice_key(seed, first_slice + s) ^ (i * 0x85EBCA77))`` (see the
    module doc): the per-row half of the hash, O(slices * nq). A kernel (or a FlexAttention
    ``score_mod``) that looks them up does only :func:`hash_bits` per logit.
    """
    seed = _check_seed(seed)
    for name, value in (("slices", slices), ("nq", nq), ("first_slice", first_slice)):
        _check_count(name, value)
    dev = torch.device("cpu") if device is None else torch.device(device)
    keys = _slice_keys(seed, torch.arange(first_slice, first_slice + slices, dtype=torch.int64, device=dev))
    rows = _mul32(torch.arange(nq, dtype=torch.int64, device=dev), _ROW)
    return _fmix32(keys.view(-1, 1) ^ rows.view(1, -1))


def hash_column_terms(nk: int, *, device: torch.device | str | None = None) -> torch.Tensor:
    """The key terms ``j * 0xC2B2AE3D mod 2**32`` for j < ``nk`` (int64, shape (nk,))."""
    _check_count("nk", nk)
    return _mul32(torch.arange(nk, dtype=torch.int64, device=device), _COL)


def hash_bits(row_keys: torch.Tensor, column_terms: torch.Tensor) -> torch.Tensor:
    """The 32-bit hash words (int64) ``fmix32(row_key + column_term)`` of broadcast row keys and column terms.

    An entry is dropped iff ``hash_bits(...) >> 8 < hash_threshold(drop_ratio)``.
    """
    return _fmix32((row_keys + column_terms) & _MASK32)


def hash_drop_mask(
    seed: int | torch.Tensor,
    shape: Sequence[int],
    drop_ratio: float,
    *,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Bool tensor of ``shape = (..., Nq, Nk)``, True = dropped, from the counter-based hash.

    Entry ``(..., i, j)`` of leading flat index ``s`` is dropped iff
    ``(bits(seed, s, i, j) >> 8) < hash_threshold(drop_ratio)`` (see the module
    doc): the mask the Triton kernel computes tile by tile, bit for bit. ``seed``: an
    int in [0, 2**64) or a one-element int64 tensor (:func:`hash_seed_tensor`'s draw,
    so traced code needs no ``.item()``). Computed in chunks of slices, so temporaries
    stay a few MiB beyond the 1-byte-per-logit result.

    Under :func:`torch.compile` this is one opaque op (``dropkey_lab::hash_drop_mask``)
    that runs these same eager maths: traced, the hash's few dozen integer ops made
    inductor's code generation take time exponential in their depth (a 2x3x65x65 mask
    was still compiling after 200 s on a 2-core CPU).
    """
    shape = _validate_shape(shape)
    threshold = hash_threshold(drop_ratio)
    dev = torch.device("cpu") if device is None else torch.device(device)
    if torch.compiler.is_compiling():
        return _hash_drop_mask_op(seed_tensor(seed), list(shape), float(drop_ratio), dev)
    return _hash_drop_mask(seed_word(seed), shape, threshold, dev)


def _hash_drop_mask(seed: int, shape: tuple[int, ...], threshold: int, dev: torch.device) -> torch.Tensor:
    out = torch.empty(shape, dtype=torch.bool, device=dev)
    slices, nq, nk = math.prod(shape[:-2]), shape[-2], shape[-1]
    if out.numel() == 0:
        return out
    if threshold == 0:
        return out.fill_(False)
    flat = out.view(slices, nq, nk)
    cols = hash_column_terms(nk, device=dev).view(1, 1, nk)
    step = max(1, (_CHUNK_LOGITS if dev.type == "cpu" else _CHUNK_LOGITS << 4) // (nq * nk))
    for lo in range(0, slices, step):
        hi = min(slices, lo + step)
        rows = hash_row_keys(seed, hi - lo, nq, first_slice=lo, device=dev).unsqueeze(-1)
        torch.lt(hash_bits(rows, cols) >> (32 - HASH_BITS), threshold, out=flat[lo:hi])
    return out


@torch.library.custom_op("dropkey_lab::hash_drop_mask", mutates_args=())
def _hash_drop_mask_op(seed: torch.Tensor, shape: list[int], drop_ratio: float, device: torch.device) -> torch.Tensor:
    return _hash_drop_mask(seed_word(seed), tuple(shape), hash_threshold(drop_ratio), device)


@_hash_drop_mask_op.register_fake
def _hash_drop_mask_shape(seed, shape, drop_ratio, device):  # type: ignore[no-untyped-def]
    return torch.empty(shape, dtype=torch.bool, device=device)
