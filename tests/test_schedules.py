"""Drop-ratio schedules: shapes, means, endpoints and validation (no randomness)."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest

from dropkey.schedules import (
    SCHEDULE_KINDS,
    constant,
    linear_decreasing,
    linear_increasing,
    mean_ratio,
    schedule,
    validate_schedule,
    with_mean,
)


def test_linear_decreasing_is_the_papers_shape():
    ratios = linear_decreasing(5, 0.3, 0.1)
    assert len(ratios) == 5
    assert ratios[0] == 0.3 and ratios[-1] == 0.1
    assert all(a > b for a, b in zip(ratios, ratios[1:], strict=False))
    assert mean_ratio(ratios) == pytest.approx(0.2, abs=1e-15)


def test_linear_increasing_mirrors_decreasing():
    up, down = linear_increasing(6, 0.05, 0.25), linear_decreasing(6, 0.25, 0.05)
    assert up == pytest.approx(tuple(reversed(down)), abs=1e-15)
    assert up[0] == 0.05 and up[-1] == 0.25


@pytest.mark.parametrize("depth", [1, 2, 7, 12])
@pytest.mark.parametrize("kind", SCHEDULE_KINDS)
def test_named_schedules_share_the_mean(kind, depth):
    spread = 0.0 if kind == "constant" else 0.2
    ratios = schedule(kind, depth, mean=0.15, spread=spread)
    assert len(ratios) == depth
    assert isinstance(ratios, tuple) and all(isinstance(r, float) for r in ratios)
    assert mean_ratio(ratios) == pytest.approx(0.15, abs=1e-14)
    assert all(0.0 <= r < 1.0 for r in ratios)


def test_schedule_endpoints_and_direction():
    down = schedule("linear_decreasing", 4, mean=0.2, spread=0.2)
    up = schedule("linear_increasing", 4, mean=0.2, spread=0.2)
    assert down[0] == pytest.approx(0.3) and down[-1] == pytest.approx(0.1)
    assert up == pytest.approx(tuple(reversed(down)), abs=1e-15)
    assert schedule("constant", 3, mean=0.1) == (0.1, 0.1, 0.1)


def test_with_mean_shifts_and_keeps_shape():
    base = linear_decreasing(4, 0.4, 0.1)
    shifted = with_mean(base, 0.2)
    assert mean_ratio(shifted) == pytest.approx(0.2, abs=1e-15)
    differences = [a - b for a, b in zip(shifted, base, strict=True)]
    assert max(differences) - min(differences) < 1e-15


def test_constant_and_user_lists():
    assert constant(3, 0.2) == (0.2, 0.2, 0.2)
    assert validate_schedule([0.1, 0.2], depth=2) == (0.1, 0.2)
    assert validate_schedule((0, 0.5)) == (0.0, 0.5)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: validate_schedule([0.1, 1.0]), r"schedule\[1\] must be a real number in \[0, 1\)"),
        (lambda: validate_schedule([0.1, -0.1]), r"schedule\[1\]"),
        (lambda: validate_schedule([0.1, math.nan]), r"schedule\[1\]"),
        (lambda: validate_schedule([0.1, 0.2], depth=3), "length must equal depth"),
        (lambda: validate_schedule([]), "at least one"),
        (lambda: validate_schedule("0.1"), "sequence"),
        (lambda: validate_schedule([True]), r"schedule\[0\]"),
        (lambda: constant(0, 0.1), r"depth must be an integer in \[1, inf\)"),
        (lambda: constant(2.0, 0.1), "depth"),
        (lambda: constant(2, 1.5), r"ratio must be a real number in \[0, 1\)"),
        (lambda: linear_decreasing(3, 0.1, 0.3), "start >= end"),
        (lambda: linear_increasing(3, 0.3, 0.1), "start <= end"),
        (lambda: schedule("cosine", 3, mean=0.1), "kind must be one of"),
        (lambda: schedule("linear_decreasing", 3, mean=0.1, spread=0.4), r"\[0, 1\)"),
        (lambda: schedule("linear_decreasing", 3, mean=0.1, spread=-0.1), "spread must be"),
        (lambda: schedule("constant", 3, mean=0.1, spread=0.1), "spread must be 0"),
        (lambda: schedule("constant", 3, mean=1.0), r"mean must be a real number in \[0, 1\)"),
        (lambda: with_mean([0.0, 0.9], 0.1), "out of"),
    ],
)
def test_invalid_arguments_raise_value_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_module_does_not_import_torch():
    """Schedules are plain tuples: importing them (in a fresh interpreter) loads no torch."""
    code = "import sys, dropkey.schedules; print(sorted(m for m in ('torch',) if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
