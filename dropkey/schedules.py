"""Drop-ratio schedules over depth: one drop ratio per transformer block.

The DropKey paper lowers the drop ratio with depth but does not publish the
exact form (docs/theory.md section 4). We offer the usual shapes, compared at the
same *mean* ratio so that a schedule comparison is not a comparison of how much
is dropped in total:

- ``constant``           every block uses ``mean``;
- ``linear_decreasing``  first block ``mean + spread/2`` down to last block ``mean - spread/2``
                         (the paper's direction: r_max at the first layer, r_min at the last);
- ``linear_increasing``  the mirror image.

Schedules are plain tuples of floats (hashable, so they fit in a frozen
:class:`~dropkey.models.ViTConfig`). Every ratio must lie in [0, 1).
This module does not import torch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from theory.checks import check_choice, check_drop_ratio, check_int, check_real

SCHEDULE_KINDS = ("constant", "linear_decreasing", "linear_increasing")


def _check_depth(depth: object) -> int:
    return check_int(depth, "depth", 1)


def _check_ratio(value: object, *, name: str) -> float:
    return check_drop_ratio(value, name)


def validate_schedule(ratios: Sequence[float], depth: int | None = None, name: str = "schedule") -> tuple[float, ...]:
    """Return ``ratios`` as a tuple of floats after checking each is in [0, 1).

    If ``depth`` is given the schedule must have exactly that many entries. ``name``: the
    argument the messages name (its entries are ``name[i]``).
    """
    if isinstance(ratios, (str, bytes)) or not isinstance(ratios, Sequence):
        raise ValueError(f"{name} must be a sequence of drop ratios, got {ratios!r}")
    checked = tuple(_check_ratio(r, name=f"{name}[{i}]") for i, r in enumerate(ratios))
    if not checked:
        raise ValueError(f"{name} must have at least one drop ratio")
    if depth is not None and len(checked) != _check_depth(depth):
        raise ValueError(f"{name} length must equal depth = {depth}, got {len(checked)} ratios")
    return checked


def constant(depth: int, ratio: float) -> tuple[float, ...]:
    """The same drop ratio in every block."""
    return (_check_ratio(ratio, name="ratio"),) * _check_depth(depth)


def linear(depth: int, start: float, end: float) -> tuple[float, ...]:
    """Linear interpolation from ``start`` (first block) to ``end`` (last block).

    depth == 1 gives ``(start,)``.
    """
    depth = _check_depth(depth)
    start = _check_ratio(start, name="start")
    end = _check_ratio(end, name="end")
    if depth == 1:
        return (start,)
    # start + (end - start) * i / (depth - 1); the last entry is exactly `end`
    ratios = [start + (end - start) * i / (depth - 1) for i in range(depth - 1)] + [end]
    return validate_schedule(ratios, depth)


def linear_decreasing(depth: int, start: float, end: float) -> tuple[float, ...]:
    """The paper's shape: ``start`` = r_max at the first block down to ``end`` = r_min."""
    if start < end:
        raise ValueError(f"linear_decreasing needs start >= end, got start={start!r}, end={end!r}")
    return linear(depth, start, end)


def linear_increasing(depth: int, start: float, end: float) -> tuple[float, ...]:
    """``start`` = r_min at the first block up to ``end`` = r_max at the last."""
    if start > end:
        raise ValueError(f"linear_increasing needs start <= end, got start={start!r}, end={end!r}")
    return linear(depth, start, end)


def mean_ratio(ratios: Sequence[float]) -> float:
    """The mean drop ratio of a schedule (fsum: exact rounding of the sum)."""
    checked = validate_schedule(ratios)
    return math.fsum(checked) / len(checked)


def with_mean(ratios: Sequence[float], mean: float) -> tuple[float, ...]:
    """Shift a schedule by a constant so that its mean is ``mean``; keeps its shape.

    Raises ValueError if the shifted schedule leaves [0, 1).
    """
    checked = validate_schedule(ratios)
    target = _check_ratio(mean, name="mean")
    shift = target - mean_ratio(checked)
    shifted = [r + shift for r in checked]
    if min(shifted) < 0.0 or max(shifted) >= 1.0:
        raise ValueError(
            f"mean={target!r} moves the schedule out of [0, 1): shifted range "
            f"[{min(shifted)!r}, {max(shifted)!r}]"
        )
    return validate_schedule(shifted)


def schedule(kind: str, depth: int, *, mean: float, spread: float = 0.0) -> tuple[float, ...]:
    """A named schedule with a given mean ratio; comparison schedules share ``mean``.

    kind: one of :data:`SCHEDULE_KINDS`. spread = r_max - r_min >= 0 (ignored,
    and must be 0, for ``constant``). The linear schedules run from
    mean + spread/2 to mean - spread/2 (decreasing) or the reverse (increasing),
    so their mean is ``mean`` up to float rounding.
    """
    check_choice(kind, "kind", SCHEDULE_KINDS)
    depth = _check_depth(depth)
    mean = _check_ratio(mean, name="mean")
    spread = check_real(spread, "spread", 0.0, None)
    if kind == "constant":
        if spread != 0.0:
            raise ValueError(f"spread must be 0 for kind='constant', got {spread!r}")
        return constant(depth, mean)
    high, low = mean + spread / 2, mean - spread / 2
    if low < 0.0 or high >= 1.0:
        raise ValueError(
            f"mean={mean!r} and spread={spread!r} give ratios in [{low!r}, {high!r}], "
            "which must lie in [0, 1)"
        )
    if depth == 1:
        return (mean,)
    if kind == "linear_decreasing":
        return linear_decreasing(depth, high, low)
    return linear_increasing(depth, low, high)
