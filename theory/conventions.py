"""What a row whose keys are all dropped attends to: one convention, one documented default.

With drop ratio r a row of N keys loses every key with probability r^N. The softmax of a row of
-inf logits is undefined, so each implementation must choose:

- ``zero``: the row attends to nothing (its output is 0);
- ``uniform``: every key gets 1/N (what the paper's official code gives: it masks with a large
  finite negative number, so an all-masked row is a softmax of equal logits);
- ``undropped``: the row keeps its undropped weights p (as if no key had been dropped).

The default everywhere -- theory, library, simulations, experiments -- is :data:`DEFAULT`
(``uniform``, the official code's behaviour). Functions take the names as plain strings too.
"""

from __future__ import annotations

from enum import Enum

import numpy as np

from theory.checks import check_choice


class AllDropped(str, Enum):
    """The all-dropped conventions (a ``str`` enum: ``AllDropped.UNIFORM == "uniform"``)."""

    ZERO = "zero"
    UNIFORM = "uniform"
    UNDROPPED = "undropped"


#: The names, in a fixed order (for validation messages and study grids).
ALL_DROPPED_CONVENTIONS = tuple(convention.value for convention in AllDropped)
#: The one default of every function and config that takes an all-dropped convention.
DEFAULT = AllDropped.UNIFORM.value


def check_all_dropped(value: object, name: str = "all_dropped") -> str:
    """An all-dropped convention as its plain name (an :class:`AllDropped` member is accepted), or ValueError
    naming the argument."""
    return AllDropped(check_choice(value, name, ALL_DROPPED_CONVENTIONS)).value


def all_dropped_weights(p: np.ndarray, all_dropped: str, *, present: np.ndarray | None = None) -> np.ndarray:
    """The weights of an all-dropped row for rows ``p`` (..., N) under the convention.

    ``present`` (bool, broadcastable to ``p``) marks the keys that exist (a key excluded by padding or a
    causal mask is absent): ``uniform`` then spreads 1/N' over the N' present keys of each row and gives
    absent keys 0. Without it every key is present (1/N each).
    """
    if all_dropped == AllDropped.ZERO:
        return np.zeros_like(p)
    if all_dropped == AllDropped.UNIFORM:
        if present is None:
            return np.full_like(p, 1.0 / p.shape[-1])
        present = np.broadcast_to(np.asarray(present, dtype=bool), np.shape(p))
        return present / present.sum(axis=-1, keepdims=True)
    if all_dropped == AllDropped.UNDROPPED:
        return np.array(p, copy=True)
    raise ValueError(f"all_dropped must be one of {ALL_DROPPED_CONVENTIONS}, got {all_dropped!r}")


def renormalise_kept(p: np.ndarray, keep: np.ndarray, all_dropped: str = DEFAULT, *,
                     present: np.ndarray | None = None) -> np.ndarray:
    """DropKey's weights from the undropped ones: w = keep p / sum(keep p), the convention where nothing is kept.

    Masking logits to -inf before the softmax equals renormalising the kept softmax weights, so
    this is the numpy form of DropKey for given keep masks. ``p`` (..., N) broadcasts against
    ``keep`` (..., N) (e.g. one row against many masks); ``present`` as in :func:`all_dropped_weights`.
    """
    kept = np.asarray(keep, dtype=bool) * np.asarray(p, dtype=np.float64)
    total = kept.sum(axis=-1, keepdims=True)
    fallback = all_dropped_weights(np.broadcast_to(np.asarray(p, dtype=np.float64), kept.shape), all_dropped,
                                   present=None if present is None else np.broadcast_to(present, kept.shape))
    return np.where(total > 0, kept / np.where(total > 0, total, 1.0), fallback)


def entropy(p: np.ndarray, axis: int = -1) -> np.ndarray:
    """Shannon entropy in nats of attention rows along ``axis``, with 0 log 0 = 0 (the numpy home; torch's is
    :func:`dropkey.diagnostics.attention_entropy`)."""
    p = np.asarray(p, dtype=np.float64)
    logs = np.log(np.where(p > 0, p, 1.0))
    return -(p * logs).sum(axis=axis)
