"""One RNG mechanism: named, independent child streams of one seed (numpy's SeedSequence).

Every run takes one integer seed; its parts (model initialisation, data order, masks, ...)
draw from children spawned from it, never from offsets added to the seed, so streams never
overlap and a result depends only on its config. Library code never seeds a global RNG; it
takes a generator or a seed and derives what it needs here.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from theory.checks import check_seed

SeedLike = int | np.random.SeedSequence


def child_sequences(seed: SeedLike, count: int) -> list[np.random.SeedSequence]:
    """``count`` independent children of ``seed`` by :meth:`numpy.random.SeedSequence.spawn`.

    An integer seed starts a fresh root each call, so child ``i`` depends only on ``(seed, i)``,
    whatever ``count`` is (>= i + 1). A SeedSequence is spawned from as is (its counter advances).
    """
    root = seed if isinstance(seed, np.random.SeedSequence) else np.random.SeedSequence(check_seed(seed))
    return root.spawn(count)


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
