"""The shared statistical assertion passes inside the band and fails, with the worst z, outside it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from stat_assertions import assert_within_standard_errors, sample_mean_and_standard_error


def test_passes_inside_the_band_and_broadcasts():
    assert_within_standard_errors(np.array([1.0, 2.0]), [1.1, 2.0], 0.03)
    assert_within_standard_errors(torch.tensor([[1.0], [2.0]]), 1.5, np.array([0.1, 0.11]), multiple=5.0)
    assert_within_standard_errors(0.5, 0.5 + 1e-7, 0.0, atol=1e-6)


def test_fails_outside_the_band_naming_the_worst_entry():
    with pytest.raises(AssertionError, match=r"E\[w\]: 1 of 3 entries beyond 5 SE; worst at \(1,\).*z = 6\.67"):
        assert_within_standard_errors([1.0, 1.0, 1.0], [1.0, 1.2, 1.1], 0.03, what="E[w]")
    with pytest.raises(AssertionError, match="z = inf"):
        assert_within_standard_errors([float("nan")], [1.0], 1.0)
    with pytest.raises(AssertionError):
        assert_within_standard_errors(0.5, 0.0, 0.0, atol=1e-3)


def test_bad_arguments_are_value_errors():
    with pytest.raises(ValueError, match="multiple"):
        assert_within_standard_errors(1.0, 1.0, 1.0, multiple=0.0)
    with pytest.raises(ValueError, match="standard_error"):
        assert_within_standard_errors(1.0, 1.0, -1.0)
    with pytest.raises(ValueError, match="samples"):
        sample_mean_and_standard_error(np.zeros((1, 3)))


def test_sample_mean_and_standard_error():
    samples = np.random.default_rng(0).normal(loc=3.0, size=(4000, 2))
    mean, se = sample_mean_and_standard_error(samples)
    np.testing.assert_allclose(se, samples.std(axis=0, ddof=1) / np.sqrt(4000))
    assert_within_standard_errors(mean, 3.0, se)
