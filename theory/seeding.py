"""One RNG mechanism: named, independent child streams of one seed (numpy's SeedSequence).

Every run takes one integer seed; its parts (model initialisation, data order, masks, ...)
draw from children spawned from it, never from offsets added to the seed, so streams never
overlap and a result depends only on its config. Library code never seeds a global RNG; it
takes a generator or a seed and derives what it needs here.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import numpy as np

from theory.checks import check_int, check_seed

SeedLike = int | np.random.SeedSequence


def root_sequence(seed: SeedLike) -> np.random.SeedSequence:
    """``seed`` as a SeedSequence: a SeedSequence as is, an integer checked (:func:`theory.checks.check_seed`)
    and wrapped. ``generator(root_sequence(s))`` draws what ``numpy.random.default_rng(s)`` draws."""
    return seed if isinstance(seed, np.random.SeedSequence) else np.random.SeedSequence(check_seed(seed))


def keyed_sequence(seed: int, key: str) -> np.random.SeedSequence:
    """A stream named by a string: ``SeedSequence([seed, crc32(key)])``. Unlike :func:`named_streams`, it does
    not depend on which other names exist or in what order they are listed (the derivations' checks use it,
    so that each check's random rows do not depend on which checks run)."""
    return np.random.SeedSequence([check_seed(seed), zlib.crc32(key.encode())])


def address_sequence(seed: int, *address: int) -> np.random.SeedSequence:
    """The stream at an integer address: ``SeedSequence([seed, *address])``. Like :func:`keyed_sequence`, it does
    not depend on which other addresses exist (the lab's per-rank training streams and per-batch Monte-Carlo
    passes use it, so that each is found again from its address alone)."""
    return np.random.SeedSequence([check_seed(seed), *(check_seed(part, "address") for part in address)])


def child_sequences(seed: SeedLike, count: int) -> list[np.random.SeedSequence]:
    """``count`` independent children of ``seed`` by :meth:`numpy.random.SeedSequence.spawn`.

    An integer seed starts a fresh root each call, so child ``i`` depends only on ``(seed, i)``,
    whatever ``count`` is (>= i + 1). A SeedSequence is spawned from as is (its counter advances).
    """
    return root_sequence(seed).spawn(count)


def named_streams(seed: SeedLike, names: Sequence[str]) -> dict[str, np.random.SeedSequence]:
    """One child per name, by position: adding a name at the end leaves the earlier streams unchanged."""
    if len(set(names)) != len(names):
        raise ValueError(f"names must be distinct, got {list(names)!r}")
    return dict(zip(names, child_sequences(seed, len(names)), strict=True))


def generator(sequence: np.random.SeedSequence) -> np.random.Generator:
    """A numpy Generator on a SeedSequence child."""
    return np.random.default_rng(sequence)


def integer_seed(sequence: np.random.SeedSequence, bits: int = 63) -> int:
    """An integer seed of ``bits`` bits (<= 64) from a SeedSequence, e.g. for ``torch.Generator.manual_seed``."""
    if not 1 <= bits <= 64:
        raise ValueError(f"bits must be in [1, 64], got {bits!r}")
    word = int(sequence.generate_state(1, dtype=np.uint64)[0])
    return word & ((1 << bits) - 1)


def integer_seeds(sequence: np.random.SeedSequence, count: int) -> list[int]:
    """``count`` 32-bit integer seeds from one SeedSequence (its first ``count`` 32-bit words), e.g. one per
    Monte-Carlo pass; ``integer_seeds(s, 1)[0] == integer_seed(s, 32)``."""
    return [int(word) for word in sequence.generate_state(check_int(count, "count", 1), dtype=np.uint32)]
